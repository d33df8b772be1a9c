"""Frontiers of the α_rew sweep (``sweep.py``): per-method curves, values at matched rewards, the figure and table.

A method's frontier is its runs ordered by α_rew. At a reward level r, a seed's FD (or diversity, accuracy) is read
off that seed's frontier by linear interpolation between the two α_rew values whose rewards bracket r (the first
such pair from α_rew = 0); the table gives the mean ± std of those values over seeds. The levels are spread over
the rewards that every seed of every method reaches, so no value is extrapolated. A seed with a single finished run
(a sweep stopped early) counts in the per-α_rew means but has no frontier to read.
"""

from __future__ import annotations

import os
import statistics

__all__ = ["matched_levels", "matched_table", "points", "read_at", "write"]

METRICS = ("reward", "fd", "diversity", "accuracy")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _curves(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(method, seed) -> that seed's runs ordered by α_rew, for seeds with 2 runs or more (a frontier; the reference
    rows and a seed of an unfinished sweep with one run are not)."""
    curves = {}
    for row in rows:
        if row["alpha_rew"] is not None:
            curves.setdefault((row["method"], row["seed"]), []).append(row)
    return {key: sorted(runs, key=lambda r: r["alpha_rew"]) for key, runs in curves.items() if len(runs) > 1}


def points(rows: list[dict]) -> dict[str, dict[float, dict[str, tuple[float, float]]]]:
    """method -> α_rew -> metric -> (mean, std) over seeds."""
    grouped = {}
    for row in rows:
        grouped.setdefault(row["method"], {}).setdefault(row["alpha_rew"], []).append(row)
    return {
        method: {
            alpha: {k: _mean_std([r[k] for r in runs]) for k in METRICS}
            for alpha, runs in sorted(by_alpha.items(), key=lambda item: -1 if item[0] is None else item[0])
        }
        for method, by_alpha in grouped.items()
    }


def read_at(curve: list[dict], level: float, key: str) -> float | None:
    """``key`` where the curve's reward first reaches ``level`` (linear between bracketing runs), or None."""
    for a, b in zip(curve, curve[1:], strict=False):
        low, high = sorted((a["reward"], b["reward"]))
        if low <= level <= high:
            if a["reward"] == b["reward"]:
                return a[key]
            weight = (level - a["reward"]) / (b["reward"] - a["reward"])
            return a[key] + weight * (b[key] - a[key])
    return None


def matched_levels(rows: list[dict], count: int = 3) -> list[float]:
    """``count`` rewards evenly inside the range every (method, seed) frontier spans; [] if the ranges miss."""
    curves = _curves(rows).values()
    if not curves:
        return []
    low = max(min(r["reward"] for r in curve) for curve in curves)
    high = min(max(r["reward"] for r in curve) for curve in curves)
    if low >= high:
        return []
    return [low + (high - low) * (i + 1) / (count + 1) for i in range(count)]


def matched_table(rows: list[dict], levels: list[float]) -> dict[float, dict[str, dict[str, tuple[float, float]]]]:
    """level -> method -> metric -> (mean, std over seeds) of the value read off each seed's frontier."""
    by_method = {}
    for (method, _), curve in _curves(rows).items():
        by_method.setdefault(method, []).append(curve)
    return {
        level: {
            method: {k: _mean_std([read_at(c, level, k) for c in curves]) for k in METRICS[1:]}
            for method, curves in by_method.items()
        }
        for level in levels
    }


def _cell(value: tuple[float, float], digits: int) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def format_tables(rows: list[dict]) -> str:
    """The frontier points (every method and α_rew) and the matched-reward table, as Markdown."""
    lines = [
        "| method | α_rew | seeds | boldness reward | FD ↓ | diversity ↑ | prompt acc. % |",
        "|---|---|---|---|---|---|---|",
    ]
    seeds = {}
    for row in rows:
        seeds[(row["method"], row["alpha_rew"])] = seeds.get((row["method"], row["alpha_rew"]), 0) + 1
    for method, by_alpha in points(rows).items():
        for alpha, m in by_alpha.items():
            name = f"{alpha:g}" if alpha is not None else "–"
            lines.append(
                f"| {method} | {name} | {seeds[(method, alpha)]} | {_cell(m['reward'], 4)} | {_cell(m['fd'], 2)} | "
                f"{_cell(m['diversity'], 2)} | {_cell(m['accuracy'], 1)} |"
            )
    levels = matched_levels(rows)
    lines += ["", "| matched reward | method | FD ↓ | diversity ↑ | prompt acc. % |", "|---|---|---|---|---|"]
    for level, by_method in matched_table(rows, levels).items():
        for method, m in by_method.items():
            lines.append(
                f"| {level:.4f} | {method} | {_cell(m['fd'], 2)} | {_cell(m['diversity'], 2)} | "
                f"{_cell(m['accuracy'], 1)} |"
            )
    if not levels:
        lines.append("| – | the methods' reward ranges do not overlap | – | – | – |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Two panels, reward on x: FD (log) and diversity, one line per method through its α_rew values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    for method, by_alpha in points(rows).items():
        xs = [m["reward"] for m in by_alpha.values()]
        for ax, key in zip(axes, ("fd", "diversity"), strict=True):
            ys = [m[key] for m in by_alpha.values()]
            style = {"marker": "*", "markersize": 12, "linestyle": "none"} if None in by_alpha else {"marker": "o"}
            label = f"{method} (multi-step sampler, CFG)" if None in by_alpha else method
            ax.errorbar(
                [x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs], yerr=[y[1] for y in ys],
                label=label, capsize=2, markersize=style.pop("markersize", 4), **style,
            )  # fmt: skip
    for level in matched_levels(rows):
        for ax in axes:
            ax.axvline(level, color="grey", linewidth=0.5, linestyle=":")
    axes[0].set(xlabel="boldness reward", ylabel="FD to held-out digits (log)", yscale="log")
    axes[1].set(xlabel="boldness reward", ylabel="within-class diversity")
    axes[1].legend(fontsize=7)
    figure.suptitle("α_rew sweep, mean ± std over seeds; dotted: the matched rewards of the table", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write(rows: list[dict], out: str) -> None:
    """``OUT/frontier.md`` and ``OUT/frontier.png``."""
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write(format_tables(rows))
    plot(rows, os.path.join(out, "frontier.png"))


if __name__ == "__main__":  # python examples/mini_digits/frontiers.py OUT: redraw from OUT/sweep.csv, no training
    import argparse

    from sweep import REFERENCE, read_rows

    parser = argparse.ArgumentParser(description="Redraws OUT/frontier.md and OUT/frontier.png from OUT/sweep.csv.")
    parser.add_argument("out")
    parser.add_argument("--methods", nargs="+", help="Only print the tables of these methods (matched among them).")
    args = parser.parse_args()
    rows = read_rows(os.path.join(args.out, "sweep.csv"))
    if args.methods:
        print(format_tables([r for r in rows if r["method"] in (REFERENCE, *args.methods)]))
    else:
        write(rows, args.out)
        print(open(os.path.join(args.out, "frontier.md")).read())
