#!/usr/bin/env python
"""Reward–fidelity–diversity frontiers of DI*, DI++ and L2 on the MNIST mini study: an α_rew sweep, 3 seeds.

    python examples/mini_digits/sweep.py --out outputs/mini_digits --jobs 2  # docs/mini_study.md frontiers
    python examples/mini_digits/sweep.py --quick --out outputs/sweep_quick   # 2 short runs (what the tests run)

Every method of :data:`SWEEP` is trained at each of its α_rew values (α_rew = 0 is that divergence's pure
distillation baseline) for every seed, with ``run.py``'s settings otherwise; each trained generator is scored by
``run.py``'s judges. One row per finished run is written to ``OUT/sweep.csv`` as soon as it ends (the file is
replaced atomically), and a rerun skips the runs already there, so a killed sweep continues where it stopped.
Adding α_rew values or seeds to the command adds runs and keeps the old ones. ``frontiers.py`` then writes
``OUT/frontier.png`` (reward vs FD and vs diversity, mean ± std over seeds) and ``OUT/frontier.md`` (FD and
diversity interpolated at rewards every method reaches).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

import frontiers
import run  # puts this folder on sys.path and installs the package's log filters

#: method -> (trainer flags, α_rew values). The α_rew ranges run from 0 to where prompt accuracy falls below 90 %
#: (pilot runs, docs/mini_study.md); the regularisers differ in strength, so their ranges differ.
SWEEP = {
    "DI* pseudo-Huber c=1": (["--divergence", "pseudo_huber", "--huber_c", "1"], (0, 3, 10)),
    "DI++ (KL)": (["--divergence", "kl"], (0, 30, 100)),
    "DI* L2": (["--divergence", "l2"], (0, 30, 100)),
    "DI* pseudo-Huber c=10": (["--divergence", "pseudo_huber", "--huber_c", "10"], (0, 3, 10)),
}
#: The tests' sweep, 2 runs: at α_rew = 10⁴ the reward term dominates, so its effect shows within 10 short steps.
QUICK_SWEEP = {"DI* pseudo-Huber c=1": (SWEEP["DI* pseudo-Huber c=1"][0], (0, 10000))}
REFERENCE = "reference"  # the reference rows: its multi-step sampler with CFG (25 steps), per seed
FIELDS = ("method", "alpha_rew", "seed", "accuracy", "fd", "diversity", "reward", "images_per_s", "train_s")


def run_name(method: str, alpha_rew: float) -> str:
    return f"{method} a={alpha_rew:g}"


def read_rows(path: str) -> list[dict]:
    """The CSV's rows with numbers parsed (``alpha_rew`` is None on the reference rows)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in FIELDS[1:]:
            row[key] = float(row[key]) if row[key] != "" else None
        row["seed"] = int(row["seed"])
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """Replaces the CSV atomically: a kill leaves the previous file, never half a row."""
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if row[k] is None else row[k] for k in FIELDS} for row in rows)
    os.replace(path + ".tmp", path)


def check_settings(out: str, settings: run.StudySettings) -> None:
    """A sweep folder holds runs of one setting: refuse other settings instead of mixing their rows."""
    path = os.path.join(out, "sweep_settings.json")
    current = json.loads(json.dumps(dataclasses.asdict(settings)))
    current.pop("seeds"), current.pop("reward_scale")  # seeds and α_rew may be added to a sweep
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise SystemExit(f"sweep.py: error: {out} holds a sweep with other settings ({', '.join(changed)}); "
                             "use another --out")  # fmt: skip
    else:
        os.makedirs(out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(current, f, indent=2)


def run_sweep(out: str, settings: run.StudySettings, sweep=SWEEP, cache: str | None = None, workers: int = 1):
    """Trains and scores every (method, α_rew, seed) of ``sweep`` not yet in ``OUT/sweep.csv``; returns all rows."""
    start = time.perf_counter()
    check_settings(out, settings)
    csv_path = os.path.join(out, "sweep.csv")
    rows = read_rows(csv_path)
    done = {(r["method"], r["alpha_rew"], r["seed"]) for r in rows}
    study = run.prepare(out, settings, cache)
    reference_steps, guidance = settings.sampler_steps, settings.guidance_scale
    for seed in settings.seeds:
        if (REFERENCE, None, seed) not in done:
            metrics, _ = study.score(study.reference, seed, reference_steps, guidance)
            rows.append({"method": REFERENCE, "alpha_rew": None, "seed": seed, **metrics, "train_s": None})
            write_rows(csv_path, rows)
    # Seed by seed, and within a seed α_rew outwards from 0 for every method at once: a sweep stopped early has
    # comparable ranges for every method.
    todo = sorted(
        ((alpha, method, seed) for method, (_, alphas) in sweep.items() for alpha in alphas for seed in settings.seeds
         if (method, float(alpha), seed) not in done),
        key=lambda job: (job[2], sorted(sweep[job[1]][1]).index(job[0]), list(sweep).index(job[1])),
    )  # fmt: skip
    all_args = [
        study.trainer_args(
            run_name(method, alpha), seed, sweep[method][0], dataclasses.replace(settings, reward_scale=alpha)
        )
        for alpha, method, seed in todo
    ]
    print(f"sweep: {len(done)} runs already in {csv_path}, {len(todo)} to go")
    for index, seconds in run.train_many(all_args, workers):
        alpha, method, seed = todo[index]
        metrics, _ = study.score(study.run_folder(run_name(method, alpha), seed), seed)
        rows.append({"method": method, "alpha_rew": float(alpha), "seed": seed, **metrics, "train_s": seconds})
        write_rows(csv_path, rows)
        print(f"{method} α_rew={alpha:g} seed {seed}: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in FIELDS[3:7]))
    _record_session(out, time.perf_counter() - start, len(todo))
    return rows


def _record_session(out: str, seconds: float, runs: int) -> None:
    """Appends this invocation's wall time to ``OUT/sweep_sessions.json`` (a resumed sweep has several)."""
    path = os.path.join(out, "sweep_sessions.json")
    sessions = json.load(open(path)) if os.path.isfile(path) else []
    sessions.append({"seconds": round(seconds, 1), "runs": runs, "environment": run.environment()})
    with open(path + ".tmp", "w") as f:
        json.dump(sessions, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    parser = run.study_parser(__doc__.split("\n")[0], "outputs/mini_digits")
    parser.add_argument(
        "--methods", nargs="+", choices=sorted(SWEEP), default=None, help="Sweep only these methods (default all)."
    )
    args = parser.parse_args(argv)
    sweep = QUICK_SWEEP if args.quick else SWEEP
    if args.methods:
        sweep = {name: SWEEP[name] for name in args.methods}
    settings = run.study_settings(args, run.default_settings(args.family, args.quick))
    jobs = run.set_threads(args.jobs)
    rows = run_sweep(args.out, settings, sweep, cache=args.cache, workers=jobs)
    frontiers.write(rows, args.out)
    print(open(os.path.join(args.out, "frontier.md")).read())


if __name__ == "__main__":
    main()
