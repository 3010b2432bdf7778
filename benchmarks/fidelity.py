"""Fidelity against speed on the bundled demo model: Skip-Cache on the Skip-Latte, the peer caches on its
vanilla twin, same seeds and classes, each cached video compared with its own model's uncached video.

    python benchmarks/fidelity.py --grid               # writes docs/benchmarks/*.png and prints the tables
    python benchmarks/fidelity.py --pair deep --grid --forecasts 0 1 2 --skip-peers taylorseer   # the 14-unit twins
    python benchmarks/fidelity.py --classes 0 1 --seeds 0 --steps 20   # a quick look
    python benchmarks/fidelity.py --pair deep --presets --seeds 4 5 6 7 --repeats 0   # the presets, held out
    python benchmarks/fidelity.py --pair wan --presets --seeds 4 5 6 7 --repeats 0    # the trained Wan, held out

A pair may be one model (`wan`: the trained Wan has no long skips; Skip-Cache and the peers run on it alike).
`--presets`: the Skip-Cache rows are the family's presets (skipdit_core/skip_cache_presets.py, chosen on other
seeds), so the comparison at equal compute uses no choice made on the reported seeds. `--repeats 0`: fidelity
and block compute only, no timing.

Per setting: PSNR and SSIM (frames in [-1, 1]) of the cached video against the uncached one of the same
model, class and seed, and the measured speedup (uncached seconds / cached seconds of the same trajectory),
each averaged over every (class, seed). LPIPS is reported when the `lpips` package and its weights load
(it needs torchvision and a weight download, so on a machine without them the column says n/a).

The paper's claim in miniature, per peer setting: the closest-to-uncached Skip-Cache setting among those
at least as fast (and, on the machine-independent axis, among those using no more block compute), and
which of the two is closer. `--grid` runs every n in every window, so that this choice has a frontier.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from peer_caches import METHODS, magcache_ratios, peer_cache  # noqa: E402
from speed import WINDOWS, label, settings  # noqa: E402

from skipdit_core.demo import DEMO_MODEL, SHAPE_CLASSES, VANILLA_TWIN  # noqa: E402

MODELS = os.path.join(HERE, "models")
PAIRS = {  # (skip model, vanilla twin)
    "demo": (str(DEMO_MODEL), str(VANILLA_TWIN)),
    "deep": (os.path.join(MODELS, "deep-skip-latte.safetensors"), os.path.join(MODELS, "deep-latte-vanilla.safetensors")),
    "wan": (os.path.join(MODELS, "wan-shapes.safetensors"),) * 2,  # docs/wan-shapes.md: no long skips
    # the Skip-Wan miniature (docs/skip-wan.md): the converted Wan and the vanilla one trained on as long
    "skip-wan": (os.path.join(MODELS, "skip-wan-shapes.safetensors"), os.path.join(MODELS, "wan-shapes-continued.safetensors")),
}
LATTE_ONLY = {"pab", "fastercache"}  # spatial / temporal attention of a Latte (peer_caches refuses a Wan)
from skipdit_core.loading import load_model  # noqa: E402
from skipdit_core.media import psnr, ssim  # noqa: E402
from skipdit_core.pipeline import Request, generate, to_frames  # noqa: E402
from skipdit_core.plots import pyplot, save  # noqa: E402
from skipdit_core.shape_prompts import class_text  # noqa: E402


# The peers' settings, mild to aggressive (knobs: benchmarks/peer_caches.py).
PEERS = {
    "fbcache": ("First Block Cache", [{"threshold": v} for v in (0.02, 0.05, 0.1, 0.2)]),
    "pab": ("PAB", [{"spatial_skip": s, "temporal_skip": t} for s, t in ((2, 3), (3, 4), (4, 6))]),
    "fastercache": ("FasterCache", [{"uncond_skip": u, "attention_skip": a} for u, a in ((3, 2), (5, 2), (5, 3))]),
    "taylorseer": ("TaylorSeer", [{"interval": n} for n in (2, 3, 4, 6)]),
    # diffusers' default (0.06, 3 skips in a row) and two more aggressive ones; 0.02 skipped 1 step of 50
    "magcache": ("MagCache", [{"threshold": 0.06}, {"threshold": 0.12, "max_skip_steps": 4},
                              {"threshold": 0.24, "max_skip_steps": 6}]),
    # cache-dit's DBCache: F1B0 (its FBCache-like mode) at three thresholds, with its TaylorSeer calibrator at
    # two, and F2B1 with the calibrator; warm-up 8 steps (cache-dit's default)
    "cachedit": ("cache-dit DBCache", [{"Fn": 1, "Bn": 0, "threshold": v} for v in (0.02, 0.04, 0.08)]
                 + [{"Fn": 1, "Bn": 0, "threshold": v, "taylorseer_order": 1} for v in (0.04, 0.08)]
                 + [{"Fn": 2, "Bn": 1, "threshold": 0.08, "taylorseer_order": 1}]
                 # its newer calibrators (cache-dit 1.5.x): FoCa and DMD, at the threshold of the TaylorSeer one
                 + [{"Fn": 1, "Bn": 0, "threshold": 0.08, "calibrator": c} for c in ("foca", "dmd")]),
    # Spectrum: every 2nd / 3rd step, then the authors' growing window (14 of 50 steps full) and a sparser one
    "spectrum": ("Spectrum", [{"interval": 2, "grow": 0.0}, {"interval": 3, "grow": 0.0}, {},
                              {"interval": 3}]),
}
CALIBRATION_SEED = 99  # MagCache calibrates on a trajectory outside the compared ones
assert set(PEERS) == set(METHODS)


def class_requests(model, family: str, classes, seeds, steps: int = 50, guidance: float = 4.0, frames: int = 8,
                   size: int = 8) -> list[Request]:
    """One request per (class, seed) for the trained shape models: a class label for Latte (DDIM, its own frames
    and size), the class's fixed prompt embedding for the trained Wan (Euler, shift 5; `frames` x `size` px, the
    wan-shapes data's 8 x 8 by default; docs/wan-shapes.md)."""
    c = model.config
    if family == "wan":
        return [Request("wan", text=class_text(k, c.text_len, c.text_dim), frames=frames, size=size, steps=steps,
                        guidance=guidance, seed=s) for k in classes for s in seeds]
    return [Request(family, label=k, frames=c.num_frames, size=c.input_size, sampler="ddim", steps=steps,
                    guidance=guidance, seed=s) for k in classes for s in seeds]


def lpips_metric():
    """An LPIPS(a, b) function on (F, 3, H, W) frames in [-1, 1], or None when it cannot load here."""
    try:
        import lpips

        net = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception:  # not installed, torchvision missing, or no weights offline
        return None
    return lambda a, b: float(net(a, b).mean())


class Trajectories:
    """One model's uncached videos per (class, seed), and the comparison of a cached run with them."""

    def __init__(self, model, requests: list[Request], lpips_fn, repeats: int = 3, timed: bool = True):
        """timed False: fidelity only (each cached run once, no uncached run beside it; speedup n/a)."""
        self.model, self.requests, self.lpips, self.repeats, self.timed = model, requests, lpips_fn, repeats, timed
        self.family = requests[0].family
        generate(model, replace(requests[0], steps=3))  # warm-up: allocator, kernels
        self.reference = [to_frames(self.family, generate(model, req).sample).clamp(-1, 1) for req in requests]

    def compare(self, run) -> dict:
        """run(request) -> pipeline Result; the means over every trajectory.

        The speedup is the fastest uncached over the fastest cached of `repeats` runs each, the two
        alternating: a slow spell of a shared machine then hits both (the samples are deterministic)."""
        rows = []
        for req, ref in zip(self.requests, self.reference):
            uncached, cached = [], []
            for _ in range(self.repeats if self.timed else 1):
                if self.timed:
                    uncached.append(generate(self.model, req).seconds)
                cached.append(run(req))
            result = min(cached, key=lambda r: r.seconds)
            a, b = ref, to_frames(self.family, result.sample).clamp(-1, 1)
            speedup = min(uncached) / result.seconds if self.timed else math.nan
            rows.append({"psnr": psnr(a, b), "ssim": ssim(a, b), "speedup": speedup,
                         "lpips": self.lpips(a, b) if self.lpips else math.nan})
        capped = lambda k: [min(r[k], 99.0) for r in rows]  # noqa: E731  (identical = 99 dB)
        out = {k: sum(capped(k)) / len(rows) for k in ("psnr", "ssim", "speedup", "lpips")}
        # the spread over trajectories: a mean alone hides a setting that fails on some seeds
        out.update({f"{k}_{f.__name__}": f(capped(k)) for k in ("psnr", "ssim") for f in (min, max)})
        return out


def skip_cache_method(cache) -> str:
    if cache.forecast == 0:
        return "Skip-Cache"
    return f"Skip-Cache + forecast {cache.forecast}" + (", empty steps" if cache.empty_steps else "")


def skip_cache_rows(traj: Trajectories, intervals, windows, grid: bool, forecasts=(0,), damping: float = 1.0,
                    empty: bool = False, presets: dict | None = None) -> list[dict]:
    """One row per setting of the grid, or per preset ({name: SkipCacheConfig}) when `presets` is given."""
    rows = []
    named = (list(presets.items()) if presets is not None
             else [(None, c) for c in settings(intervals, windows, 1, grid, tuple(forecasts), damping, empty=empty)[1:]])
    for name, cache in named:
        fractions = []  # one per run: the mean over trajectories, not the last one's

        def run(req, cache=cache):
            result = generate(traj.model, req, cache)
            fractions.append(result.stats.blocks_run / result.stats.blocks_uncached)
            return result

        window = f"{cache.start:g}->{cache.end:g}"
        rows.append({"method": "Skip-Cache preset" if presets is not None else skip_cache_method(cache),
                     "setting": (f"preset {name}: " if name else "") + label(cache),
                     "interval": cache.interval, "window": window, "forecast": cache.forecast, "empty": cache.empty_steps,
                     **traj.compare(run),
                     "compute": sum(fractions) / len(fractions)})
    return rows


def peer_rows(traj: Trajectories, methods: list[str], suffix: str = "") -> list[dict]:
    rows = []
    for method in methods:
        label, sweep = PEERS[method]
        label += suffix
        calibrated = {}
        if method == "magcache":  # the model's magnitude ratios, from diffusers' calibration run
            req = replace(traj.requests[0], seed=CALIBRATION_SEED)
            calibrated = {"mag_ratios": magcache_ratios(traj.model, req), "num_inference_steps": req.steps}
        for params in sweep:
            fractions = []  # content-dependent peers (FBCache, cache-dit) differ per trajectory: their mean

            def run(req, method=method, params={**params, **calibrated}):
                with peer_cache(traj.model, method, **params) as s:
                    result = generate(traj.model, req)
                fractions.append(s.compute_fraction)
                return result

            setting = ", ".join(f"{k}={v}" for k, v in params.items())
            rows.append({"method": label, "setting": setting, **traj.compare(run), "compute": sum(fractions) / len(fractions)})
    return rows


def equal_speedup_check(skip_rows: list[dict], peer: list[dict], axis: str = "speedup") -> list[str]:
    """For each peer setting: the Skip-Cache setting closest to its uncached output among those at least as
    fast (`axis` "compute": using no more of the block compute), and which of the two is closer: higher
    PSNR and no lower SSIM (both measured; "split" when they disagree). A peer
    faster (or cheaper) than every Skip-Cache setting has no comparison."""
    fmt = (lambda v: f"{v:.2f}x") if axis == "speedup" else (lambda v: f"{v:.0%} compute")  # noqa: E731
    at_least_as_good = (lambda v, s: v >= s) if axis == "speedup" else (lambda v, s: v <= s)  # noqa: E731
    edge = (max if axis == "speedup" else min)(r[axis] for r in skip_rows)
    lines = []
    for r in peer:
        head = f"{r['method']} {r['setting']}: {fmt(r[axis])}"
        rivals = [q for q in skip_rows if at_least_as_good(q[axis], r[axis])]
        if not rivals:
            lines.append(f"{head}, beyond every Skip-Cache setting (best {fmt(edge)}); no comparison")
            continue
        # closer = higher PSNR and (where measured) SSIM no lower; prefer a rival closer on both
        both = lambda q: q["psnr"] > r["psnr"] and q.get("ssim", 0.0) >= r.get("ssim", 0.0)  # noqa: E731
        best = max([q for q in rivals if both(q)] or rivals, key=lambda q: q["psnr"])
        psnr_wins = best["psnr"] > r["psnr"]
        ssim_wins = best["ssim"] >= r["ssim"] if "ssim" in r and "ssim" in best else psnr_wins
        if psnr_wins and ssim_wins:
            verdict = "Skip-Cache closer"
        elif not psnr_wins and not ssim_wins:
            verdict = "peer closer"
        else:
            verdict = f"split (PSNR: {'Skip-Cache' if psnr_wins else 'peer'}, SSIM: {'Skip-Cache' if ssim_wins else 'peer'})"
        ssim_text = f", SSIM {r['ssim']:.4f} vs {best['ssim']:.4f}" if "ssim" in r and "ssim" in best else ""
        lines.append(f"{head}, PSNR {r['psnr']:.2f} dB vs Skip-Cache {best['setting']} ({fmt(best[axis])}) "
                     f"{best['psnr']:.2f} dB{ssim_text} -> {verdict}")
    return lines


def plot(rows: list[dict], path: str, x_axis: str = "speedup", title: str = "demo model") -> None:
    """Skip-Cache as one line per window through n = 2..6 (one point per window without --grid), each peer
    as a line through its settings, mild to aggressive."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    ours = [r for r in rows if r["method"].startswith("Skip-Cache")]
    windows = list(dict.fromkeys(r["window"] for r in ours))
    for method, style in zip(dict.fromkeys(r["method"] for r in ours), ("-", "--", ":", "-.")):
        for i, window in enumerate(windows):
            pts = sorted([r for r in ours if r["window"] == window and r["method"] == method], key=lambda r: -r["compute"])
            if not pts:
                continue
            ns = f"n={min(r['interval'] for r in pts)}" + (f"..{max(r['interval'] for r in pts)}" if len(pts) > 1 else "")
            ax.plot([r[x_axis] for r in pts], [r["psnr"] for r in pts], marker="*", markersize=9, linewidth=1.5,
                    linestyle=style, color=plt.cm.autumn(0.85 * i / max(1, len(windows) - 1)),
                    label=f"{pts[0]['method']} {window}, {ns}")
    # Peers in colours and markers apart from Skip-Cache's red-to-yellow.
    peers = dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("Skip-Cache"))
    for method, color, marker in zip(peers, ("C0", "C2", "C4", "C9", "C7", "C8", "C5", "C6", "C1", "C3", "k"),
                                     "os^DvphP<>X"):
        pts = [r for r in rows if r["method"] == method]
        ax.plot([r[x_axis] for r in pts], [r["psnr"] for r in pts], color=color, marker=marker, label=method)
    if x_axis == "compute":
        ax.invert_xaxis()  # less compute to the right, like more speed
        ax.set_xlabel("share of block compute (machine-independent; less is faster)")
    else:
        ax.set_xlabel("measured speedup (uncached seconds / cached seconds)")
    ax.set_ylabel("PSNR to its own uncached output (dB)")
    ax.set_title(f"Skip-Cache vs the peer caches ({title})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=list(PAIRS), default="demo",
                   help="demo: the bundled 6-unit pair; deep: the 14-unit pair of benchmarks/models/ (Latte-XL/2's depth); "
                        "wan: the trained 30-block Wan, one model (docs/wan-shapes.md)")
    p.add_argument("--presets", action="store_true",
                   help="the Skip-Cache rows are the family's presets (chosen on other seeds) instead of the grid")
    p.add_argument("--preset-kind", choices=["auto", "skip", "vanilla"], default="auto",
                   help="whose presets: those of the model's own kind (auto), or of models with / without long skips "
                        "(a Skip-Wan has none of its own: the Wan presets, chosen on the vanilla Wan)")
    p.add_argument("--twin-presets", action="store_true",
                   help="also the presets on the twin, as one more peer (Skip-Cache without the long skips)")
    p.add_argument("--model", help="a Skip-Latte (default: the pair's)")
    p.add_argument("--twin", help="its vanilla twin (default: the pair's)")
    p.add_argument("--forecasts", type=int, nargs="+", default=[0], choices=[0, 1, 2],
                   help="Skip-Cache forecast orders of the cut state (0: the paper's reuse)")
    p.add_argument("--forecast-damping", type=float, default=1.0, help="forecast_damping of the forecast orders")
    p.add_argument("--empty", action="store_true",
                   help="also every n with m = 1..n-1 empty steps over the whole schedule (1000->0), per forecast order "
                        ">= 1, with the forecast warm-up")
    p.add_argument("--skip-peers", nargs="*", default=[], choices=list(METHODS),
                   help="peer methods to run on the skip model too (e.g. taylorseer: forecasting without the skips' cut)")
    p.add_argument("--classes", type=int, nargs="+", default=list(range(len(SHAPE_CLASSES))))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--windows", nargs="+", default=WINDOWS)
    p.add_argument("--grid", action="store_true", help="every interval in every window")
    p.add_argument("--methods", nargs="*", choices=list(METHODS),
                   help="default: every peer that applies to the family (Wan: all but PAB and FasterCache)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each trajectory, uncached and cached alternating (the fastest of each kept); "
                        "0: no timing (fidelity and block compute only)")
    p.add_argument("--peer-rows", nargs="+", default=[], help="a JSON list of peer rows measured elsewhere on the same trajectories (e.g. "
                   "benchmarks/comfyui_caches.py --json: ComfyUI's EasyCache / LazyCache), added to the peers")
    p.add_argument("--rows-out", help="write every row (Skip-Cache and peers) to this JSON file")
    p.add_argument("--out", default=os.path.join(HERE, "..", "docs", "benchmarks"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    lpips_fn = lpips_metric()
    model_path, twin_path = args.model or PAIRS[args.pair][0], args.twin or PAIRS[args.pair][1]
    skip, ckpt = load_model(model_path)
    twin = skip if twin_path == model_path else load_model(twin_path)[0]
    skip.eval(), twin.eval()
    family = ckpt.family
    methods = args.methods if args.methods is not None else [m for m in METHODS if family == "latte" or m not in LATTE_ONLY]
    requests = class_requests(skip, family, args.classes, args.seeds, args.steps, args.guidance)
    presets = None
    if args.presets:
        from skipdit_core.skip_cache_presets import PRESETS

        kind = {"auto": skip.stack.num_skips > 0, "skip": True, "vanilla": False}[args.preset_kind]
        presets = PRESETS[(family, kind)]
    timed = args.repeats > 0
    with torch.no_grad():
        skip_traj = Trajectories(skip, requests, lpips_fn, max(args.repeats, 1), timed)
        skip_rows = skip_cache_rows(skip_traj, args.intervals, args.windows, args.grid, args.forecasts, args.forecast_damping,
                                    args.empty, presets)
        twin_traj = skip_traj if twin is skip else Trajectories(twin, requests, lpips_fn, max(args.repeats, 1), timed)
        peers = peer_rows(twin_traj, methods)
        if args.twin_presets:
            peers += [{**r, "method": "Skip-Cache preset (twin)"}
                      for r in skip_cache_rows(twin_traj, (), (), False, presets=presets)]
        on_skip = peer_rows(skip_traj, args.skip_peers, " (skip model)")
    for path in args.peer_rows:
        with open(path) as f:
            measured = [r for r in json.load(f) if not r["method"].startswith("Skip-Cache")]
        peers += [{**r, "method": r["method"] + (" (ComfyUI)" if "comfyui" in r else ""), "lpips": r.get("lpips", math.nan),
                   "speedup": r.get("speedup", math.nan) if timed else math.nan} for r in measured]
    rows = skip_rows + peers + on_skip
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if args.pair == "demo" else f"-{args.pair}"
    png = os.path.join(args.out, f"fidelity-vs-speedup{suffix}.png")
    png_compute = os.path.join(args.out, f"fidelity-vs-compute{suffix}.png")
    title = f"{args.pair} pair, {skip.stack.num_units} units"
    if timed:
        plot(rows, png, "speedup", title)
    plot(rows, png_compute, "compute", title)
    if args.json:
        print(json.dumps(rows, indent=2))
    if args.rows_out:
        with open(args.rows_out, "w") as f:
            json.dump(rows, f, indent=1)
    sampler = "Euler (shift 5)" if family == "wan" else "DDIM"
    print(f"{model_path} vs {twin_path}: {skip.stack.num_units} units; {len(requests)} trajectories "
          f"({len(args.classes)} classes x seeds {args.seeds}), {sampler} {args.steps}, guidance {args.guidance}; "
          f"SSIM: Gaussian 11x11 (= torchmetrics); LPIPS {'alex' if lpips_fn else 'n/a (lpips cannot load here)'}")
    print("| method | setting | block compute | speedup | PSNR dB mean (min..max) | SSIM mean (min..max) | LPIPS |")
    print("|---|---|---:|---:|---|---|---:|")
    for r in rows:
        lp = "n/a" if math.isnan(r["lpips"]) else f"{r['lpips']:.4f}"
        speed = f"{r['speedup']:.2f}x" if timed else "n/a"
        print(f"| {r['method']} | {r['setting']} | {r['compute']:.1%} | {speed} | {r['psnr']:.2f} "
              f"({r['psnr_min']:.2f}..{r['psnr_max']:.2f}) | {r['ssim']:.4f} ({r['ssim_min']:.4f}..{r['ssim_max']:.4f}) | "
              f"{lp} |")
    if presets is not None:
        families = [("the Skip-Cache presets (chosen on other seeds)", skip_rows)]
    else:
        families = [("Skip-Cache, reuse (the paper)", [r for r in skip_rows if r["forecast"] == 0])]
        if any(r["forecast"] for r in skip_rows):
            families.append(("Skip-Cache, any forecast order", [r for r in skip_rows if not r["empty"]]))
        if any(r["empty"] for r in skip_rows):
            families.append(("Skip-Cache, any setting (forecast, empty steps, warm-up)", skip_rows))
    axes = [("compute", "share of block compute (the machine-independent axis)")]
    if timed:
        axes.append(("speedup", "measured speedup"))
    for axis, what in axes:
        for name, ours in [(name, ours) for name, ours in families if ours]:
            print(f"\nAt equal {what}, {name} against the peers on the twin:")
            lines = equal_speedup_check(ours, peers + on_skip, axis)
            for line in lines:
                print("  " + line)
            closer = sum("Skip-Cache closer" in line for line in lines)
            compared = sum("no comparison" not in line for line in lines)
            print(f"  -> Skip-Cache closer in {closer} of {compared} comparable peer settings")
    print(f"\nplots: {', '.join(os.path.relpath(f) for f in ((png,) if timed else ()) + (png_compute,))}")


if __name__ == "__main__":
    main()
