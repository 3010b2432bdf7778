"""Training loss of a Skip-Latte and its vanilla twin from their log.jsonl files, same recipe and budget.

    python benchmarks/loss_curves.py benchmarks/models/deep-skip-latte.log.jsonl benchmarks/models/deep-latte-vanilla.log.jsonl \\
        --plot docs/benchmarks/deep-twins-loss.png

Prints, per run, the mean loss (v MSE + VLB) and MSE over windows of 1,000 steps, and plots both curves
(a moving mean over 500 steps of the logged values).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from skipdit_core.plots import pyplot, save  # noqa: E402


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [row for row in map(json.loads, f) if "loss" in row]


def window_means(rows: list[dict], key: str, width: int = 1000) -> dict[int, float]:
    out: dict[int, list[float]] = {}
    for r in rows:
        out.setdefault((r["step"] - 1) // width, []).append(r[key])
    return {(k + 1) * width: sum(v) / len(v) for k, v in sorted(out.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="log.jsonl files (the first: the Skip-DiT)")
    p.add_argument("--plot")
    p.add_argument("--width", type=int, default=1000, help="steps per row of the table")
    p.add_argument("--smooth", type=int, default=500, help="steps of the plot's moving mean")
    args = p.parse_args()
    runs = {os.path.basename(path).split(".")[0]: read(path) for path in args.logs}
    steps = sorted({s for rows in runs.values() for s in window_means(rows, "loss", args.width)})
    print("| steps up to | " + " | ".join(f"{name} loss (MSE)" for name in runs) + " |")
    print("|---:|" + "---:|" * len(runs))
    for s in steps:
        cells = []
        for rows in runs.values():
            loss, mse = window_means(rows, "loss", args.width).get(s), window_means(rows, "mse", args.width).get(s)
            cells.append("-" if loss is None else f"{loss:.4f} ({mse:.4f})")
        print(f"| {s} | " + " | ".join(cells) + " |")
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rows in runs.items():
            k = max(1, args.smooth // max(1, rows[1]["step"] - rows[0]["step"]) if len(rows) > 1 else 1)
            values = [r["loss"] for r in rows]
            smooth = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]
            ax.plot([r["step"] for r in rows], smooth, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"training loss, moving mean over {args.smooth} steps")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
