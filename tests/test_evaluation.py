"""`di-star eval` / `diffusers_di_star.evaluation` on the tiny SDXL with tiny rewards in their published layouts.

What must hold: the table is the mean of per-image scores that equal scoring the saved images directly (in the
paper's scales); an interrupted run resumes without redoing finished prompts and ends where an uninterrupted run
ends; images depend on the seed and the prompt only; prompt sets come from files, the HPSv2 layout, an installed
hpsv2 or its cache, and a Hub set that is offline fails with one line that says what to download.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig

from diffusers_di_star.cli import main
from diffusers_di_star.evaluation import (
    HPS_STYLES,
    EvaluationError,
    ModelSpec,
    PromptSetError,
    evaluate,
    generate_images,
    image_seed,
    load_model,
    load_prompt_set,
    runner,
)
from diffusers_di_star.rewards import load_reward
from diffusers_di_star.rewards.testing import (
    save_tiny_aesthetic,
    save_tiny_bert_tokenizer,
    save_tiny_clip,
    save_tiny_hps,
    save_tiny_image_reward,
)

PROMPTS = ["a cat wearing sunglasses", "a fox in a snowy forest", "a red chair"]
METRICS = ["imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1"]


@pytest.fixture(scope="module")
def reward_options(tmp_path_factory):
    """Loader options of the five metrics, pointing at tiny checkpoints in their published layouts."""
    root = tmp_path_factory.mktemp("tiny-rewards")
    clip = save_tiny_clip(root / "clip")
    bert = save_tiny_bert_tokenizer(root / "bert")
    return {
        "imagereward": {
            "model": save_tiny_image_reward(root / "image-reward", len(AutoTokenizer.from_pretrained(bert))),
            "tokenizer": bert,
        },
        "aesthetic": {"model": save_tiny_aesthetic(root / "aesthetic"), "clip": clip},
        "pickscore": {"model": clip, "processor": clip},
        "clip": {"model": clip},
        "hpsv2.1": {"checkpoint": save_tiny_hps(root / "hps", CLIPConfig.from_pretrained(clip)), "processor": clip},
    }


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return str(path)


def run_eval(model_dir, prompt_file, out_dir, reward_options, **kwargs):
    settings = {"metrics": METRICS, "batch_size": 2, "device": "cpu", "reward_options": reward_options} | kwargs
    return evaluate([ModelSpec(model_dir)], load_prompt_set(prompt_file), out_dir, **settings)


@pytest.fixture(scope="module")
def reference(tiny_sdxl_dir, prompt_file, reward_options, tmp_path_factory):
    """An uninterrupted run: 3 prompts in batches of 2, seed 0."""
    out_dir = tmp_path_factory.mktemp("reference")
    return out_dir, run_eval(tiny_sdxl_dir, prompt_file, out_dir, reward_options)


def read_pixels(out_dir, records):
    images = [np.asarray(Image.open(os.path.join(out_dir, record["image"]))) for record in records]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def test_table_is_the_mean_of_scores_of_the_saved_images(reference, reward_options, tiny_sdxl_dir):
    out_dir, result = reference
    records = result.records
    assert [record["prompt"] for record in records] == PROMPTS
    assert [record["seed"] for record in records] == [image_seed(0, i) for i in range(3)] == [0, 1, 2]

    # Scoring the saved PNGs directly gives the recorded scores; PickScore is reported in the paper's scale (/100).
    reward = load_reward(",".join(METRICS), **reward_options)
    with torch.no_grad():
        direct = reward.components(read_pixels(out_dir, records), PROMPTS)
    for name in METRICS:
        expected = direct[name] / 100 if name == "pickscore" else direct[name]
        recorded = torch.tensor([record[name] for record in records])
        torch.testing.assert_close(recorded, expected, atol=1e-5, rtol=1e-5)

    # The table: one row per model, the paper's Table 1 columns, cells = means in the paper's precision.
    lines = result.table.strip().splitlines()
    assert lines[2] == "| Model | ImageReward ↑ | Aesthetic ↑ | PickScore ↑ | CLIP ↑ | HPSv2.1 ↑ |"
    cells = lines[4].strip("| ").split(" | ")
    assert len(lines) == 5 and cells[0] == tiny_sdxl_dir
    means = [sum(record[name] for record in records) / 3 for name in METRICS]
    assert cells[1:] == [f"{means[0]:.3f}", f"{means[1]:.2f}", f"{means[2]:.4f}", f"{means[3]:.2f}", f"{means[4]:.2f}"]
    with open(result.files["table"], encoding="utf-8") as file:
        assert file.read() == result.table

    # Per-image scores as CSV and JSON, and the contact sheet (one row, three 64x64 images, labels left and top).
    with open(result.files["csv"], encoding="utf-8") as file:
        header, *rows = file.read().splitlines()
    assert header.split(",") == ["model", "index", "style", "prompt", "seed", "image", *METRICS] and len(rows) == 3
    with open(result.files["json"], encoding="utf-8") as file:
        saved = json.load(file)
    assert saved["images"] == records and saved["settings"]["metrics"] == METRICS
    assert saved["summary"][tiny_sdxl_dir]["mean"] == pytest.approx(dict(zip(METRICS, means, strict=True)))
    assert Image.open(result.files["contact_sheet"]).size == (160 + 3 * 64, 20 + 64)


def test_interrupted_run_resumes_without_redoing_finished_prompts(
    reference, tiny_sdxl_dir, prompt_file, reward_options, tmp_path, monkeypatch
):
    generated = []

    def interrupted_after_one_batch(pipe, spec, prompts, *args, **kwargs):
        if generated:
            raise KeyboardInterrupt
        generated.append([prompt.index for prompt in prompts])
        return generate_images(pipe, spec, prompts, *args, **kwargs)

    monkeypatch.setattr(runner, "generate_images", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run_eval(tiny_sdxl_dir, prompt_file, tmp_path, reward_options)
    assert generated == [[0, 1]]
    scores = tmp_path / ModelSpec(tiny_sdxl_dir).folder / "scores.jsonl"
    assert len(scores.read_text().splitlines()) == 2

    # A crash in the middle of writing a line leaves half a line: it is dropped and its prompt is redone.
    with open(scores, "a", encoding="utf-8") as file:
        file.write('{"index": 2, "sty')
    resumed = []

    def recording(pipe, spec, prompts, *args, **kwargs):
        resumed.append([prompt.index for prompt in prompts])
        return generate_images(pipe, spec, prompts, *args, **kwargs)

    monkeypatch.setattr(runner, "generate_images", recording)
    result = run_eval(tiny_sdxl_dir, prompt_file, tmp_path, reward_options)
    assert resumed == [[2]]
    assert result.records == reference[1].records
    assert result.table == reference[1].table

    # A finished run loads neither a model nor a reward: it only rewrites the report.
    def must_not_load(*args, **kwargs):
        raise AssertionError("a finished run must not load anything")

    monkeypatch.setattr(runner, "load_reward", must_not_load)
    result = run_eval(tiny_sdxl_dir, prompt_file, tmp_path, reward_options, load_pipeline=must_not_load)
    assert result.records == reference[1].records


def test_images_depend_on_the_seed_and_the_prompt_only(
    reference, tiny_sdxl_dir, prompt_file, reward_options, tmp_path, capsys
):
    out_dir, result = reference
    prompts, spec = load_prompt_set(prompt_file).select(), ModelSpec(tiny_sdxl_dir)
    pipe = load_model(spec, device="cpu")

    def pixels_of(seed):
        return [np.asarray(image, dtype=np.int16) for image in generate_images(pipe, spec, prompts, seed)]

    pixels = pixels_of(0)
    saved = [np.asarray(Image.open(os.path.join(out_dir, r["image"])), dtype=np.int16) for r in result.records]
    assert all(np.array_equal(again, first) for again, first in zip(pixels_of(0), pixels, strict=True))
    assert np.abs(pixels_of(1)[0] - pixels[0]).mean() > 1

    # Batch size 3 instead of 2 changes pixels by float rounding only; the scores follow.
    for batched, alone in zip(pixels, saved, strict=True):
        assert np.abs(batched - alone).max() <= 1 and (batched != alone).mean() < 0.01
    rerun = run_eval(tiny_sdxl_dir, prompt_file, tmp_path, reward_options, batch_size=3)
    for new, old in zip(rerun.records, result.records, strict=True):
        assert [new[name] for name in METRICS] == pytest.approx([old[name] for name in METRICS], rel=1e-3, abs=1e-4)

    # `di-star generate --seed seed * 1000000 + i` regenerates image i on its own.
    generate = ["generate", "--model", tiny_sdxl_dir, "--prompt", PROMPTS[1], "--seed", "1", "--out", str(tmp_path)]
    assert main(generate) == 0
    path = capsys.readouterr().out.strip()
    assert np.abs(np.asarray(Image.open(path), dtype=np.int16) - saved[1]).max() <= 1


def test_a_folder_is_resumed_only_with_the_same_settings(reference, tiny_sdxl_dir, prompt_file, reward_options):
    out_dir, _ = reference
    with pytest.raises(EvaluationError, match=r"run.json was written by a run with other settings: seed=0 \(now 1\)"):
        run_eval(tiny_sdxl_dir, prompt_file, out_dir, reward_options, seed=1)
    with pytest.raises(EvaluationError, match=r"model.json .* dtype='fp32' \(now 'bf16'\)"):
        evaluate([ModelSpec(tiny_sdxl_dir, dtype="bf16")], load_prompt_set(prompt_file), out_dir, metrics=METRICS)
    with pytest.raises(EvaluationError, match="guidance_scale=3.0 needs steps > 1"):
        ModelSpec(tiny_sdxl_dir, guidance_scale=3.0)


def write_style_files(folder, prompts_per_style=2):
    os.makedirs(folder, exist_ok=True)
    for style in HPS_STYLES:
        texts = [f"a {style} picture of a cat number {i}" for i in range(prompts_per_style)]
        (folder / f"{style}.json").write_text(json.dumps(texts))
    return folder


def test_prompt_files_and_the_hpsv2_layout(tmp_path, monkeypatch):
    (tmp_path / "list.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "styles.json").write_text(json.dumps({"x": ["a", "b"], "y": ["c"]}))
    assert [p.text for p in load_prompt_set(str(tmp_path / "list.json")).prompts] == ["a", "b"]
    styled = load_prompt_set(str(tmp_path / "styles.json"))
    assert styled.styles == ("x", "y") and [(p.index, p.style) for p in styled.select(1)] == [(0, "x"), (2, "y")]

    folder = load_prompt_set(str(write_style_files(tmp_path / "benchmark")))
    assert folder.styles == HPS_STYLES and len(folder.prompts) == 8 and len(folder.select(1)) == 4

    # `--prompts hpsv2` reads an installed hpsv2 package's files (located, never imported), then hpsv2's cache.
    package = tmp_path / "site" / "hpsv2"
    write_style_files(package / "benchmark" / "datasets", prompts_per_style=3)
    (package / "__init__.py").write_text("raise ImportError('hpsv2 must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert len(load_prompt_set("hpsv2").prompts) == 12
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry != str(tmp_path / "site")])
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps-root"))
    write_style_files(tmp_path / "hps-root" / "datasets" / "benchmark", prompts_per_style=1)
    hpsv2 = load_prompt_set("hpsv2")
    assert hpsv2.name == "hpsv2" and hpsv2.styles == HPS_STYLES and len(hpsv2.prompts) == 4

    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "benchmark" / "photo.json").unlink()
    for source, message in [
        (tmp_path / "empty.txt", "holds no prompts"),
        (tmp_path / "benchmark", r"photo.json missing. Download benchmark/\{anime,concept-art,paintings,photo\}"),
        (tmp_path / "nope.txt", "neither one of parti, coco, hpsv2 nor an existing file or folder"),
    ]:
        with pytest.raises(PromptSetError, match=message):
            load_prompt_set(str(source))


def test_hub_prompt_sets_read_their_published_columns(monkeypatch):
    """Parti: column `Prompt` in order; COCO: the first caption of each image, images by id (tiny local stand-ins)."""
    datasets = pytest.importorskip("datasets")
    tables = {
        ("nateraw/parti-prompts", "train"): {"Prompt": ["a b", " c "], "Category": ["x", "y"]},
        ("phiyodr/coco2017", "validation"): {"image_id": [9, 3], "captions": [["nine", "9"], ["three", "3"]]},
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split: datasets.Dataset.from_dict(tables[repo, split]))
    assert [p.text for p in load_prompt_set("parti").prompts] == ["a b", "c"]
    assert [(p.index, p.text) for p in load_prompt_set("coco").prompts] == [(0, "three"), (1, "nine")]


def test_offline_errors_are_one_line_saying_what_to_download(tmp_path, tiny_sdxl_dir, prompt_file):
    """Hub prompt sets and default reward checkpoints, with HF_HUB_OFFLINE=1 and an empty cache."""
    commands = [["--prompts", name] for name in ("parti", "coco", "hpsv2")]
    commands.append(["--prompts", prompt_file, "--metrics", "clip"])
    script = "from diffusers_di_star.cli import main\n" + "".join(
        f"main(['eval', '--model', {tiny_sdxl_dir!r}, '--out', {str(tmp_path / 'out')!r}, *{args!r}])\n"
        for args in commands
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HPS_ROOT": str(tmp_path / "hps")}
    # 600 s bounds a hang only: on a loaded 2-core machine importing torch and diffusers alone has taken 48 s
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    # Our error lines only: an optional package (bitsandbytes, torchvision notes, ...) may print its own lines.
    lines = [line for line in done.stderr.splitlines() if line.startswith("di-star eval: error: ")]
    assert len(lines) == 4 and "Traceback" not in done.stderr, done.stderr
    parti, coco, hpsv2, clip = lines
    assert "Hub dataset 'nateraw/parti-prompts'" in parti and "datasets.load_dataset('nateraw/parti-prompts'" in parti
    assert "Hub dataset 'phiyodr/coco2017'" in coco and "HF_HUB_OFFLINE" in coco
    assert "hf download zhwang/HPDv2 --repo-type dataset --include 'benchmark/*.json'" in hpsv2
    assert "--reward 'clip': a checkpoint is not in the local Hugging Face cache" in clip
    assert "`hf download openai/" in clip and "--reward-option clip.model=PATH" in clip


def test_cli_end_to_end_on_the_hpsv2_layout(tiny_sdxl_dir, reward_options, tmp_path, capsys):
    benchmark = write_style_files(tmp_path / "benchmark")
    out = tmp_path / "out"
    options = [f"--reward-option=hpsv2.1.{key}={value}" for key, value in reward_options["hpsv2.1"].items()]
    options += [f"--reward-option=pickscore.{key}={value}" for key, value in reward_options["pickscore"].items()]
    args = ["eval", "--model", tiny_sdxl_dir, "--prompts", str(benchmark), "--num-prompts", "1", "--out", str(out)]
    args += ["--metrics", "hpsv2.1,pickscore", "--batch-size", "3", "--device", "cpu", *options]
    assert main(args) == 0
    # A multi-step baseline (SDXL's Euler sampler with CFG) joins the same table as a second row.
    assert main([*args, "--steps", "2", "--guidance-scale", "3"]) == 0
    output = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table in output and f"table: {out / 'table.md'}" in output
    assert "| Model | HPSv2.1 ↑ | PickScore ↑ |" in table
    assert table.count("| Model | Anime | Concept-art | Paintings | Photo | Average |") == 2
    assert f"| {tiny_sdxl_dir} (2 steps, CFG 3) |" in table and table.count(f"| {tiny_sdxl_dir} |") == 3

    summary = json.loads((out / "scores.json").read_text())["summary"]
    for entry in summary.values():
        by_style = entry["by_style"]["hpsv2.1"]
        assert entry["images"] == 4
        assert by_style["average"] == pytest.approx(sum(by_style[style] for style in HPS_STYLES) / 4)
    assert len(list((out / f"{ModelSpec(tiny_sdxl_dir, 2, 3.0).folder}" / "images").iterdir())) == 4

    for bad, message in [
        (["--reward-option", "pickscore=/x"], "--reward-option 'pickscore=/x' must look like NAME.OPTION=VALUE"),
        (["--guidance-scale", "3"], "guidance_scale=3.0 needs steps > 1"),
        (["--metrics", "pickscore,nope"], "Unknown reward 'nope'"),
    ]:
        assert main([*args[: -len(options)], *bad]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("di-star eval: error: ") and message in error and "\n" not in error


def test_contact_sheet_cells_are_the_saved_images(tmp_path):
    from diffusers_di_star.evaluation.report import write_contact_sheet

    rng = np.random.default_rng(0)
    records = []
    for model in ("base", "a/very/long/path/to/a/di-star-finetune"):
        for index in range(10):  # more prompts than the sheet's 8 columns
            name = f"{model.replace('/', '_')}_{index}.png"
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
            records.append({"model": model, "index": index, "prompt": f"prompt {index}", "image": name})
    sheet = np.asarray(Image.open(write_contact_sheet(str(tmp_path), records)))
    assert sheet.shape == (20 + 2 * 48, 160 + 8 * 64, 3)
    for i, record in enumerate(records):
        row, column = divmod(i, 10)
        if column < 8:  # the first 8 prompts of each model, in order
            cell = sheet[20 + row * 48 : 20 + (row + 1) * 48, 160 + column * 64 : 160 + (column + 1) * 64]
            np.testing.assert_array_equal(cell, np.asarray(Image.open(tmp_path / record["image"])))
    assert (sheet[:20, 160:] < 128).any() and (sheet[20:, :160] < 128).any()  # prompt and model labels are drawn
