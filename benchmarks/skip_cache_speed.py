"""Skip-Cache speed and memory on a full-size model shape (random weights: speed does not depend on them).

Runs the same denoising loop uncached and with Skip-Cache n = 2, 3, 4, each in its own process so
that peak memory is measured cleanly, and prints measured speedup next to the speedup bound
1 / ((1 - f) + f * 2k / L) of the schedule actually run.

    python benchmarks/skip_cache_speed.py                       # Latte-XL/2, CPU, reduced latent
    python benchmarks/skip_cache_speed.py --device cuda --dtype bf16 --frames 16 --size 64
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from skipdit_core.loading import DTYPES  # noqa: E402
from skipdit_core.models import build_model, make_config  # noqa: E402
from skipdit_core.skip_cache import SkipCacheConfig, SkipCacheRun  # noqa: E402


def one_run(args, interval: int) -> dict:
    """Time the loop in this process; returns seconds, peak memory and the cache statistics."""
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = make_config("latte", {"skip": True, "num_classes": 101, "input_size": args.size, "num_frames": args.frames}, preset=args.preset)
    model = build_model("latte", config).to(device=device, dtype=dtype).eval()
    x = torch.randn(args.batch, args.frames, 4, args.size, args.size, device=device)
    y = torch.full((args.batch,), 3, device=device)
    timesteps = [round(999 - i * 999 / (args.steps - 1)) for i in range(args.steps)]
    cache = SkipCacheConfig(interval=interval, start=args.start, end=args.end, depth=args.depth)

    def loop(steps):
        run = SkipCacheRun.for_model(cache, model)
        z = x.clone()
        for t in steps:
            cut = run.begin_step(t)
            out = model(z, torch.full((args.batch,), float(t), device=device), y, cut=cut)
            run.end_step(cut)
            z = z - 0.01 * out[:, :, :4].float()
        return z, run

    with torch.no_grad():
        loop(timesteps[:2])  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _, run = loop(timesteps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "interval": interval, "seconds": seconds, "peak_bytes": peak,
        "full": run.stats.full_steps, "cached": run.stats.cached_steps, "bound": run.speedup_bound(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="Latte-XL/2")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=16, help="latent height = width")
    p.add_argument("--batch", type=int, default=2, help="2 = a classifier-free-guidance batch")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--start", type=float, default=700)
    p.add_argument("--end", type=float, default=50)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--json", action="store_true")
    p.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child is not None:
        print(json.dumps(one_run(args, args._child)))
        return

    rows = []
    for n in [1, *args.intervals]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_child", str(n)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        r["speedup"] = base["seconds"] / r["seconds"]
        r["of_bound"] = r["speedup"] / r["bound"]
        r["memory_vs_uncached"] = r["peak_bytes"] / base["peak_bytes"]
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        return
    print(f"{args.preset} skip, {args.frames} frames, latent {args.size}x{args.size}, batch {args.batch}, "
          f"{args.steps} steps, window {args.start:g}->{args.end:g}, k={args.depth}, {args.device} {args.dtype}")
    print(f"{'n':>3} {'full':>5} {'cached':>6} {'seconds':>8} {'speedup':>8} {'bound':>6} {'of bound':>9} {'peak MiB':>9} {'memory':>7}")
    for r in rows:
        print(f"{r['interval']:>3} {r['full']:>5} {r['cached']:>6} {r['seconds']:>8.2f} {r['speedup']:>7.2f}x "
              f"{r['bound']:>5.2f}x {r['of_bound']:>8.1%} {r['peak_bytes'] / 2**20:>9.0f} {r['memory_vs_uncached']:>6.1%}")


if __name__ == "__main__":
    main()
