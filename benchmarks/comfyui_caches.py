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

`--model wan`: the same comparison on ComfyUI core's own WanModel, the trained Wan of docs/wan-shapes.md
(benchmarks/models/wan-shapes.safetensors: 30 blocks of width 128, 3 pixel channels):

    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 /path/to/comfy-venv/bin/python benchmarks/comfyui_caches.py \
        --model wan --seeds 4 5 6 7 --json wan-caches.json

- core Load Diffusion Model (UNETLoader, weight dtype default) from a temporary models/diffusion_models/ (a
  symlink to the file), core ModelSamplingSD3 with shift 5 (skipdit_core.flow's Euler uses Wan's shift 5), the
  stock KSampler euler / simple (simple = skipdit_core's uniform schedule at 50 steps), cfg 4; the class prompts
  `shape_prompts.class_text(c, 8, 4096, seed=0)` as CONDITIONING, the negative all-zero states of the same shape
  (what ConditioningZeroOut gives), the latent zeros (1, 3, 8, 8, 8); ComfyUI draws the noise from the seed, the
  same draw as skipdit_core's `generate` for that seed;
- two adaptations a pixel model needs on core Wan, both printed: the model's latent format is the identity on 3
  channels (core's Wan21 format is 16 VAE channels, with which KSampler cannot sample a 3-channel model at all),
  and, unless --no-clamp, the guided x0 is clamped to [-1, 1] after CFG (a post-CFG function, what skipdit_core's
  sampler does for pixel models, `clip_denoised`, and the pack's loader for its pixel models). The uncached run is
  checked against skipdit_core's `generate` for every class and seed (--no-core-check skips it);
- core EasyCache and LazyCache at reuse thresholds 0.05 .. 0.4 (default window 15% -> 95%, verbose off), and
  EasyCache again with its input copied (a DIFFUSION_MODEL wrapper outside EasyCache's passes the model a copy of
  x): on a CONST (flow) model in float32, core's `_apply_model` hands the diffusion model the sampler's x itself,
  and a step EasyCache skips returns that tensor with the cached difference added in place, so x0 is computed from
  the altered x (on fp16 / bf16 weights the cast makes a copy first). --no-copied-easycache drops those rows.
  ComfyUI 0.3.64's EasyCache also adds each cond's cached difference to the whole batch when cond and uncond share
  a model call (0.33 slices the batch per cond), so its EasyCache rows differ from 0.33's even with the copy;
- the pack's Apply Skip-Cache on the same core model, the settings of --skip-cache (default: WAN_SKIP_CACHE).

Each setting's mean and spread (min..max over the trajectories) of PSNR and SSIM, and for the first trajectory the
map of its steps (F: all blocks ran, c: some, .: none). The speedup is measured as for the twins (--speed rerun) or,
with --speed cpu, as the ratio of this process's CPU seconds (one thread) against the uncached reference timed once:
half the runs, and not inflated by other jobs on a shared machine.
"""
from __future__ import annotations

import argparse
import json
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

# --model wan
WAN_MODEL = "wan-shapes.safetensors"
WAN_CORE = [("LazyCache", "LazyCacheNode", t) for t in (0.05, 0.1, 0.2, 0.4)] + [("EasyCache", "EasyCacheNode", t) for t in (0.05, 0.1, 0.2, 0.4)]
# Apply Skip-Cache settings as --skip-cache takes them (a JSON list of such dicts); k = 1, the deep state reused
WAN_SKIP_CACHE = [
    {"label": "n=2 1000->0", "interval": 2},
    {"label": "n=3 1000->0", "interval": 3},
    {"label": "n=4 1000->0", "interval": 4},
    {"label": "n=3 1000->0 forecast 1 damping 0.7", "interval": 3, "forecast": 1, "forecast_damping": 0.7},
    {"label": "n=4 1000->0 forecast 1 damping 0.7 empty 2 warmup", "interval": 4, "forecast": 1, "forecast_damping": 0.7,
     "empty_steps": 2, "forecast_warmup": True},
]
SPEED = {"rerun": "wall seconds of the uncached run right before each cached run over the cached run's",
         "cpu": "CPU seconds of the uncached reference over the cached run's (one thread)"}
SKIP_CACHE_KEYS = {"interval": None, "start": 1000.0, "end": 0.0, "depth": 1, "forecast": 0, "forecast_damping": 1.0,
                   "empty_steps": 0, "forecast_warmup": False, "reuse": "state"}


def skip_cache_settings(text: str) -> list[dict]:
    """--skip-cache: a JSON list (or a file holding one) of SkipCacheConfig-like dicts, each with a `label`
    (default: made from its values). Missing keys take SKIP_CACHE_KEYS' values; `interval` is required."""
    raw = json.loads(Path(text).read_text() if os.path.isfile(text) else text)
    if not isinstance(raw, list) or not raw or not all(isinstance(d, dict) for d in raw):
        raise SystemExit("--skip-cache: give a non-empty JSON list of objects")
    out = []
    for d in raw:
        unknown = set(d) - set(SKIP_CACHE_KEYS) - {"label"}
        if unknown or "interval" not in d:
            raise SystemExit(f"--skip-cache: {d}: " + (f"unknown keys {sorted(unknown)} (known: label, "
                             f"{', '.join(SKIP_CACHE_KEYS)})" if unknown else "no interval"))
        setting = {**SKIP_CACHE_KEYS, **d}
        if setting["reuse"] not in ("state", "residual"):
            raise SystemExit(f"--skip-cache: reuse is 'state' or 'residual', not {setting['reuse']!r}")
        if "label" not in setting:
            setting["label"] = (f"n={setting['interval']} {setting['start']:g}->{setting['end']:g}"
                                + (f" k={setting['depth']}" if setting["depth"] != 1 else "")
                                + (f" forecast {setting['forecast']} damping {setting['forecast_damping']:g}" if setting["forecast"] else "")
                                + (f" empty {setting['empty_steps']}" if setting["empty_steps"] else "")
                                + (" warmup" if setting["forecast_warmup"] else "")
                                + (" residual" if setting["reuse"] == "residual" else ""))
        out.append(setting)
    return out


def skip_cache_method(setting: dict) -> str:
    return ("Skip-Cache" + (" + forecast" if setting["forecast"] else "") + (", empty steps" if setting["empty_steps"] else "")
            + (", residual" if setting["reuse"] == "residual" else ""))


def apply_setting(apply, model, setting: dict):
    return skip_cache(apply, model, setting["interval"], setting["start"], setting["end"], setting["depth"], setting["forecast"],
                      setting["forecast_damping"], setting["empty_steps"], setting["forecast_warmup"], setting["reuse"])


def summarize(method: str, setting: str, rows: list[tuple]) -> dict:
    """rows: (psnr, ssim, speedup, compute) per trajectory -> the table's row: means, and min / max of PSNR and SSIM
    (PSNR capped at 99 dB: an identical output has an infinite one)."""
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
    cap = lambda v: min(v, 99.0)  # noqa: E731
    return {"method": method, "setting": setting, "psnr": cap(mean[0]), "ssim": mean[1], "speedup": mean[2], "compute": mean[3],
            "psnr_min": cap(min(r[0] for r in rows)), "psnr_max": cap(max(r[0] for r in rows)),
            "ssim_min": min(r[1] for r in rows), "ssim_max": max(r[1] for r in rows)}


JSON_KEYS = ("method", "setting", "compute", "speedup", "psnr", "psnr_min", "psnr_max", "ssim", "ssim_min", "ssim_max")


def write_json(path: str, results: list[dict], extra: dict) -> None:
    rows = [{**{k: r[k] for k in JSON_KEYS}, **{k: v for k, v in r.items() if k not in JSON_KEYS}, **extra} for r in results]
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {len(rows)} rows to {path}")


def print_equal_checks(results: list[dict]) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("latte", "wan"), default="latte",
                   help="latte: the deep Latte twins (default); wan: core WanModel on benchmarks/models/wan-shapes.safetensors")
    p.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (latte), 4 5 6 7 (wan)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--skip-cache", default=None, metavar="JSON",
                   help="Apply Skip-Cache settings: a JSON list (or a file of one) of {label, interval, start, end, depth, "
                        "forecast, forecast_damping, empty_steps, forecast_warmup, reuse}; default: the built-in list of the model")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows (method, setting, compute, speedup, psnr, "
                   "psnr_min, psnr_max, ssim, ssim_min, ssim_max) to PATH")
    w = p.add_argument_group("--model wan")
    w.add_argument("--shift", type=float, default=5.0, help="ModelSamplingSD3 shift (default 5: skipdit_core.flow's)")
    w.add_argument("--scheduler", default="simple", help="KSampler scheduler (default simple: skipdit_core's schedule)")
    w.add_argument("--no-clamp", action="store_true", help="do not clamp the guided x0 to [-1, 1]")
    w.add_argument("--no-core-check", action="store_true", help="skip comparing the uncached runs with skipdit_core's generate")
    w.add_argument("--no-copied-easycache", action="store_true", help="drop the EasyCache rows with the input copied")
    w.add_argument("--speed", choices=tuple(SPEED), default="rerun",
                   help="rerun (default, as for the twins): wall seconds, the uncached run repeated right before each cached "
                        "one; cpu: this process's CPU seconds against the uncached reference timed once (half the runs; "
                        "not inflated by other jobs on a shared machine)")
    args = p.parse_args()
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and run this with its Python)")
    if args.seeds is None:
        args.seeds = [4, 5, 6, 7] if args.model == "wan" else [0, 1]
    if args.model == "wan":
        return run_wan(args, comfy)
    if args.skip_cache is not None:
        skip_settings = skip_cache_settings(args.skip_cache)
    else:
        skip_settings = [{**SKIP_CACHE_KEYS, "label": label, "interval": n, "start": start, "end": end, "forecast": forecast,
                          "forecast_damping": damping, "empty_steps": empty, "forecast_warmup": warmup}
                         for label, n, start, end, forecast, damping, empty, warmup in SKIP_CACHE]

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
        return summarize(method, setting, rows)

    results = []
    for method, node, threshold in CORE:
        cls = getattr(nodes_easycache, node)
        patched = cls.execute(models["vanilla"], threshold, 0.15, 0.95, False).args[0]
        results.append(measure(f"{method} (vanilla twin)", f"reuse_threshold={threshold}", "vanilla", patched))
    for setting in skip_settings:
        patched = apply_setting(apply, models["skip"], setting)
        results.append(measure(skip_cache_method(setting), setting["label"], "skip", patched))

    print(f"ComfyUI {comfy}: the deep twins through Load Skip-DiT Model, KSampler ddim / ddim_uniform {args.steps} steps, "
          f"cfg {args.cfg}; {len(cases)} trajectories ({len(args.classes)} classes x {len(args.seeds)} seeds)")
    print("| method | setting | block compute | speedup | PSNR dB | SSIM |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['setting']} | {r['compute']:.0%} | {r['speedup']:.2f}x | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    print_equal_checks(results)
    if args.json:
        write_json(args.json, results, {"model": "deep Latte twins", "trajectories": len(cases)})


def run_wan(args, comfy_path: str) -> None:
    """--model wan: see the module's docstring."""
    wall = time.perf_counter()
    skip_settings = skip_cache_settings(args.skip_cache) if args.skip_cache is not None else skip_cache_settings(json.dumps(WAN_SKIP_CACHE))
    base = make_base_dir(Path(tempfile.mkdtemp(prefix="skipdit-bench-wan-")))
    (base / "models" / "diffusion_models" / WAN_MODEL).symlink_to(HERE / "models" / WAN_MODEL)
    nodes = setup(comfy_path, str(base))
    import asyncio

    import torch

    import comfy.latent_formats
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    from comfy_extras import nodes_easycache, nodes_model_advanced
    from comfyui_version import __version__ as comfy_version

    from skipdit_core import load_model
    from skipdit_core.flow import flow_sigmas
    from skipdit_core.media import psnr, ssim
    from skipdit_core.pipeline import Request, generate
    from skipdit_core.shape_prompts import class_text

    asyncio.run(nodes.load_custom_node(str(base / "custom_nodes" / PACK_NAME)))
    apply = nodes.NODE_CLASS_MAPPINGS["SkipDiTApplySkipCache"]
    loaded = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(WAN_MODEL, "default")[0]
    dm = loaded.model.diffusion_model
    blocks = len(dm.blocks)
    core_format = type(loaded.model.latent_format).__name__
    in_channels = dm.patch_embedding.weight.shape[1]

    class PixelVideo(comfy.latent_formats.LatentFormat):
        """The identity on 3 pixel channels (this model has no VAE)."""

        latent_channels = in_channels
        latent_dimensions = 3
        scale_factor = 1.0
        spacial_downscale_ratio = 1

    loaded.model.latent_format = PixelVideo()  # before the cache nodes: they read latent_channels when applied
    model = nodes_model_advanced.ModelSamplingSD3().patch(loaded, args.shift)[0]
    if not args.no_clamp:
        model.set_model_sampler_post_cfg_function(lambda a: a["denoised"].clamp(-1.0, 1.0))

    # block compute, total and per step: hooks on the 30 core blocks, and one on the model for the step of each call
    counts = block_counter(dm.blocks)
    trace = []  # per model call: [timestep, blocks run]
    dm.register_forward_pre_hook(lambda m, a, kw: trace.append([float((a[1] if len(a) > 1 else kw["timestep"]).flatten()[0]), 0]),
                                 with_kwargs=True)
    for b in dm.blocks:
        b.register_forward_pre_hook(lambda m, a: trace[-1].__setitem__(1, trace[-1][1] + 1) if trace else None)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), args.scheduler, args.steps)
    timesteps = [float(model.get_model_object("model_sampling").timestep(s)) for s in sigmas[:-1]]

    def step_map() -> str:
        ran, seen = [0] * args.steps, [0] * args.steps
        for t, n in trace:
            i = min(range(args.steps), key=lambda j: abs(timesteps[j] - t))
            ran[i] += n
            seen[i] += 1
        return "".join("." if r == 0 else "F" if r == blocks * c else "c" for r, c in zip(ran, seen))

    frames = lambda out: out[0].transpose(0, 1).float().clamp(-1, 1)  # (C, F, H, W) -> (F, C, H, W)  # noqa: E731
    size, length = 8, 8
    latent = {"samples": torch.zeros(1, in_channels, length, size, size)}
    texts = {c: class_text(c, 8, 4096, seed=0) for c in args.classes}
    positive = {c: [[t["prompt_embeds"], {}]] for c, t in texts.items()}
    negative = {c: [[torch.zeros_like(t["prompt_embeds"]), {}]] for c, t in texts.items()}  # ConditioningZeroOut's
    cases = [(c, s) for c in args.classes for s in args.seeds]

    def sample(m, c, seed):
        """-> (output, wall seconds, CPU seconds of this process, block calls, step map)"""
        counts["calls"] = 0
        trace.clear()
        start, cpu = time.perf_counter(), time.process_time()
        out = run_sampler(nodes, m, positive[c], negative[c], latent, args.steps, args.cfg, "euler", seed, args.scheduler)
        return out, time.perf_counter() - start, time.process_time() - cpu, counts["calls"], step_map()

    sample(model, *cases[0])  # warm-up
    reference = {case: sample(model, *case) for case in cases}
    print(f"ComfyUI {comfy_version} ({comfy_path}): {WAN_MODEL} through core Load Diffusion Model as {type(dm).__module__}."
          f"{type(dm).__name__} ({blocks} blocks, weights {next(dm.parameters()).dtype}, core latent format {core_format} "
          f"replaced by the identity on {in_channels} pixel channels), ModelSamplingSD3 shift {args.shift:g}, KSampler euler / "
          f"{args.scheduler} {args.steps} steps, cfg {args.cfg:g}, guided x0 {'not clamped' if args.no_clamp else 'clamped to [-1, 1] after CFG'}; "
          f"speedup: {SPEED[args.speed]}; "
          f"{len(cases)} trajectories ({len(args.classes)} classes x {len(args.seeds)} seeds: {args.classes} x {args.seeds})")
    flow = flow_sigmas(args.steps, args.shift)
    print(f"schedule: |ComfyUI {args.scheduler} sigmas - skipdit_core.flow sigmas| <= "
          f"{max(abs(float(a) - b) for a, b in zip(sigmas, flow)):.2e}; uncached run {reference[cases[0]][1]:.1f} s "
          f"({reference[cases[0]][2]:.1f} s CPU), {reference[cases[0]][3]} block calls ({reference[cases[0]][3] // blocks} model calls "
          f"of {blocks} blocks)")

    if not args.no_core_check:
        ours, _ = load_model(str(HERE / "models" / WAN_MODEL))
        worst = {"max_abs": 0.0, "rel": 0.0, "psnr": float("inf")}
        same_noise = True
        for c, s in cases:
            noise = comfy.sample.prepare_noise(latent["samples"], s)
            same_noise &= bool(torch.equal(noise, torch.randn(noise.shape, generator=torch.Generator().manual_seed(s))))
            req = Request("wan", text=texts[c], frames=length, size=size, steps=args.steps, guidance=args.cfg, seed=s,
                          shift=args.shift, clip_denoised=not args.no_clamp)
            theirs = reference[(c, s)][0].float()
            mine = generate(ours, req).sample.float()
            worst["max_abs"] = max(worst["max_abs"], float((theirs - mine).abs().max()))
            worst["rel"] = max(worst["rel"], float((theirs - mine).norm() / mine.norm()))
            worst["psnr"] = min(worst["psnr"], psnr(frames(mine), frames(theirs)))
        del ours
        print(f"uncached ComfyUI against skipdit_core generate(Request('wan', class_text(c), frames {length}, size {size}, "
              f"steps {args.steps}, guidance {args.cfg:g}, seed s{', clip_denoised=False' if args.no_clamp else ''})), worst of the "
              f"{len(cases)} trajectories: max |diff| {worst['max_abs']:.2e}, relative L2 {worst['rel']:.2e}, PSNR {worst['psnr']:.1f} dB; "
              f"same initial noise: {same_noise}")

    copy_input = lambda executor, *a, **kw: executor(a[0].clone(), *a[1:], **kw)  # noqa: E731
    copied = model.clone()  # the wrapper first, so it is outside EasyCache's
    copied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "benchmark-copy-input", copy_input)

    def measure(method, setting, patched):
        rows, maps, cpu_ratios = [], None, []
        for case in cases:
            ref, _, ref_cpu, ref_calls, _ = reference[case]
            if args.speed == "rerun":  # the uncached run again, right before the cached one (as for the twins)
                _, ref_seconds, ref_cpu, _, _ = sample(model, *case)
            out, seconds, cpu, calls, steps_map = sample(patched, *case)
            maps = maps or steps_map
            cpu_ratios.append(ref_cpu / cpu)
            speedup = ref_seconds / seconds if args.speed == "rerun" else ref_cpu / cpu
            rows.append((psnr(frames(ref), frames(out)), ssim(frames(ref), frames(out)), speedup, calls / ref_calls))
        row = summarize(method, setting, rows)
        row["speedup_cpu"] = sum(cpu_ratios) / len(cpu_ratios)
        row["steps_first"] = maps
        print(f"  {method} {setting}: {row['compute']:.0%} compute, {row['speedup']:.2f}x, {row['psnr']:.2f} dB, "
              f"SSIM {row['ssim']:.4f}  [{time.perf_counter() - wall:.0f} s]", flush=True)
        return row

    results = []
    core = [(m, n, t, model) for m, n, t in WAN_CORE]
    if not args.no_copied_easycache:
        core += [("EasyCache, input copied", n, t, copied) for m, n, t in WAN_CORE if m == "EasyCache"]
    for method, node, threshold, base_model in core:
        patched = getattr(nodes_easycache, node).execute(base_model, threshold, 0.15, 0.95, False).args[0]
        results.append(measure(method, f"reuse_threshold={threshold}", patched))
    for setting in skip_settings:
        results.append(measure(skip_cache_method(setting), setting["label"], apply_setting(apply, model, setting)))

    ms = model.get_model_object("model_sampling")
    window = [i for i, s in enumerate(sigmas[:-1]) if ms.percent_to_sigma(0.95) < float(s) <= ms.percent_to_sigma(0.15)]
    print(f"\nComfyUI {comfy_version}, core WanModel ({WAN_MODEL}), euler / {args.scheduler} {args.steps} steps, shift {args.shift:g}, "
          f"cfg {args.cfg:g}; {len(cases)} trajectories; each cached run against the uncached ComfyUI run of its class and seed")
    rerun = args.speed == "rerun"
    print(f"| method | setting | block compute | speedup{' (wall) | speedup (CPU)' if rerun else ' (CPU)'} | PSNR dB mean (min..max) "
          "| SSIM mean (min..max) |")
    print(f"|---|---|---:|---:|{'---:|' if rerun else ''}---|---|")
    for r in results:
        print(f"| {r['method']} | {r['setting']} | {r['compute']:.0%} | {r['speedup']:.2f}x"
              f"{' | %.2fx' % r['speedup_cpu'] if rerun else ''} | {r['psnr']:.2f} ({r['psnr_min']:.2f}..{r['psnr_max']:.2f}) "
              f"| {r['ssim']:.4f} ({r['ssim_min']:.4f}..{r['ssim_max']:.4f}) |")
    c0, s0 = cases[0]
    print(f"\nSteps of the first trajectory (class {c0}, seed {s0}; step 0 at t = 1000; F: all {blocks} blocks ran, c: some, "
          f".: none). EasyCache / LazyCache's window (15% -> 95%) holds steps {window[0]}..{window[-1]} of this schedule.")
    width = max(len(f"{r['method']} {r['setting']}") for r in results)
    print(f"  {'uncached':<{width}}  {reference[cases[0]][4]}")
    for r in results:
        print(f"  {r['method'] + ' ' + r['setting']:<{width}}  {r['steps_first']}")
    print_equal_checks(results)
    if args.json:
        write_json(args.json, results, {"model": WAN_MODEL, "comfyui": comfy_version, "speed": SPEED[args.speed], "trajectories": len(cases),
                                        "classes": args.classes, "seeds": args.seeds, "clamp": not args.no_clamp})
    print(f"\n{time.perf_counter() - wall:.0f} s in all")


if __name__ == "__main__":
    main()
