"""What forecasting the cut state costs on a cached step, and in memory, on a released shape.

    python benchmarks/forecast_overhead.py                      # Latte-XL/2 skip, 4 frames of 8x8 latents, CPU fp32
    python benchmarks/forecast_overhead.py --device cuda --dtype bf16 --frames 16 --size 32

One model call per measurement, CFG batch of 2, random weights (time does not depend on them): a full
step fills the cut-state history (order + 1 full steps at distinct timesteps), then cached steps are
timed with forecast 0 (the paper's reuse), 1 and 2, alternating, `--repeats` rounds, the fastest of
each kept. Also the forecast alone (the Horner loop on one cut state) and the memory the history holds;
then an empty step (`empty_steps`: no unit runs, the stack output forecast) and what its history adds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from skipdit_core.loading import DTYPES  # noqa: E402
from skipdit_core.models import StackCut, build_model, make_config  # noqa: E402
from skipdit_core.skip_cache import SkipCacheConfig, SkipCacheRun  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="Latte-XL/2-ucf101")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=8, help="latent height = width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    args = p.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = build_model("latte", make_config("latte", {"skip": True}, preset=args.preset)).to(device=device, dtype=dtype).eval()
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, args.frames, c.in_channels, args.size, args.size, generator=g).to(device=device, dtype=dtype)
    y = torch.tensor([1, c.num_classes], device=device)

    def call(run, t):
        cut = run.begin_step(t)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model(x, torch.full((2,), float(t), device=device), y, cut=cut)
        sync(device)
        seconds = time.perf_counter() - start
        run.end_step(cut)
        return seconds, cut

    def filled_run(order, empty_steps=0):
        """A run whose history holds order + 1 full steps (980, 960, 940), every later step cached (with
        `empty_steps`: empty)."""
        config = SkipCacheConfig(interval=1000, start=1000, end=0, forecast=order, empty_steps=empty_steps)
        run = SkipCacheRun.for_model(config, model)
        for t in (980.0, 960.0, 940.0)[: order + 1]:
            cut = StackCut(run.config.depth)
            with torch.no_grad():
                model(x, torch.full((2,), t, device=device), y, cut=cut)
            run.history.add(t, cut.captured)
            if run.outputs is not None:
                run.outputs.add(t, cut.captured_output)
        return run

    runs = {order: filled_run(order) for order in (0, 1, 2)}
    full = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            model(x, torch.full((2,), 500.0, device=device), y)
        sync(device)
        full.append(time.perf_counter() - start)
    cached = {order: [] for order in runs}
    for _ in range(args.repeats):
        for order, run in runs.items():
            run.counter = 1  # keep every timed step cached
            seconds, cut = call(run, 900.0)
            assert cut.cached is not None and len(run.history) == order + 1
            cached[order].append(seconds)
    state = runs[0].history.latest
    predict = {}
    for order, run in runs.items():
        times = []
        for _ in range(args.repeats * 4):
            sync(device)
            start = time.perf_counter()
            run.history.predict(900.0)
            sync(device)
            times.append(time.perf_counter() - start)
        predict[order] = min(times)
    mib = lambda t: t.numel() * t.element_size() / 2**20  # noqa: E731
    print(f"{args.preset} skip, {args.frames} frames, latent {args.size}x{args.size}, CFG batch 2, {args.device} {args.dtype}; "
          f"cut state {tuple(state.shape)} {str(state.dtype).replace('torch.', '')}, {mib(state):.2f} MiB")
    print(f"full step {min(full) * 1e3:.1f} ms (fastest of {args.repeats})")
    print(f"{'forecast':>8} {'cached step ms':>15} {'vs reuse':>9} {'forecast alone ms':>18} {'history MiB':>12}")
    base = min(cached[0])
    for order, run in runs.items():
        held = sum(mib(t) for t in run.history.coeffs)
        print(f"{order:>8} {min(cached[order]) * 1e3:>15.2f} {min(cached[order]) / base - 1:>+9.1%} "
              f"{predict[order] * 1e3:>18.3f} {held:>12.2f}")
    # Empty steps: no unit runs; the final layer takes the stack output forecast from its own history.
    print(f"empty steps (no unit runs, the output forecast): {'forecast':>8} {'empty step ms':>14} {'vs full':>8} "
          f"{'output history MiB':>19}")
    for order in (0, 1, 2):
        run = filled_run(order, empty_steps=999)
        times = []
        for _ in range(args.repeats):
            run.counter = 1
            seconds, cut = call(run, 900.0)
            assert cut.kind == "empty"
            times.append(seconds)
        held = sum(mib(t) for t in run.outputs.coeffs)
        print(f"{'':>48}{order:>8} {min(times) * 1e3:>14.2f} {min(times) / min(full):>8.1%} {held:>19.2f}")


if __name__ == "__main__":
    main()
