"""Choose Skip-Cache presets on tuning seeds, then report them on held-out seeds no choice used.

    OMP_NUM_THREADS=1 python benchmarks/presets.py --model benchmarks/models/deep-skip-latte.safetensors
    OMP_NUM_THREADS=1 python benchmarks/presets.py --model benchmarks/models/wan-shapes.safetensors

For each target speed X (1.5x, 2x, 3x, 4x): the candidates of `skipdit_core.cache_search` using at most
`margin / X` of the block compute (the margin leaves room for what is not blocks: embedders, the final layer,
the forecast), searched on the tuning trajectories (classes x tuning seeds) by mean PSNR to the model's own
uncached output; the winner is then scored on the held-out trajectories (classes x report seeds). The table
gives both, each with its spread over trajectories. The chosen settings are what `skip_cache_presets.py` holds
for the model's family (copied there by hand, with this command's output in docs/presets.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from fidelity import class_requests  # noqa: E402

from skipdit_core.cache_search import Reference, candidates, score, search  # noqa: E402
from skipdit_core.loading import load_model  # noqa: E402
from skipdit_core.skip_cache_presets import BUDGET_MARGIN, PRESET_SPEEDS, speed_budget  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--report-seeds", type=int, nargs="+", default=[4, 5, 6, 7])
    p.add_argument("--targets", nargs="+", default=list(PRESET_SPEEDS), help="preset names, e.g. 1.5x 2x 3x 4x")
    p.add_argument("--margin", type=float, default=BUDGET_MARGIN, help="budget = margin / speed, in block compute")
    p.add_argument("--keep", type=int, default=8, help="candidates closest to the budget that enter the search")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if set(args.tune_seeds) & set(args.report_seeds):
        raise SystemExit("tuning and report seeds must not overlap")

    torch.set_grad_enabled(False)
    model, ckpt = load_model(args.model)
    model.eval()
    family, stack = ckpt.family, model.stack
    tune = class_requests(model, family, args.classes, args.tune_seeds, args.steps, args.guidance)
    report = class_requests(model, family, args.classes, args.report_seeds, args.steps, args.guidance)
    cands = candidates(stack.num_skips > 0)
    print(f"model: {args.model} ({family}, {stack.num_units} units, {stack.num_skips} long skips); {len(cands)} "
          f"candidates; tuning: classes {args.classes} x seeds {args.tune_seeds} ({len(tune)} trajectories); "
          f"held out: seeds {args.report_seeds} ({len(report)} trajectories); {args.steps} steps, guidance "
          f"{args.guidance}; budget = {args.margin} / speed", flush=True)
    tune_ref, report_ref = Reference(model, tune), Reference(model, report)
    rows = []
    for name in args.targets:
        started = time.perf_counter()
        ranked = search(model, tune, speed_budget(name, args.margin), cands, keep=args.keep, reference=tune_ref,
                        log=lambda line: print(f"  [{name}] {line}", flush=True))
        best = ranked[0]
        held = score(model, best["config"], report_ref, len(report))
        rows.append({"preset": name, "setting": best["config"].describe(), "config": best["config"].__dict__,
                     "compute": best["compute"], "bound": 1.0 / best["compute"],
                     "tuning": {k: v for k, v in best.items() if k not in ("config", "compute")}, "held_out": held,
                     "seconds": time.perf_counter() - started})
    print("\n| preset | setting | block compute | bound | tuning PSNR dB mean (min..max) | tuning SSIM | "
          "held-out PSNR dB mean (min..max) | held-out SSIM mean (min..max) |")
    print("|---|---|---:|---:|---|---:|---|---|")
    for r in rows:
        t, h = r["tuning"], r["held_out"]
        print(f"| {r['preset']} | {r['setting']} | {r['compute']:.1%} | {r['bound']:.2f}x | {t['psnr']:.2f} "
              f"({t['psnr_min']:.2f}..{t['psnr_max']:.2f}) | {t['ssim']:.4f} | {h['psnr']:.2f} ({h['psnr_min']:.2f}.."
              f"{h['psnr_max']:.2f}) | {h['ssim']:.4f} ({h['ssim_min']:.4f}..{h['ssim_max']:.4f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
