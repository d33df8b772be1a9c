#!/usr/bin/env python
"""DI* on real data in minutes: MNIST digits, a trained miniature SDXL reference, the real trainer, independent judges.

    python examples/mini_digits/run.py --out outputs/mini_digits            # the table of docs/mini_study.md
    python examples/mini_digits/run.py --quick --out outputs/mini_quick     # 16×16, one seed, short runs (tests, demo)

Steps: (1) build or reuse the reference (``build_reference.py``) and the judge (``judges.py``); (2) sample the
reference with 25 Euler steps, with and without CFG, and its untrained one-step map at t* = 399; (3) run
``examples/train_di_star_sdxl.py`` (its ``parse_args`` and ``main``, in this process) once per method and seed, all
with the same prompts, seeds, step budget and optimiser; (4) score every sampler on the same prompts and noise seeds:
prompt accuracy, Fréchet distance and within-class diversity in the judge's feature space, the ``boldness`` reward,
images/s; write ``results.json``, ``table.md`` and ``samples.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

# First: importing the package installs its log filters (quiet.py) before diffusers imports transformers.
import diffusers_di_star  # noqa: F401

# isort: split
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from build_reference import QUICK, ReferenceSettings, build_reference  # noqa: E402
from digits_data import digit_prompt, load_digits  # noqa: E402
from judges import frechet_distance, train_classifier, within_class_diversity  # noqa: E402

TRAINER = os.path.join(HERE, os.pardir, "train_di_star_sdxl.py")
REWARD = "boldness"


@dataclasses.dataclass(frozen=True)
class StudySettings:
    reference: ReferenceSettings = ReferenceSettings()
    classifier_steps: int = 800
    samples_per_class: int = 50
    guidance_scale: float = 2.0
    sampler_steps: int = 25
    train_steps: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-4
    assistant_learning_rate: float = 1e-4
    assistant_updates: int = 2
    reward_scale: float = 2.0
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK_STUDY = StudySettings(
    reference=QUICK, classifier_steps=300, samples_per_class=20, train_steps=20, batch_size=16, seeds=(0,)
)

#: Trainer rows: name -> trainer flags. All share the step budget, seeds, prompts and optimiser.
METHODS = {
    "DI* α_rew=0 (SIM)": ["--divergence", "pseudo_huber", "--reward_scale", "0"],
    "DI* pseudo-Huber + reward": ["--divergence", "pseudo_huber"],
    "DI* L2 + reward": ["--divergence", "l2"],
    "DI++ (KL) + reward": ["--divergence", "kl"],
    # d'(y) = y / sqrt(‖y‖² + c²) → 0 as c → ∞: pseudo-Huber with c = 1e12 switches the regulariser off.
    "reward only": ["--divergence", "pseudo_huber", "--huber_c", "1e12"],
}


def load_trainer():
    spec = importlib.util.spec_from_file_location("train_di_star_sdxl", TRAINER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_args(settings: StudySettings, reference: str, prompts_file: str, out: str, seed: int, flags: list[str]):
    return [
        "--pretrained_model_name_or_path", reference, "--train_data_file", prompts_file, "--output_dir", out,
        "--resolution", str(settings.reference.resolution), "--train_batch_size", str(settings.batch_size),
        "--max_train_steps", str(settings.train_steps), "--learning_rate", str(settings.learning_rate),
        "--assistant_learning_rate", str(settings.assistant_learning_rate),
        "--assistant_updates_per_step", str(settings.assistant_updates),
        "--guidance_scale", str(settings.guidance_scale),
        "--reward", REWARD, "--reward_scale", str(settings.reward_scale), "--seed", str(seed),
        "--report_to", "none", "--checkpointing_steps", str(10 * settings.train_steps), *flags,
    ]  # fmt: skip


def train(trainer, args: list[str]) -> float:
    """One in-process trainer run (a fresh ``accelerate launch`` each: accelerate's global state is reset).

    Returns its wall time. A run whose folder already records a finished run with the same arguments is reused, so
    an interrupted study continues where it stopped.
    """
    from accelerate.state import AcceleratorState

    record = os.path.join(args[args.index("--output_dir") + 1], "mini_study_run.json")
    if os.path.isfile(record):
        with open(record) as f:
            done = json.load(f)
        if done["args"] == args:
            return done["seconds"]
    AcceleratorState._reset_state(reset_partial_state=True)
    start = time.perf_counter()
    status = trainer.main(trainer.parse_args(args))
    if status != 0:
        raise RuntimeError(f"the trainer exited with status {status} for {args}")
    seconds = time.perf_counter() - start
    with open(record, "w") as f:
        json.dump({"args": args, "seconds": seconds}, f)
    return seconds


@torch.no_grad()
def sample(folder: str, settings: StudySettings, seed: int, steps: int, guidance_scale: float):
    """Grey images ``[10·n, 1, R, R]`` in [0, 1] for n per digit prompt, and images/s of the sampler."""
    from diffusers import StableDiffusionXLPipeline

    from diffusers_di_star import DIStarSDXLPipeline

    resolution, n = settings.reference.resolution, settings.samples_per_class
    prompts = [digit_prompt(d) for d in range(10)]
    if steps == 1:
        pipe = DIStarSDXLPipeline.from_pretrained(folder)
        kwargs = {}
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    images = pipe(
        prompts,
        num_images_per_prompt=n,
        height=resolution,
        width=resolution,
        generator=torch.Generator().manual_seed(1000 + seed),
        output_type="pt",
        **kwargs,
    ).images
    seconds = time.perf_counter() - start
    return images.float().mean(dim=1, keepdim=True), len(images) / seconds


def evaluate(images, judge, real_features) -> dict[str, float]:
    from diffusers_di_star.rewards import load_reward

    n = len(images) // 10
    labels = torch.arange(10).repeat_interleave(n)
    features, predicted = judge.embed(images)
    reward = load_reward(REWARD)(images.repeat(1, 3, 1, 1), [digit_prompt(int(d)) for d in labels])
    return {
        "accuracy": float((predicted == labels).float().mean()) * 100,
        "fd": frechet_distance(features, real_features),
        "diversity": within_class_diversity(features, labels),
        "reward": float(reward.mean()),
    }


def summarise(runs: list[dict]) -> dict[str, tuple[float, float]]:
    keys = runs[0].keys()
    return {
        k: (statistics.fmean(r[k] for r in runs), statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0)
        for k in keys
    }


def save_grid(rows: dict[str, torch.Tensor], path: str, per_row: int = 10) -> None:
    """One row per sampler: the first sample of each digit prompt (seed 0), labelled."""
    from PIL import Image, ImageDraw

    size = next(iter(rows.values())).shape[-1]
    scale = max(1, 48 // size)
    cell, label_width = size * scale, 250
    grid = Image.new("L", (label_width + per_row * cell, len(rows) * cell), 255)
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(rows.items()):
        n = len(images) // 10
        draw.text((4, r * cell + cell // 3), name.replace("α", "a"), fill=0)  # PIL's default font is ASCII
        for d in range(per_row):
            tile = (images[d * n, 0].clamp(0, 1) * 255).byte().numpy()
            grid.paste(Image.fromarray(tile).resize((cell, cell), Image.NEAREST), (label_width + d * cell, r * cell))
    grid.save(path)


def environment() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
    }


def run_study(
    out: str, settings: StudySettings, methods=METHODS, cache: str | None = None, workers: int = 1
) -> dict:
    os.makedirs(out, exist_ok=True)
    digits = load_digits()
    start = time.perf_counter()
    reference = build_reference(digits, cache or os.path.join(out, "cache"), settings.reference)
    reference_seconds = json.load(open(os.path.join(reference, "build.json")))["seconds"]
    resize = lambda x: torch.nn.functional.interpolate(x, size=settings.reference.resolution, mode="area")  # noqa: E731
    judge = train_classifier(resize(digits["train_images"]), digits["train_labels"], settings.classifier_steps)
    real_features, real_predicted = judge.embed(resize(digits["eval_images"]))
    judge_accuracy = float((real_predicted == digits["eval_labels"]).float().mean()) * 100
    prompts_file = os.path.join(out, "prompts.txt")
    with open(prompts_file, "w") as f:
        f.write("\n".join(digit_prompt(d) for d in range(10)) + "\n")

    samplers = {
        f"reference, {settings.sampler_steps} steps, no CFG": (lambda seed: reference, settings.sampler_steps, 1.0),
        f"reference, {settings.sampler_steps} steps, CFG {settings.guidance_scale:g}": (
            lambda seed: reference, settings.sampler_steps, settings.guidance_scale
        ),
        "reference one-step map, t*=399 (untrained)": (lambda seed: reference, 1, 0.0),
    }
    rows, grids = {}, {}
    jobs = [
        (name, trainer_args(settings, reference, prompts_file, _run_dir(out, name, seed), seed, flags))
        for name, flags in methods.items()
        for seed in settings.seeds
    ]
    train_seconds = {name: [] for name in methods}
    for (name, _), seconds in zip(jobs, _train_all([args for _, args in jobs], workers), strict=True):
        train_seconds[name].append(seconds)
    for name in methods:
        samplers[name] = (lambda seed, name=name: _run_dir(out, name, seed), 1, 0.0)
    for name, (folder_of, steps, guidance) in samplers.items():
        runs = []
        for seed in settings.seeds:
            images, rate = sample(folder_of(seed), settings, seed, steps, guidance)
            runs.append({**evaluate(images, judge, real_features), "images_per_s": rate})
            if seed == settings.seeds[0]:
                grids[name] = images
        rows[name] = summarise(runs)
        if name in train_seconds:
            rows[name]["train_s"] = summarise([{"t": t} for t in train_seconds[name]])["t"]
    real_diversity = within_class_diversity(real_features, digits["eval_labels"])
    real = {"accuracy": judge_accuracy, "fd": 0.0, "diversity": real_diversity}
    results = {
        "settings": dataclasses.asdict(settings),
        "environment": environment(),
        "reference_build_seconds": reference_seconds,
        "judge_accuracy_held_out": judge_accuracy,
        "real_held_out": real,
        "rows": rows,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(format_table(results))
    save_grid(grids, os.path.join(out, "samples.png"))
    return results


def _train_all(all_args: list[list[str]], workers: int) -> list[float]:
    """Trainer runs one after another, or in ``workers`` processes (one torch thread each)."""
    if workers <= 1:
        trainer = load_trainer() if all_args else None
        return [train(trainer, args) for args in all_args]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_train_in_worker, all_args))


def _train_in_worker(args: list[str]) -> float:
    torch.set_num_threads(1)
    return train(load_trainer(), args)  # loaded per run: the script is the repo's current one


def _run_dir(out: str, name: str, seed: int) -> str:
    return os.path.join(out, "runs", _slug(name), f"seed-{seed}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.encode("ascii", "ignore").decode()).strip("-").lower()


def format_table(results: dict) -> str:
    def cell(row, key, digits):
        if key not in row:
            return "–"
        mean, std = row[key]
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"

    lines = [
        "| sampler | prompt acc. % ↑ | FD ↓ | diversity | boldness reward | images/s | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    real = results["real_held_out"]
    lines.append(f"| held-out real digits | {real['accuracy']:.1f} | 0 | {real['diversity']:.2f} | – | – | – |")
    for name, row in results["rows"].items():
        lines.append(
            f"| {name} | {cell(row, 'accuracy', 1)} | {cell(row, 'fd', 2)} | {cell(row, 'diversity', 2)} | "
            f"{cell(row, 'reward', 3)} | {cell(row, 'images_per_s', 0)} | {cell(row, 'train_s', 0)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="The MNIST mini study of DI* (docs/mini_study.md).")
    parser.add_argument("--out", default="outputs/mini_digits")
    parser.add_argument("--quick", action="store_true", help="16×16 digits, one seed, 20 trainer steps.")
    parser.add_argument("--cache", default=None, help="Where the reference is cached (default OUT/cache).")
    parser.add_argument("--seeds", type=int, default=None, help="Number of trainer seeds (default 3; quick 1).")
    parser.add_argument("--train_steps", type=int, default=None, help="Generator updates per run (default 200).")
    parser.add_argument("--jobs", type=int, default=1, help="Trainer runs in parallel processes (1 thread each).")
    args = parser.parse_args(argv)
    settings = QUICK_STUDY if args.quick else StudySettings()
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
    if args.train_steps is not None:
        settings = dataclasses.replace(settings, train_steps=args.train_steps)
    results = run_study(args.out, settings, cache=args.cache, workers=args.jobs)
    print(format_table(results))
    print(f"total {results['total_seconds']} s; outputs in {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    main()
