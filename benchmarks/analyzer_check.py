"""Does `skipdit analyze --speed X` suggest as well as the preset, on seeds neither used?

    OMP_NUM_THREADS=1 python benchmarks/analyzer_check.py --model benchmarks/models/deep-skip-latte.safetensors

Per target speed: the analyzer's search (`skipdit_core.cache_search`, what `skipdit analyze --speed` runs) on the
trajectories a user would give it (classes x `--analyzer-seeds`, other seeds than the presets' tuning 0-3 and the
report 4-7) within `--seconds`; then its suggestion and the preset of that name, both scored on the held-out
trajectories (classes x seeds 4-7). The gap is the preset's mean PSNR minus the suggestion's (the goal: at most
0.5 dB), with the block compute of each (the suggestion may use less or more of its budget than the preset).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from fidelity import class_requests  # noqa: E402

from skipdit_core.cache_search import Reference, block_compute, candidates, score, search  # noqa: E402
from skipdit_core.loading import load_model  # noqa: E402
from skipdit_core.skip_cache_presets import BUDGET_MARGIN, PRESET_SPEEDS, preset_config, speed_budget  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--analyzer-seeds", type=int, nargs="+", default=[10, 11])
    p.add_argument("--report-seeds", type=int, nargs="+", default=[4, 5, 6, 7])
    p.add_argument("--targets", nargs="+", default=list(PRESET_SPEEDS))
    p.add_argument("--seconds", type=float, default=600.0, help="the analyzer's time budget per target")
    p.add_argument("--margin", type=float, default=BUDGET_MARGIN)
    args = p.parse_args()

    torch.set_grad_enabled(False)
    model, ckpt = load_model(args.model)
    model.eval()
    family, stack = ckpt.family, model.stack
    skips = stack.num_skips > 0
    user = class_requests(model, family, args.classes, args.analyzer_seeds)
    report = class_requests(model, family, args.classes, args.report_seeds)
    user_ref, report_ref = Reference(model, user), Reference(model, report)
    ts = report_ref.schedule()
    print(f"model: {args.model}; analyzer on classes {args.classes} x seeds {args.analyzer_seeds} within "
          f"{args.seconds:g} s per target; held out: seeds {args.report_seeds} ({len(report)} trajectories)")
    print("| target | analyzer's suggestion | compute | held-out PSNR dB (min..max) | preset | compute | "
          "held-out PSNR dB (min..max) | preset - suggestion |")
    print("|---|---|---:|---|---|---:|---|---:|")
    for name in args.targets:
        suggestion = search(model, user, speed_budget(name, args.margin), candidates(skips), seconds=args.seconds,
                            reference=user_ref)[0]["config"]
        preset = preset_config(family, skips, name)
        rows = []
        for config in (suggestion, preset):
            s = score(model, config, report_ref, len(report))
            rows.append((config, block_compute(config, ts, stack.num_units, stack.num_skips, family), s))
        (a, fa, sa), (b, fb, sb) = rows
        print(f"| {name} | {a.describe()} | {fa:.1%} | {sa['psnr']:.2f} ({sa['psnr_min']:.2f}..{sa['psnr_max']:.2f}) | "
              f"{b.describe()} | {fb:.1%} | {sb['psnr']:.2f} ({sb['psnr_min']:.2f}..{sb['psnr_max']:.2f}) | "
              f"{sb['psnr'] - sa['psnr']:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
