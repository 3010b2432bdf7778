"""What a cached step takes from the full steps, on a model WITHOUT long skips (a vanilla Latte, a Wan): the deep state h_{L-k} itself
(the paper's rule, made for Skip-DiT) or the middle's residual h_{L-k} - h_k added to its own h_k (what First
Block Cache and cache-dit's Fn/Bn reuse). Both run the same units, so they cost the same block compute; per
setting, PSNR / SSIM of the cached video to the same model's uncached one, mean and spread over trajectories.

    OMP_NUM_THREADS=1 python benchmarks/reuse_kinds.py --model benchmarks/models/deep-latte-vanilla.safetensors \\
        --classes 0 1 2 3 --seeds 0 1     # tuning seeds: the choice of Apply Skip-Cache's default is made here
    OMP_NUM_THREADS=1 python benchmarks/reuse_kinds.py --model runs/wan-shapes/checkpoints/latest/ema.safetensors \
        --seeds 0 1 2 3                   # the trained Wan (docs/wan-shapes.md): 8 frames of 8 x 8 px
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from fidelity import Trajectories, class_requests  # noqa: E402

from skipdit_core.loading import load_model  # noqa: E402
from skipdit_core.pipeline import generate  # noqa: E402
from skipdit_core.skip_cache import REUSE_KINDS, SkipCacheConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(HERE, "models", "deep-latte-vanilla.safetensors"))
    p.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--windows", nargs="+", default=["1000->0", "700->50"])
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--forecasts", type=int, nargs="+", default=[0, 1])
    p.add_argument("--forecast-damping", type=float, default=0.7)
    p.add_argument("--frames", type=int, default=8, help="Wan: frames (the wan-shapes data: 8)")
    p.add_argument("--size", type=int, default=8, help="Wan: height = width in pixels (the wan-shapes data: 8)")
    args = p.parse_args()

    model, ckpt = load_model(args.model)
    model.eval()
    sampler = "Euler (shift 5)" if ckpt.family == "wan" else "DDIM"
    print(f"model: {args.model} ({ckpt.family}, {model.stack.num_units} units, {model.stack.num_skips} long skips); "
          f"classes {args.classes}, seeds {args.seeds}: {len(args.classes) * len(args.seeds)} trajectories, "
          f"{sampler} {args.steps}, guidance {args.guidance}, k={args.depth}")
    requests = class_requests(model, ckpt.family, args.classes, args.seeds, args.steps, args.guidance, args.frames,
                              args.size)
    torch.set_grad_enabled(False)
    traj = Trajectories(model, requests, lpips_fn=None, timed=False)
    print("| n | window | forecast | block compute | state: PSNR mean (min..max) | SSIM | residual: PSNR mean (min..max) | SSIM | closer |")
    print("|---|---|---|---:|---|---:|---|---:|---|")
    wins = 0
    total = 0
    for n in args.intervals:
        for window in args.windows:
            start, end = (float(v) for v in window.split("->"))
            for forecast in args.forecasts:
                row, compute = {}, {}
                for reuse in REUSE_KINDS:
                    cache = SkipCacheConfig(interval=n, start=start, end=end, depth=args.depth, forecast=forecast,
                                            forecast_damping=args.forecast_damping if forecast else 1.0, reuse=reuse)

                    def run(req, cache=cache):
                        result = generate(model, req, cache)
                        compute["f"] = result.stats.blocks_run / result.stats.blocks_uncached
                        return result

                    row[reuse] = traj.compare(run)
                s, r = row["state"], row["residual"]
                better = r["psnr"] > s["psnr"] and r["ssim"] >= s["ssim"]
                worse = r["psnr"] < s["psnr"] and r["ssim"] <= s["ssim"]
                verdict = "residual" if better else "state" if worse else "split"
                wins += better
                total += 1
                cell = lambda m: f"{m['psnr']:.2f} ({m['psnr_min']:.2f}..{m['psnr_max']:.2f}) | {m['ssim']:.4f}"  # noqa: E731
                damp = f" d{args.forecast_damping:g}" if forecast else ""
                print(f"| {n} | {window} | {forecast}{damp} | {compute['f']:.0%} | {cell(s)} | {cell(r)} | {verdict} |",
                      flush=True)
    print(f"residual closer (PSNR higher, SSIM no lower) in {wins} of {total} settings")


if __name__ == "__main__":
    main()
