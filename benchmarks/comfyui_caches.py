"""ComfyUI's own caches against Skip-Cache on the realistic-depth twins, inside a real ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/comfyui_caches.py

Runs in-process in ComfyUI's Python: the twins of benchmarks/models/ load through the pack's Load Skip-DiT
Model, the stock KSampler samples them (ddim / ddim_uniform, 50 steps, cfg 4; cond and uncond in one batch),
and each cached run is compared with the uncached run of the same model, class and seed:
- core LazyCache and EasyCache (comfy_extras/nodes_easycache.py) on the vanilla twin, at reuse thresholds
  around their default 0.2 (their default window 15% -> 95%);
- the pack's Apply Skip-Cache on the skip twin: the paper's setting and the forecast settings of
  docs/benchmarks.md.

Per setting: block compute (blocks executed over blocks an uncached run executes, counted by hooks on the
blocks, so a skipped model call counts as none), PSNR and SSIM of the frames to the uncached output (the
twins are pixel models: the sampled latent is the video in [-1, 1]), and the measured speedup (uncached
seconds over cached seconds of the same trajectory, the two run back to back). The equal-compute
comparison is that of benchmarks/fidelity.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from comfyui_inprocess import block_counter, run_sampler, setup, skip_cache  # noqa: E402
from comfyui_server import PACK_NAME, make_base_dir  # noqa: E402

TWINS = {"skip": "deep-skip-latte.safetensors", "vanilla": "deep-latte-vanilla.safetensors"}
CORE = [("LazyCache", "LazyCacheNode", t) for t in (0.1, 0.2, 0.4)] + [("EasyCache", "EasyCacheNode", t) for t in (0.1, 0.2, 0.4)]
# (label, interval, start, end, forecast, damping, empty steps, warm-up)
SKIP_CACHE = [
    ("n=2 700->50 (the paper)", 2, 700.0, 50.0, 0, 1.0, 0, False),
    ("n=3 1000->0 forecast 1 damping 0.7", 3, 1000.0, 0.0, 1, 0.7, 0, False),
    ("n=2 1000->0 forecast 1 damping 0.7 empty 1 warmup", 2, 1000.0, 0.0, 1, 0.7, 1, True),
    ("n=3 1000->0 forecast 1 damping 0.7 empty 2 warmup", 3, 1000.0, 0.0, 1, 0.7, 2, True),
    ("n=4 1000->0 forecast 1 damping 0.7 empty 2 warmup", 4, 1000.0, 0.0, 1, 0.7, 2, True),
    ("n=5 1000->0 forecast 1 damping 0.7 empty 4 warmup", 5, 1000.0, 0.0, 1, 0.7, 4, True),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    args = p.parse_args()
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and run this with its Python)")

    base = make_base_dir(Path(tempfile.mkdtemp(prefix="skipdit-bench-")))
    for name in TWINS.values():
        (base / "models" / "skipdit" / name).symlink_to(HERE / "models" / name)
    nodes = setup(comfy, str(base))
    import asyncio

    import torch
    from comfy_extras import nodes_easycache

    from skipdit_core.media import psnr, ssim

    asyncio.run(nodes.load_custom_node(str(base / "custom_nodes" / PACK_NAME)))
    loader = nodes.NODE_CLASS_MAPPINGS["SkipDiTModelLoader"]
    apply = nodes.NODE_CLASS_MAPPINGS["SkipDiTApplySkipCache"]
    labels = nodes.NODE_CLASS_MAPPINGS["SkipDiTClassLabel"]
    models = {k: loader.execute(v, "fp32").args[0] for k, v in TWINS.items()}
    counts = {k: block_counter(m.model.diffusion_model.blocks) for k, m in models.items()}
    config = models["skip"].model.diffusion_model.config
    latent = {"samples": torch.zeros(1, config.in_channels, config.num_frames, config.input_size, config.input_size)}
    cases = [(c, s) for c in args.classes for s in args.seeds]

    def sample(which, model, c, seed):
        pos, neg = labels.execute(c).args
        counts[which]["calls"] = 0
        start = time.perf_counter()
        out = run_sampler(nodes, model, pos, neg, latent, args.steps, args.cfg, "ddim", seed, "ddim_uniform")
        frames = out[0].transpose(0, 1).float().clamp(-1, 1)  # (C, F, H, W) -> (F, C, H, W)
        return frames, time.perf_counter() - start, counts[which]["calls"]

    reference = {}
    for which, model in models.items():
        sample(which, model, *cases[0])  # warm-up
        reference[which] = {case: sample(which, model, *case) for case in cases}

    def measure(method, setting, which, model):
        rows = []
        for case in cases:
            ref, _, ref_calls = reference[which][case]
            # the uncached run again, right before the cached one: a slow spell of a shared machine then hits
            # both (timing the references once at the start made the ratios swing 0.2x..8x under load)
            _, ref_seconds, _ = sample(which, models[which], *case)
            frames, seconds, calls = sample(which, model, *case)
            rows.append((psnr(ref, frames), ssim(ref, frames), ref_seconds / seconds, calls / ref_calls))
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
        return {"method": method, "setting": setting, "psnr": min(mean[0], 99.0), "ssim": mean[1], "speedup": mean[2],
                "compute": mean[3]}

    results = []
    for method, node, threshold in CORE:
        cls = getattr(nodes_easycache, node)
        patched = cls.execute(models["vanilla"], threshold, 0.15, 0.95, False).args[0]
        results.append(measure(f"{method} (vanilla twin)", f"reuse_threshold={threshold}", "vanilla", patched))
    for label, n, start, end, forecast, damping, empty, warmup in SKIP_CACHE:
        patched = skip_cache(apply, models["skip"], n, start, end, 1, forecast, damping, empty, warmup)
        method = "Skip-Cache" + (" + forecast" if forecast else "") + (", empty steps" if empty else "")
        results.append(measure(method, label, "skip", patched))

    print(f"ComfyUI {comfy}: the deep twins through Load Skip-DiT Model, KSampler ddim / ddim_uniform {args.steps} steps, "
          f"cfg {args.cfg}; {len(cases)} trajectories ({len(args.classes)} classes x {len(args.seeds)} seeds)")
    print("| method | setting | block compute | speedup | PSNR dB | SSIM |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['setting']} | {r['compute']:.0%} | {r['speedup']:.2f}x | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    from fidelity import equal_speedup_check

    ours = [r for r in results if r["method"].startswith("Skip-Cache")]
    peers = [r for r in results if not r["method"].startswith("Skip-Cache")]
    for axis in ("compute", "speedup"):
        lines = equal_speedup_check(ours, peers, axis)
        print(f"\nAt equal {'share of block compute' if axis == 'compute' else 'measured speedup'}, Skip-Cache (these "
              "settings) against ComfyUI's caches:")
        for line in lines:
            print("  " + line)
        closer = sum("Skip-Cache closer" in line for line in lines)
        print(f"  -> Skip-Cache closer in {closer} of {sum('no comparison' not in line for line in lines)} comparable settings")


if __name__ == "__main__":
    main()
