"""Metrics in the paper's scales, and what an evaluation writes: per-image scores, the Markdown table, a contact sheet.

The table has the paper's layout: one row per model; Table 1's columns (ImageReward, Aesthetic, PickScore, CLIP,
means over all images) and, for a prompt set with styles, Table 3's (HPS per style and their average).
"""

from __future__ import annotations

import csv
import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..rewards import available_rewards, parse_reward_spec

__all__ = ["METRICS", "TABLE_1_METRICS", "TABLE_3_METRICS", "Metric", "format_table", "get_metric", "summarize"]


@dataclass(frozen=True)
class Metric:
    """A reward of the registry as a table column: ``scale * reward(images, prompts)``, shown with ``decimals``."""

    name: str
    title: str
    decimals: int = 3
    scale: float = 1.0


#: The paper's metrics. PickScore is reported as the paper prints it (0.22-0.23): PickScore_v1's logit
#: ``logit_scale.exp() * cos`` divided by 100; the others are the rewards' own scores (CLIP and HPS: 100 * cos).
METRICS = {
    "imagereward": Metric("imagereward", "ImageReward", 3),
    "aesthetic": Metric("aesthetic", "Aesthetic", 2),
    "pickscore": Metric("pickscore", "PickScore", 4, scale=0.01),
    "clip": Metric("clip", "CLIP", 2),
    "hpsv2": Metric("hpsv2", "HPSv2", 2),
    "hpsv2.1": Metric("hpsv2.1", "HPSv2.1", 2),
}
TABLE_1_METRICS = ("imagereward", "aesthetic", "pickscore", "clip")
TABLE_3_METRICS = ("hpsv2.1",)
#: The contact sheet: prompts shown, largest image width, and the room for the model names and the prompts.
_SHEET_COLUMNS, _SHEET_THUMBNAIL, _SHEET_LABEL, _SHEET_HEADER = 8, 256, 160, 20


def get_metric(name: str) -> Metric:
    """The column of reward ``name``; a reward registered by the user is shown under its own name."""
    if list(parse_reward_spec(name)) != [name]:  # an unknown name fails in the parser, listing the valid ones
        raise ValueError(f"Metric {name!r} must be one reward name, without a weight: one of {available_rewards()}.")
    return METRICS.get(name, Metric(name, name))


def summarize(records: Sequence[Mapping], metrics: Sequence[str], styles: Sequence[str]) -> dict:
    """Per model: ``mean`` of each metric over all images and, with styles, ``by_style`` means and their average."""
    summary = {}
    for model in dict.fromkeys(record["model"] for record in records):
        rows = [record for record in records if record["model"] == model]
        entry = {"images": len(rows), "mean": {name: _mean(rows, name) for name in metrics}}
        if styles:
            entry["by_style"] = {name: _style_means(rows, name, styles) for name in metrics}
        summary[model] = entry
    return summary


def format_table(summary: Mapping[str, Mapping], metrics: Sequence[str], styles: Sequence[str], caption: str) -> str:
    """Markdown: Table 1's layout (means over all images), then Table 3's (per style) for each metric when styled."""
    columns = [get_metric(name) for name in metrics]
    rows = [[model, *(_cell(entry["mean"][m.name], m) for m in columns)] for model, entry in summary.items()]
    sections = [f"{caption}\n\n" + _markdown(["Model", *(f"{m.title} ↑" for m in columns)], rows)]
    for metric in columns if styles else ():
        rows = [
            [model, *(_cell(entry["by_style"][metric.name][key], metric) for key in (*styles, "average"))]
            for model, entry in summary.items()
        ]
        header = ["Model", *(style.capitalize() for style in styles), "Average"]
        sections.append(f"{metric.title} by style (average of the style means)\n\n" + _markdown(header, rows))
    return "\n\n".join(sections) + "\n"


def write_scores(out_dir: str, records: Sequence[Mapping], settings: Mapping, summary: Mapping) -> dict[str, str]:
    """``scores.csv`` (one row per image) and ``scores.json`` (settings, summary and the same rows)."""
    paths = {"csv": os.path.join(out_dir, "scores.csv"), "json": os.path.join(out_dir, "scores.json")}
    with open(paths["csv"], "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    with open(paths["json"], "w", encoding="utf-8") as file:
        json.dump({"settings": settings, "summary": summary, "images": list(records)}, file, indent=1)
    return paths


def write_contact_sheet(out_dir: str, records: Sequence[Mapping]) -> str:
    """``contact_sheet.png``: one row per model (named on the left), its images of the first 8 prompts as columns
    (``#index prompt`` on top), each at most 256 pixels wide; images of that width or less are pasted unscaled."""
    by_model: dict[str, list[Mapping]] = {}
    for record in records:
        by_model.setdefault(record["model"], []).append(record)
    first = next(iter(by_model.values()))[:_SHEET_COLUMNS]
    with Image.open(os.path.join(out_dir, first[0]["image"])) as image:
        width = min(_SHEET_THUMBNAIL, image.width)
        height = round(image.height * width / image.width)
    sheet = Image.new("RGB", (_SHEET_LABEL + len(first) * width, _SHEET_HEADER + len(by_model) * height), "white")
    draw = ImageDraw.Draw(sheet)
    for column, record in enumerate(first):
        caption = textwrap.shorten(f"#{record['index']} {record['prompt']}", max(8, width // 6), placeholder="…")
        draw.text((_SHEET_LABEL + column * width + 2, 4), caption, fill="black")
    for row, (model, rows) in enumerate(by_model.items()):
        top = _SHEET_HEADER + row * height
        draw.multiline_text((4, top + 4), "\n".join(textwrap.wrap(model, 24)[-6:]), fill="black")
        for column, record in enumerate(rows[: len(first)]):
            with Image.open(os.path.join(out_dir, record["image"])) as image:
                image = image.convert("RGB")
                sheet.paste(image if image.size == (width, height) else image.resize((width, height)),
                            (_SHEET_LABEL + column * width, top))
    path = os.path.join(out_dir, "contact_sheet.png")
    sheet.save(path)
    return path


def _mean(rows: Sequence[Mapping], name: str) -> float:
    return sum(row[name] for row in rows) / len(rows)


def _style_means(rows: Sequence[Mapping], name: str, styles: Sequence[str]) -> dict[str, float]:
    # As the HPSv2 benchmark reports it: the average is the mean of the style means.
    means = {style: _mean([row for row in rows if row["style"] == style], name) for style in styles}
    return {**means, "average": sum(means.values()) / len(means)}


def _cell(value: float, metric: Metric) -> str:
    return f"{value:.{metric.decimals}f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---", *(["---:"] * (len(header) - 1))], *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
