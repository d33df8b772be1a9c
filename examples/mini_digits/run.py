#!/usr/bin/env python
"""DI* on real data in minutes: MNIST digits, a trained miniature SDXL reference, the real trainer, independent judges.

    python examples/mini_digits/run.py --out outputs/mini_digits            # the table of docs/mini_study.md
    python examples/mini_digits/run.py --quick --out outputs/mini_quick     # 16×16, one seed, short runs (tests, demo)
    python examples/mini_digits/run.py --family sd3 --out outputs/mini_flow # the study on a flow (SD3) reference

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
import shutil
import statistics
import sys
import time

# First: importing the package installs its log filters (quiet.py) before diffusers imports transformers.
import diffusers_di_star  # noqa: F401

# isort: split
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from build_reference import FAMILIES, QUICK, ReferenceSettings, build_reference, reference_settings  # noqa: E402
from digits_data import digit_prompt, load_digits  # noqa: E402
from judges import frechet_distance, train_classifier, within_class_diversity  # noqa: E402

TRAINER = os.path.join(HERE, os.pardir, "train_di_star_sdxl.py")
REWARD = "boldness"


@dataclasses.dataclass(frozen=True)
class StudySettings:
    reference: ReferenceSettings = ReferenceSettings()  # or flow_reference.FlowReferenceSettings (--family sd3)
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
    an interrupted study continues where it stopped; a folder without that record (a run killed part-way) is the
    study's own and is cleared, so the trainer starts it again instead of refusing the folder.
    """
    from accelerate.state import AcceleratorState

    folder = args[args.index("--output_dir") + 1]
    record = os.path.join(folder, "mini_study_run.json")
    if os.path.isfile(record):
        with open(record) as f:
            done = json.load(f)
        if done["args"] == args:
            return done["seconds"]
    shutil.rmtree(folder, ignore_errors=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    start = time.perf_counter()
    status = trainer.main(trainer.parse_args(args))
    if status != 0:
        raise RuntimeError(f"the trainer exited with status {status} for {args}")
    seconds = time.perf_counter() - start
    with open(record + ".tmp", "w") as f:
        json.dump({"args": args, "seconds": seconds}, f)
    os.replace(record + ".tmp", record)
    return seconds


@torch.no_grad()
def sample(folder: str, settings: StudySettings, seed: int, steps: int, guidance_scale: float):
    """Grey images ``[10·n, 1, R, R]`` in [0, 1] for n per digit prompt, and images/s of the sampler.

    One step: the family's DI* pipeline (``DIStarSDXLPipeline`` / ``DIStarSD3Pipeline``); more: diffusers' own
    (``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline``, Euler; guidance scale 1 is no CFG in both).
    """
    from diffusers_di_star.families import FAMILIES as FAMILY_CLASSES

    family = FAMILY_CLASSES[settings.reference.family]
    resolution, n = settings.reference.resolution, settings.samples_per_class
    prompts = [digit_prompt(d) for d in range(10)]
    if steps == 1:
        pipe = family.pipeline_class().from_pretrained(folder)
        pipe.max_batch_size = None  # 32×32 digits: all 10·n samples in one call, the same noise as before the cap
        kwargs = {}
    else:
        pipe = family.base_pipeline_class().from_pretrained(folder, **BASE_PIPELINE_KWARGS.get(family.name, {}))
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
        label = name.replace("α", "a").replace("σ", "s")  # PIL's default font is ASCII
        draw.text((4, r * cell + cell // 3), label, fill=0)
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
        "machine": f"{platform.machine()}, {available_cores()} cores, torch threads {torch.get_num_threads()}",
    }


@dataclasses.dataclass
class Study:
    """What every scored sampler shares: the data, the reference folder, the judge and the prompt file (stage 1)."""

    settings: StudySettings
    out: str
    digits: dict
    reference: str
    reference_seconds: float
    judge: object
    real_features: torch.Tensor
    judge_accuracy: float
    prompts_file: str

    def trainer_args(self, name: str, seed: int, flags: list[str], settings: StudySettings | None = None):
        """The trainer's flags for one run of method ``name`` (its folder: ``OUT/runs/<name>/seed-<seed>``)."""
        settings = settings or self.settings
        return trainer_args(settings, self.reference, self.prompts_file, self.run_folder(name, seed), seed, flags)

    def run_folder(self, name: str, seed: int) -> str:
        return run_dir(self.out, name, seed)

    def score(self, folder: str, seed: int, steps: int = 1, guidance_scale: float = 0.0):
        """Stage 3: sample ``folder`` (one step: a trained generator) and judge it; (metrics, images)."""
        images, rate = sample(folder, self.settings, seed, steps, guidance_scale)
        return {**evaluate(images, self.judge, self.real_features), "images_per_s": rate}, images


def prepare(out: str, settings: StudySettings, cache: str | None = None) -> Study:
    """Stage 1: build or reuse the reference, train the judge, write the prompt file."""
    os.makedirs(out, exist_ok=True)
    digits = load_digits()
    reference = build_reference(digits, cache or os.path.join(out, "cache"), settings.reference)
    with open(os.path.join(reference, "build.json")) as f:
        reference_seconds = json.load(f)["seconds"]
    resize = lambda x: torch.nn.functional.interpolate(x, size=settings.reference.resolution, mode="area")  # noqa: E731
    judge = train_classifier(resize(digits["train_images"]), digits["train_labels"], settings.classifier_steps)
    real_features, real_predicted = judge.embed(resize(digits["eval_images"]))
    judge_accuracy = float((real_predicted == digits["eval_labels"]).float().mean()) * 100
    prompts_file = os.path.join(out, "prompts.txt")
    with open(prompts_file, "w") as f:
        f.write("\n".join(digit_prompt(d) for d in range(10)) + "\n")
    return Study(
        settings, out, digits, reference, reference_seconds, judge, real_features, judge_accuracy, prompts_file
    )


#: diffusers' SD3 pipeline loads a folder without T5 only when told so (its components default to required).
BASE_PIPELINE_KWARGS = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}}
#: How the row names the one-step map's time: an integer timestep t* (VP families) or a flow time σ* (sd3).
ONE_STEP_TIME = {"sdxl": "t*", "sd3": "σ*"}


def one_step_row(settings: StudySettings) -> str:
    """The untrained one-step map's row, at the family's default time: ``t*=399`` (SDXL) or ``σ*=1`` (SD3)."""
    from diffusers_di_star.families import FAMILIES as FAMILY_CLASSES

    family = settings.reference.family
    time = FAMILY_CLASSES[family].default_conditioning_timestep
    return f"reference one-step map, {ONE_STEP_TIME[family]}={time:g} (untrained)"


def reference_samplers(settings: StudySettings) -> dict[str, tuple[int, float]]:
    """The reference's own samplers: name -> (steps, guidance scale); one step is its untrained one-step map."""
    return {
        f"reference, {settings.sampler_steps} steps, no CFG": (settings.sampler_steps, 1.0),
        f"reference, {settings.sampler_steps} steps, CFG {settings.guidance_scale:g}": (
            settings.sampler_steps,
            settings.guidance_scale,
        ),
        one_step_row(settings): (1, 0.0),
    }


def run_study(out: str, settings: StudySettings, methods=METHODS, cache: str | None = None, workers: int = 1) -> dict:
    start = time.perf_counter()
    study = prepare(out, settings, cache)
    # Seed-major: a study stopped early has every method at its first seeds (rerun it with --seeds N to score them).
    jobs = [
        (name, seed, study.trainer_args(name, seed, flags))
        for seed in settings.seeds
        for name, flags in methods.items()
    ]
    train_seconds = {name: [] for name in methods}
    seconds_by_job = dict(train_many([args for _, _, args in jobs], workers))
    for index, (name, _, _) in enumerate(jobs):
        train_seconds[name].append(seconds_by_job[index])
    samplers = {
        name: (lambda seed: study.reference, steps, guidance)
        for name, (steps, guidance) in reference_samplers(settings).items()
    }
    for name in methods:
        samplers[name] = (lambda seed, name=name: study.run_folder(name, seed), 1, 0.0)
    rows, grids = {}, {}
    for name, (folder_of, steps, guidance) in samplers.items():
        runs = []
        for seed in settings.seeds:
            metrics, images = study.score(folder_of(seed), seed, steps, guidance)
            runs.append(metrics)
            if seed == settings.seeds[0]:
                grids[name] = images
        rows[name] = summarise(runs)
        if name in train_seconds:
            rows[name]["train_s"] = summarise([{"t": t} for t in train_seconds[name]])["t"]
    real_diversity = within_class_diversity(study.real_features, study.digits["eval_labels"])
    real = {"accuracy": study.judge_accuracy, "fd": 0.0, "diversity": real_diversity}
    results = {
        "settings": dataclasses.asdict(settings),
        "environment": environment(),
        "reference_build_seconds": study.reference_seconds,
        "judge_accuracy_held_out": study.judge_accuracy,
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


def train_many(all_args: list[list[str]], workers: int):
    """Stage 2: trainer runs one after another, or in ``workers`` processes; yields (index, seconds) as each ends.

    Workers are spawned with the parent's torch thread count (:func:`set_threads`), so ``--jobs`` processes never
    ask for more threads than the machine has.
    """
    if workers <= 1 or len(all_args) <= 1:
        trainer = load_trainer() if all_args else None
        for index, args in enumerate(all_args):
            yield index, train(trainer, args)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = torch.get_num_threads()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_in_worker, args, threads): index for index, args in enumerate(all_args)}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _train_in_worker(args: list[str], threads: int) -> float:
    torch.set_num_threads(threads)
    return train(load_trainer(), args)  # loaded per run: the script is the repo's current one


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, lowered by a cgroup v2 CPU quota when one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def set_threads(jobs: int) -> int:
    """Caps ``jobs`` at the available cores and gives each job cores // jobs torch threads (at most
    ``OMP_NUM_THREADS`` when that is set); returns the jobs.

    Torch's default (one thread per core in *every* process) oversubscribes a shared machine: ``--quick`` with the
    default threads was still building its reference after 37 min on a loaded 2-core machine, 161 s with one thread.
    """
    cores = available_cores()
    if jobs > cores:
        print(f"--jobs {jobs}: this machine gives {cores} cores, so {cores} trainer runs at a time.")
        jobs = cores
    threads = max(1, cores // jobs)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # an explicit cap still applies
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    torch.set_num_threads(threads)
    return jobs


def run_dir(out: str, name: str, seed: int) -> str:
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


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a count of seeds, steps or jobs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count; give 1 or more")
    return value


def folder(text: str) -> str:
    """argparse type: a folder to write into (it may not exist yet), not a file."""
    if not text:
        raise argparse.ArgumentTypeError("empty path; give a folder")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (it is created if missing)")
    return text


def study_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The flags the study and the sweep share; every one is checked here, before anything is built."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=folder, default=default_out)
    parser.add_argument("--quick", action="store_true", help="16×16 digits, one seed, 20 trainer steps.")
    parser.add_argument(
        "--family", choices=FAMILIES, default="sdxl",
        help="The reference's layout: sdxl (ε-prediction UNet, default) or sd3 (rectified-flow transformer, no T5).",
    )  # fmt: skip
    parser.add_argument(
        "--cache", type=folder, default=None, help="Where the reference is cached (default OUT/cache)."
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help="Number of trainer seeds (default 3; quick 1)."
    )
    parser.add_argument(
        "--train_steps", type=positive_int, default=None, help="Generator updates per run (default 200)."
    )
    parser.add_argument(
        "--jobs", type=positive_int, default=1,
        help="Trainer runs at a time, each in its own process; capped at the cores available, each job gets "
        "cores // jobs torch threads.",
    )  # fmt: skip
    return parser


#: What the full study changes per family. SD3's transformer attends over 280 text tokens (24 CLIP + 256 zero T5
#: tokens) per sample, which makes a trainer step several times an SDXL-layout one here: batch 16 instead of 32.
FAMILY_STUDY = {"sd3": {"batch_size": 16}}


def default_settings(family: str, quick: bool) -> StudySettings:
    """The study's settings with the reference of ``family``: the same judges, samplers and trainer settings
    (the full study's trainer batch aside, :data:`FAMILY_STUDY`)."""
    if quick:
        return dataclasses.replace(QUICK_STUDY, reference=reference_settings(family, quick))
    return StudySettings(reference=reference_settings(family, quick), **FAMILY_STUDY.get(family, {}))


def study_settings(args: argparse.Namespace, settings: StudySettings) -> StudySettings:
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
    if args.train_steps is not None:
        settings = dataclasses.replace(settings, train_steps=args.train_steps)
    return settings


def main(argv=None) -> None:
    args = study_parser("The MNIST mini study of DI* (docs/mini_study.md).", "outputs/mini_digits").parse_args(argv)
    settings = study_settings(args, default_settings(args.family, args.quick))
    jobs = set_threads(args.jobs)
    results = run_study(args.out, settings, cache=args.cache, workers=jobs)
    print(format_table(results))
    print(f"total {results['total_seconds']} s; outputs in {args.out}")


if __name__ == "__main__":
    main()
