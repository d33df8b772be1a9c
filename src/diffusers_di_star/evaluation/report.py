"""Metrics in the paper's scales, and what an evaluation writes: per-image scores, the Markdown table, an image grid.

The table has the paper's layout: one row per model; Table 1's columns (ImageReward, Aesthetic, PickScore, CLIP,
means over all images) and, for a prompt set with styles, Table 3's (HPS per style and their average).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from diffusers.utils import make_image_grid
from PIL import Image

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
_GRID_COLUMNS, _GRID_THUMBNAIL = 8, 256


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


def write_grid(out_dir: str, records: Sequence[Mapping]) -> str:
    """``grid.png``: one row per model, up to 8 prompts spread over the evaluated ones, 256-pixel thumbnails."""
    by_model: dict[str, list[Mapping]] = {}
    for record in records:
        by_model.setdefault(record["model"], []).append(record)
    count = len(next(iter(by_model.values())))
    picked = range(0, count, max(1, count // _GRID_COLUMNS))[:_GRID_COLUMNS]
    images = [
        Image.open(os.path.join(out_dir, rows[i]["image"])).convert("RGB")
        for rows in by_model.values()
        for i in picked
    ]
    size = min(_GRID_THUMBNAIL, images[0].width)
    path = os.path.join(out_dir, "grid.png")
    make_image_grid(images, rows=len(by_model), cols=len(picked), resize=size).save(path)
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
