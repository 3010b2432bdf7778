"""Skip-Cache speed per family, interval and window: measured speedup next to the speedup bound.

Each setting samples the same trajectory through `pipeline.generate` (the sampler, classifier-free
guidance as one batch of 2, the Skip-Cache rule), on a skip model of the family's full-size shape with
random weights (speed does not depend on them) at a reduced latent. All settings run in one process,
one after another, each `--repeats` times (the fastest kept), so that the speedups are ratios of one run;
the uncached trajectory runs first and again last, and the faster of the two is the reference.

    python benchmarks/speed.py --family latte     # Latte-XL/2, 4 frames of 8x8 latents
    python benchmarks/speed.py --family dit       # DiT-XL/2, 16x16 latent
    python benchmarks/speed.py --family hunyuan   # Hunyuan-DiT v1.2, 16x16 latent, 77 + 256 text tokens
    python benchmarks/speed.py --family latte --device cuda --dtype bf16 --frames 16 --size 32
    python benchmarks/speed.py --family latte --presets --repeats 2   # the Skip-Cache presets (docs/presets.md)

Settings: uncached; n = 2..6 in the first window; every other window at n = 2 (`--grid`: every n in
every window). The bound is 1 / ((1 - f) + f * 2k / L) for the schedule run (f: cached fraction).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from skipdit_core.loading import DTYPES  # noqa: E402
from skipdit_core.models import build_model, make_config  # noqa: E402
from skipdit_core.pipeline import Request, generate  # noqa: E402
from skipdit_core.plots import pyplot, save  # noqa: E402
from skipdit_core.skip_cache import AUTHORS_SETTINGS, SkipCacheConfig  # noqa: E402

# Per family: the full-size preset and the reduced sample it is timed on.
SHAPES = {
    "latte": {"preset": "Latte-XL/2-ucf101", "frames": 4, "size": 8},
    "dit": {"preset": "DiT-XL/2", "frames": 1, "size": 16},
    "hunyuan": {"preset": "HunyuanDiT-v1.2", "frames": 1, "size": 16},
}
WINDOWS = ["700:50", "800:50", "900:50", "950:300", "1000:0"]  # the paper's windows; 1000:0 = every step


def build(family: str, preset: str, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = make_config(family, {"skip": True} if family != "hunyuan" else {}, preset=preset)
    return build_model(family, config).to(device=device, dtype=dtype).eval()


def request(family: str, model, frames: int, size: int, steps: int) -> Request:
    """DDIM `steps` with guidance 4; Hunyuan-DiT gets random text states of the real lengths."""
    text = {}
    if family == "hunyuan":
        c = model.config
        g = torch.Generator().manual_seed(1)
        text = {"prompt_embeds": torch.randn(1, c.text_len, c.text_states_dim, generator=g),
                "prompt_embeds_2": torch.randn(1, c.text_len_t5, c.text_states_dim_t5, generator=g)}
    return Request(family, label=1 if family != "hunyuan" else None, text=text, frames=frames, size=size,
                   sampler="ddim", steps=steps, guidance=4.0, seed=0)


EMPTY_WINDOW = "1000:0"  # where `settings(empty=True)` adds the empty-step schedules: the whole schedule


def settings(intervals: list[int], windows: list[str], depth: int, grid: bool,
             forecasts: tuple[int, ...] = (0,), damping: float = 1.0, empty_steps: int = 0, warmup: bool = False,
             empty: bool = False) -> list[SkipCacheConfig | None]:
    """None (uncached), then each (n, window) of the sweep once per forecast order (`damping`: the
    forecast orders' forecast_damping; `empty_steps` and `warmup`: their empty_steps, capped at n - 1, and
    forecast_warmup). `empty`: then, in EMPTY_WINDOW, every n with every m = 1..n-1 empty steps, per
    forecast order >= 1, with the forecast warm-up."""
    def configs(n, window):
        start, end = (float(v) for v in window.split(":"))
        return [SkipCacheConfig(interval=n, start=start, end=end, depth=depth, forecast=f,
                                forecast_damping=damping if f else 1.0, empty_steps=min(empty_steps, n - 1) if f else 0,
                                forecast_warmup=warmup and f > 0) for f in forecasts]

    out = [None] + [c for n in intervals for c in configs(n, windows[0])]
    for window in windows[1:]:
        out += [c for n in (intervals if grid else intervals[:1]) for c in configs(n, window)]
    if empty:
        start, end = (float(v) for v in EMPTY_WINDOW.split(":"))
        out += [SkipCacheConfig(interval=n, start=start, end=end, depth=depth, forecast=f, forecast_damping=damping,
                                empty_steps=m, forecast_warmup=True)
                for n in intervals for m in range(1, n) for f in forecasts if f > 0]
    return out


def label(cache: SkipCacheConfig) -> str:
    """A setting as the tables print it, e.g. "n=3 1000->0 forecast 1 damping 0.7 empty 1 warmup"."""
    damped = f" damping {cache.forecast_damping:g}" if cache.forecast and cache.forecast_damping != 1.0 else ""
    return (f"n={cache.interval} {cache.start:g}->{cache.end:g}" + (f" forecast {cache.forecast}{damped}" if cache.forecast else "")
            + (f" empty {cache.empty_steps}" if cache.empty_steps else "") + (" warmup" if cache.forecast_warmup else ""))


def plot(rows: list[dict], title: str, path: str) -> None:
    """Measured speedup (bars) and the bound (ticks) per cached setting."""
    plt = pyplot()

    cached = rows[1:]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cached) + 2), 4))
    x = range(len(cached))
    ax.bar(x, [r["speedup"] for r in cached], color="tab:blue", label="measured")
    ax.scatter(x, [r["bound"] for r in cached], marker="_", s=400, color="black", label="bound", zorder=3)
    ax.set_xticks(list(x), [f"n={r['interval']}\n{r['window']}" + (f"\nf{r['forecast']}" if r.get("forecast") else "")
                            for r in cached], fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("speedup over uncached")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=list(SHAPES), default="latte")
    p.add_argument("--preset", help="default: the family's released full-size shape")
    p.add_argument("--frames", type=int, help="video frames (Latte)")
    p.add_argument("--size", type=int, help="latent height = width")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--windows", nargs="+", default=WINDOWS, help="start:end timesteps; the first is the n sweep's")
    p.add_argument("--depth", type=int, help="k (default: the authors' for the family)")
    p.add_argument("--grid", action="store_true", help="every interval in every window")
    p.add_argument("--forecasts", type=int, nargs="+", default=[0], choices=[0, 1, 2],
                   help="forecast orders of the cut state to time per setting (0: the paper's reuse)")
    p.add_argument("--forecast-damping", type=float, default=1.0, help="forecast_damping of the forecast orders")
    p.add_argument("--empty-steps", type=int, default=0,
                   help="empty_steps of the forecast orders (capped at n - 1): cached steps that run no unit")
    p.add_argument("--forecast-warmup", action="store_true", help="forecast_warmup of the forecast orders")
    p.add_argument("--presets", action="store_true",
                   help="time the family's Skip-Cache presets (skipdit_core/skip_cache_presets.py) instead of the sweep")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write measured speedup and bound per setting as a PNG")
    args = p.parse_args()

    shape = SHAPES[args.family]
    preset, frames, size = args.preset or shape["preset"], args.frames or shape["frames"], args.size or shape["size"]
    depth = args.depth or AUTHORS_SETTINGS[args.family].depth
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(args.family, preset, device, dtype)
    req = request(args.family, model, frames, size, args.steps)
    with torch.no_grad():
        generate(model, replace(req, steps=2))  # warm-up: kernels, allocator

    def fastest(cache):
        return min((generate(model, req, cache) for _ in range(args.repeats)), key=lambda r: r.seconds)

    if args.presets:
        from skipdit_core.skip_cache_presets import PRESETS

        named = PRESETS[(args.family, model.stack.num_skips > 0)]
        caches, names = [None, *named.values()], ["uncached", *named]
    else:
        caches = settings(args.intervals, args.windows, depth, args.grid, tuple(args.forecasts), args.forecast_damping,
                          args.empty_steps, args.forecast_warmup)
        names = [None] * len(caches)
    rows = []
    for cache, name in zip(caches, names):
        result = fastest(cache)
        rows.append({
            **({"preset": name, "setting": cache.describe() if cache else "uncached"} if name else {}),
            "interval": cache.interval if cache else 1,
            "forecast": cache.forecast if cache else 0,
            "empty": cache.empty_steps if cache else 0,
            "window": f"{cache.start:g}->{cache.end:g}" if cache else "-",
            "full": result.stats.full_steps if cache else args.steps,
            "cached": result.stats.cached_steps if cache else 0,
            "seconds": result.seconds, "bound": result.speedup_bound,
        })
    # The uncached run again at the end: the faster of the two is the reference, so that one slow spell
    # of a shared machine at the start does not inflate every speedup.
    rows[0]["seconds"] = min(rows[0]["seconds"], fastest(None).seconds)
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        r["of_bound"] = r["speedup"] / r["bound"]
    title = (f"{preset} ({'skip' if args.family != 'hunyuan' else 'native long skips'}), "
             f"{f'{frames} frames, ' if args.family == 'latte' else ''}latent {size}x{size}, CFG batch 2, "
             f"DDIM {args.steps}, k={depth}, {args.device} {args.dtype}")
    if args.plot:
        plot(rows, title, args.plot)
    if args.json:
        print(json.dumps({"title": title, "args": vars(args), "rows": rows}, indent=2))
        return
    print(title)
    empty = any(r["empty"] for r in rows)  # the empty column only where some setting has empty steps
    if args.presets:
        print(f"{'preset':>8} {'setting':<48} {'seconds':>8} {'speedup':>8} {'bound':>6} {'of bound':>9}")
        for r in rows:
            print(f"{r['preset']:>8} {r['setting']:<48} {r['seconds']:>8.2f} {r['speedup']:>7.2f}x {r['bound']:>5.2f}x "
                  f"{r['of_bound']:>8.1%}")
        return
    print(f"{'n':>3} {'window':>9} {'forecast':>8}" + (f" {'empty':>5}" if empty else "")
          + f" {'full':>5} {'cached':>6} {'seconds':>8} {'speedup':>8} {'bound':>6} {'of bound':>9}")
    for r in rows:
        print(f"{r['interval']:>3} {r['window']:>9} {r['forecast']:>8}" + (f" {r['empty']:>5}" if empty else "")
              + f" {r['full']:>5} {r['cached']:>6} {r['seconds']:>8.2f} "
              f"{r['speedup']:>7.2f}x {r['bound']:>5.2f}x {r['of_bound']:>8.1%}")


if __name__ == "__main__":
    main()
