"""The `skipdit` command (also `python -m skipdit_core`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from . import __version__
from . import models
from .loading import DTYPES, CheckpointError, convert_to_safetensors, inspect_checkpoint, save_safetensors
from .models.ustack import SKIP_FUSIONS
from .skip_cache_presets import BUDGET_MARGIN, PRESET_SPEEDS



def _overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs; values are parsed as JSON when they can be (numbers, true/false)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_info(args) -> int:
    from .skip_branches import is_branches_file, load_branches

    if is_branches_file(args.checkpoint):  # a Skip-Wan's branches alone (skipdit extract-branches)
        _, branches = load_branches(args.checkpoint)
        print(json.dumps(branches.describe(), indent=2) if args.json else "\n".join(branches.lines()))
        return 0
    ckpt = inspect_checkpoint(args.checkpoint, family=args.family, overrides=_overrides(args.set))
    info = ckpt.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}")
    print(f"  family      {info['family']} ({info['description']})")
    fusion = ", residual fusion" if info["skip_fusion"] == "residual" else ""
    print(f"  variant     {info['variant']} ({info['long_skips']} long skips{fusion})")
    print(f"  weights     {info['weights_from']}, {info['layout']} layout, {info['parameters']:,} parameters, {'/'.join(info['dtypes'])}")
    print("  config      " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    for key, aside in info["set_aside"].items():
        print(f"  set aside   {key} {tuple(aside['shape'])}: {aside['use']}")
    return 0


def cmd_convert(args) -> int:
    ckpt = convert_to_safetensors(
        args.checkpoint, args.output, dtype=DTYPES[args.dtype] if args.dtype else None,
        family=args.family, overrides=_overrides(args.set),
    )
    print(f"wrote {args.output}: {ckpt.family}, {len(ckpt.state_dict)} tensors, config recorded in its metadata")
    return 0


def cmd_extract_branches(args) -> int:
    from .skip_branches import extract_branches

    info = extract_branches(args.checkpoint, args.output, base=args.base, dtype=DTYPES[args.dtype] if args.dtype else None,
                            fusion=args.fusion)
    print(f"wrote {args.output}: the {info.num_skips} skip branches alone (attach them with --skip-branches, or "
          "ComfyUI's Load Skip Branches)")
    print("\n".join(info.lines()[1:]))
    return 0


def cmd_new(args) -> int:
    config = models.make_config(args.family, _overrides(args.set), preset=args.preset)
    torch.manual_seed(args.seed)
    model = models.build_model(args.family, config)
    save_safetensors(model.state_dict(), args.output, args.family, config)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: a freshly initialised {args.family} model ({args.preset or 'default config'}, {n:,} parameters)")
    return 0


# ----------------------------------------------------------------------------- sample / bench

VAE_SCALE = {"dit": 0.18215, "latte": 0.18215, "latte_t2v": 0.18215, "hunyuan": 0.13025}  # Wan: per channel, its VAE's


def _cache_config(args, family, interval, model=None):
    """The Skip-Cache setting of the command line: --cache-preset (for `model`'s family and long skips), else
    interval n with the window / depth / forecast options (the authors' window and depth by default)."""
    from .skip_cache import AUTHORS_SETTINGS, SkipCacheConfig

    if getattr(args, "cache_preset", None):
        from .skip_cache_presets import preset_config

        return preset_config(family, model.stack.num_skips > 0, args.cache_preset)
    base = AUTHORS_SETTINGS[family]
    depth = args.cache_depth or base.depth
    options = dict(forecast=args.cache_forecast, forecast_damping=args.cache_forecast_damping,
                   empty_steps=args.cache_empty_steps, forecast_warmup=args.cache_forecast_warmup, reuse=args.cache_reuse)
    if args.cache_start_percent is not None or args.cache_end_percent is not None:
        return SkipCacheConfig.from_percent(
            args.cache_start_percent if args.cache_start_percent is not None else 0.3,
            args.cache_end_percent if args.cache_end_percent is not None else 0.95, interval, depth, **options)
    start = args.cache_start if args.cache_start is not None else base.start
    end = args.cache_end if args.cache_end is not None else base.end
    return SkipCacheConfig(interval=interval, start=start, end=end, depth=depth, **options)


def _request(args, model, family):
    from .pipeline import Request

    text = {}
    if args.text_embeddings:
        from safetensors.torch import load_file

        text = load_file(args.text_embeddings)
    c = model.config
    size = args.size or getattr(c, "input_size", None) or getattr(c, "sample_size", 32)
    frames = args.frames or getattr(c, "num_frames", None) or getattr(c, "video_length", 16)
    return Request(family, label=args.label, text=text, frames=frames, size=size, sampler=_sampler(args, family),
                   steps=args.steps, guidance=args.guidance, seed=args.seed, shift=args.shift)


def _sampler(args, family: str) -> str:
    """--sampler, else Euler for Wan's flow matching, else the command's DDPM-family default (analyze: ddim)."""
    from .diffusion import DEFAULT_SAMPLERS

    if args.sampler:
        return args.sampler
    return DEFAULT_SAMPLERS.get(family) or getattr(args, "ddpm_family_sampler", "ddpm")


def _device(requested: Optional[str]) -> str:
    """--device, else cuda when there is one, else cpu."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args):
    from .loading import load_model

    model, ckpt = load_model(args.checkpoint, dtype=DTYPES[args.dtype], device=_device(args.device))
    return _with_branches(args, model, ckpt)


def _with_branches(args, model, ckpt):
    """--skip-branches: the model with a Skip-Wan's branches attached (skip_branches.attach_branches)."""
    if not getattr(args, "skip_branches", None):
        return model, ckpt
    from .skip_branches import attach_branches

    model = attach_branches(model, args.skip_branches)
    ckpt.config = model.config
    return model, ckpt


def _load_vae(args, device, family: str):
    """A local diffusers VAE (--vae), loaded once per command, or None: AutoencoderKL, for Wan AutoencoderKLWan."""
    if not args.vae:
        return None
    if family == "wan":
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan.from_pretrained(args.vae, local_files_only=True).to(device)
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(device)


def _decode_wan(vae, sample: torch.Tensor) -> torch.Tensor:
    """The first sample's latents (C, F, H, W) through Wan's causal video VAE -> frames (F', 3, H', W') in [-1, 1].
    Wan's latents are normalised per channel (z - mean) / std with the VAE config's latents_mean / latents_std,
    as diffusers' WanPipeline undoes them before decoding."""
    z = sample[:1].to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    if mean.shape[1] != z.shape[1]:
        raise ValueError(f"the VAE's latents have {mean.shape[1]} channels, the model's {z.shape[1]}: "
                         "Wan 2.1 models take the Wan 2.1 VAE (16), Wan 2.2 TI2V 5B the Wan 2.2 VAE (48)")
    return vae.decode(z * std + mean).sample[0].transpose(0, 1).float()


def _pixels(vae, family, model, sample):
    """Decoded frames (F, C, H, W) in [-1, 1], or None for a latent model without a VAE."""
    from .pipeline import is_pixel_space, to_frames

    frames = to_frames(family, sample)
    if vae is not None and family == "wan":
        with torch.no_grad():
            return _decode_wan(vae, sample)
    if vae is not None:
        with torch.no_grad():
            return torch.cat([vae.decode(f[None] / VAE_SCALE[family]).sample for f in frames]).float()
    if is_pixel_space(model):
        return frames
    return None


class _Progress:
    def __init__(self, label):
        from tqdm import tqdm

        self.tqdm, self.label, self.bar = tqdm, label, None

    def __call__(self, i, total, t):
        if self.bar is None:
            self.bar = self.tqdm(total=total, desc=self.label, leave=False, file=sys.stderr)
        self.bar.update(1)
        if i + 1 == total:
            self.bar.close()


def cmd_sample(args) -> int:
    import os

    from .media import write_png, write_video
    from .pipeline import generate

    procs, cfg_parallel = _processes(args), None
    model, ckpt = _load(args)
    if args.parallel != "none":
        from .parallel import CFGParallel, SequenceParallel

        procs.join(next(model.parameters()).device)
        if args.parallel == "cfg":
            cfg_parallel = CFGParallel()
        else:
            SequenceParallel().attach(model)
    req = _request(args, model, ckpt.family)
    cache = (_cache_config(args, ckpt.family, args.cache_interval, model)
             if args.cache_interval > 1 or args.cache_preset else None)
    result = generate(model, req, cache, progress=_Progress("sampling") if procs.main else None, cfg_parallel=cfg_parallel)
    if not procs.main:  # every process holds the same sample; the main one writes it
        return 0
    pixels = _pixels(_load_vae(args, result.sample.device, ckpt.family), ckpt.family, model, result.sample)
    out = args.output
    if pixels is None:
        from safetensors.torch import save_file

        out = os.path.splitext(out)[0] + ".latents.safetensors"
        save_file({"latents": result.sample.contiguous().cpu()}, out)
        print(f"{ckpt.family} is a latent model and no --vae was given: wrote the latents to {out}")
    elif out.lower().endswith(".png"):
        write_png(out, pixels[0])
    else:
        write_video(out, pixels, fps=args.fps)
    line = f"wrote {out} in {result.seconds:.2f} s"
    if result.stats:
        line += f"; Skip-Cache {cache.describe()}: {result.stats.summary()}, speedup bound {result.speedup_bound:.2f}x"
    print(line)
    return 0


def cmd_sample_many(args) -> int:
    from pathlib import Path

    from .media import to_uint8_frames
    from .sample_many import Setting, run

    procs = _processes(args)
    model, ckpt = _load(args)
    device = next(model.parameters()).device
    procs.join(device)
    req = _request(args, model, ckpt.family)
    labels = _labels(args.labels, model)
    settings = ([Setting.of(_cache_config(args, ckpt.family, 1, model))] if args.cache_preset else
                [Setting.of(_cache_config(args, ckpt.family, n) if n > 1 else None) for n in args.cache_intervals])
    vae = _load_vae(args, device, ckpt.family)

    def to_array(sample):
        pixels = _pixels(vae, ckpt.family, model, sample)
        if pixels is None:  # a latent model and no VAE: the latents themselves
            return sample[0].float().cpu().numpy()
        frames = to_uint8_frames(pixels)
        return frames[0] if ckpt.family in ("dit", "hunyuan") else frames

    about = {"checkpoint": args.checkpoint, "family": ckpt.family, "sampler": req.sampler, "steps": req.steps,
             "guidance": req.guidance, "frames": req.frames, "size": req.size, "device": str(device), "dtype": args.dtype}
    summary = run(model, req, settings, Path(args.out), args.num_samples, args.batch_size, labels,
                  to_array, procs, progress=not args.no_progress, about=about)
    if procs.main:
        for row in summary["settings"]:
            rate = f"{row['samples_per_second']:.3f} samples/s" if row["samples_per_second"] else "nothing to do"
            cache = f"; Skip-Cache {row['skip_cache']}: {row['per_trajectory']}" if row.get("per_trajectory") else ""
            print(f"{row['setting']}: {row['samples']} samples in {row['npz']} ({row['made_this_run']} made now, "
                  f"{row['already_complete']} already there; {rate} on {summary['processes']} process(es)){cache}")
        print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def cmd_evaluate(args) -> int:
    from pathlib import Path

    from .evaluate import evaluate, write_report

    procs = _processes(args)
    device = _device(args.device)
    procs.join(torch.device(device))
    report = evaluate(args.samples, args.reference, inception=args.inception, i3d=args.i3d, frames=args.frames,
                      batch_size=args.batch_size, cache_dir=args.cache_dir, max_reference=args.max_reference,
                      device=device, processes=procs, progress=not args.no_progress)
    if not procs.main:
        return 0
    metric = report["metric"]
    what = f"{metric.upper()}" + (f" ({report['frames']} frames)" if metric == "fvd" else "")
    print(f"{what} against {report['reference']['path']} ({report['reference']['items']} items), "
          f"network {report['network']['path']}:")
    for row in report["results"]:
        print(f"  {row['setting']:<34} {row[metric]:12.4f}  ({row['items']} samples)")
    output = args.output
    if output is None and (Path(args.samples) / "summary.json").is_file():
        output = str(Path(args.samples) / f"evaluation-{metric}.json")
    if output:
        write_report(report, Path(output))
        print(f"wrote {output}")
    return 0


def _processes(args):
    """This process among those launched together, its GPU chosen by its local rank; `sample` on several
    processes needs --parallel (sample-many shards samples instead)."""
    from .parallel import Processes

    procs = Processes.from_environment()
    if args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{procs.local_rank}"
    if getattr(args, "parallel", None) == "none" and procs.world > 1:
        raise ValueError(f"launched on {procs.world} processes: give --parallel cfg or sequence to split one sample "
                         "over them, or use sample-many to share many samples out")
    return procs


def _labels(given: Optional[list], model) -> Optional[list[int]]:
    """--labels: integers, or 'all' for every class of the model; None when not given."""
    if not given:
        return None
    classes = getattr(model.config, "num_classes", 0)
    if given == ["all"]:
        if not classes:
            raise ValueError("--labels all: this model is not class-conditional")
        return list(range(classes))
    try:
        return [int(x) for x in given]
    except ValueError:
        raise ValueError(f"--labels takes integers or 'all', got {' '.join(given)}") from None


# A measured speedup this far above its bound is called out as timing noise (the bound counts
# only the blocks, so a real run stays below it).
NOISE_MARGIN = 1.0


def timing_noise(speedup: float, bound: float, fix: str) -> Optional[str]:
    """The warning for a measured speedup above its bound (what `fix` to raise), or None."""
    if speedup <= bound * NOISE_MARGIN:
        return None
    return f"measured {speedup:.2f}x is above the bound {bound:.2f}x: timing noise ({fix})"


def timed_runs(model, req, caches: list, repeats: int) -> list:
    """One Result per setting in `caches` (None = uncached), its `seconds` the fastest of `repeats`
    runs. A short uncached run first warms up the kernels (and CUDA); then every round runs each
    setting once, alternating, so that a slow spell of a shared machine hits all settings alike.
    Sampling is deterministic: every run of a setting gives the same sample."""
    from dataclasses import replace

    from .pipeline import generate

    generate(model, replace(req, steps=2), None)
    best: list = [None] * len(caches)
    for round_ in range(repeats):
        for i, cache in enumerate(caches):
            label = "uncached" if cache is None else f"n={cache.interval}"
            res = generate(model, req, cache, progress=_Progress(f"{label} ({round_ + 1}/{repeats})"))
            if best[i] is None or res.seconds < best[i].seconds:
                best[i] = res
    return best


def cmd_bench(args) -> int:
    from .diffusion import make_sampler
    from .media import psnr, ssim

    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    model, ckpt = _load(args)
    req = _request(args, model, ckpt.family)
    if args.presets:
        from .skip_cache_presets import preset_config

        caches = [None] + [preset_config(ckpt.family, model.stack.num_skips > 0, name) for name in args.presets]
    else:
        caches = [None] + [_cache_config(args, ckpt.family, n) for n in args.intervals]
    base, *cached = timed_runs(model, req, caches, args.repeats)
    vae = _load_vae(args, base.sample.device, ckpt.family)
    ref = _pixels(vae, ckpt.family, model, base.sample)
    pixels = ref is not None
    # pixels are compared as written (clamped to [-1, 1]); latents over the reference's own range
    prep = (lambda z: z.clamp(-1, 1)) if pixels else (lambda z: z)  # noqa: E731
    ref = prep(ref if pixels else base.sample)
    data_range = 2.0 if pixels else float(ref.max() - ref.min())
    rows = [dict(setting="uncached", seconds=base.seconds, speedup=1.0, bound=1.0, full=None, cached=0, empty=0,
                 psnr=float("inf"), ssim=1.0, warning=None)]
    for cache, res in zip(caches[1:], cached):
        out = _pixels(vae, ckpt.family, model, res.sample)
        out = prep(out if out is not None else res.sample)
        speedup = base.seconds / res.seconds
        rows.append(dict(
            setting=cache.describe(), seconds=res.seconds,
            speedup=speedup, bound=res.speedup_bound, full=res.stats.full_steps,
            cached=res.stats.cached_steps, empty=res.stats.empty_steps, psnr=psnr(out, ref, data_range),
            ssim=ssim(out, ref, data_range),
            warning=timing_noise(speedup, res.speedup_bound, "raise --repeats"),
        ))
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "family": ckpt.family, "repeats": args.repeats,
                          "timing": "fastest of the repeats, settings alternating, after a warm-up", "rows": rows},
                         indent=2))
        return 0
    steps = len(make_sampler(req.family, req.sampler, req.steps))
    print(f"{args.checkpoint}: {ckpt.family}, {req.sampler} {steps} steps, seed {req.seed}; "
          f"fastest of {args.repeats} alternating runs each, after a warm-up")
    print(f"{'setting':<34} {'full/cached':>11} {'seconds':>8} {'speedup':>8} {'bound':>6} {'PSNR dB':>8} {'SSIM':>6}")
    for r in rows:
        fc = "all full" if r["full"] is None else f"{r['full']}/{r['cached']}"
        mark = " *" if r["warning"] else ""
        print(f"{r['setting']:<34} {fc:>11} {r['seconds']:>8.2f} {r['speedup']:>7.2f}x {r['bound']:>5.2f}x "
              f"{r['psnr']:>8.2f} {r['ssim']:>6.3f}{mark}")
    for r in rows:
        if r["warning"]:
            print(f"* {r['setting']}: {r['warning']}")
    return 0


def request_args(sp) -> None:
    """The checkpoint and what to generate with it (sample, bench, analyze)."""
    sp.add_argument("checkpoint")
    sp.add_argument("--label", type=int, help="class label (class-conditional models)")
    sp.add_argument("--text-embeddings", help=".safetensors with prompt_embeds (T5 for Latte T2V; CLIP + prompt_embeds_2 T5 for "
                    "Hunyuan-DiT; umT5 for Wan)")
    sp.add_argument("--frames", type=int, help="video frames (default: the model's)")
    sp.add_argument("--size", type=int, help="latent height = width (default: the model's)")
    sp.add_argument("--sampler", choices=["ddpm", "ddim", "euler"],
                    help="default: ddpm (analyze: ddim); Wan: euler, its only one (flow matching)")
    sp.add_argument("--steps", type=int, help="default: DDPM 250 (Hunyuan-DiT 100), DDIM 50, Euler 50")
    sp.add_argument("--shift", type=float,
                    help="Wan's flow shift: sigma = shift s / (1 + (shift - 1) s); default 5 (Wan's own; ComfyUI's templates: "
                         "8 for 2.1 T2V 1.3B and 2.2 TI2V 5B)")
    sp.add_argument("--guidance", type=float, help="classifier-free guidance scale (> 1 enables it)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--vae", help="a local diffusers AutoencoderKL folder (Wan: AutoencoderKLWan), to decode latent models")
    sp.add_argument("--device", help="default: cuda if available, else cpu")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    sp.add_argument("--skip-branches", metavar="FILE",
                    help="a Skip-Wan's skip branches (skipdit extract-branches) to attach to the checkpoint, its base Wan")


def generation_args(sp, bench: bool) -> None:
    request_args(sp)
    if bench:
        sp.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4], help="Skip-Cache intervals to compare")
        sp.add_argument("--presets", nargs="+", choices=PRESET_SPEEDS,
                        help="compare these Skip-Cache presets instead of --intervals")
        sp.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each setting, alternating (the fastest kept; default 3)")
        sp.add_argument("--json", action="store_true")
    else:
        sp.add_argument("--cache-interval", type=int, default=1, help="Skip-Cache interval n (1 = off)")
        preset_arg(sp)
    cache_args(sp)


def preset_arg(sp) -> None:
    sp.add_argument("--cache-preset", choices=PRESET_SPEEDS,
                    help="a Skip-Cache preset named by speed, chosen on tuning seeds and reported on held-out ones "
                         "(docs/presets.md); replaces the other --cache-* options")


def cache_args(sp) -> None:
    """The Skip-Cache window, depth and forecast (the interval is each command's own)."""
    sp.add_argument("--cache-start", type=float, help="window start timestep (default: the authors' per family)")
    sp.add_argument("--cache-end", type=float, help="window end timestep")
    sp.add_argument("--cache-start-percent", type=float, help="window start as sampling progress 0..1")
    sp.add_argument("--cache-end-percent", type=float, help="window end as sampling progress 0..1")
    sp.add_argument("--cache-depth", type=int, help="units recomputed at each end (default: DiT 4, others 1)")
    sp.add_argument("--cache-forecast", type=int, choices=[0, 1, 2], default=0,
                    help="cached steps: 0 reuse the last full step's deep state (the paper), 1 / 2 forecast it "
                         "(a polynomial in t through the last 2 / 3 full steps)")
    sp.add_argument("--cache-forecast-damping", type=float, default=1.0,
                    help="the fraction of the forecast's change from the last full state applied (default 1: all "
                         "of it; e.g. --cache-interval 3 --cache-forecast 1 --cache-forecast-damping 0.7)")
    sp.add_argument("--cache-empty-steps", type=int, default=0,
                    help="of the n-1 cached steps of each interval, the last ones that run no unit: the model's "
                         "output features are forecast (reused with --cache-forecast 0); 0..n-1")
    sp.add_argument("--cache-forecast-warmup", action="store_true",
                    help="run in full the steps that would be cached before the forecast holds its order + 1 full steps")
    sp.add_argument("--cache-reuse", choices=("state", "residual"), default="state",
                    help="what cached steps take from the full ones: the deep state h_{L-k} (the paper; default) or the "
                         "middle's residual h_{L-k} - h_k added to their own h_k (First Block Cache's kind of reuse)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skipdit", description="Skip-DiT models and Skip-Cache.")
    p.add_argument("--version", action="version", version=f"skipdit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def detection_args(sp):
        sp.add_argument("--family", choices=list(models.FAMILIES), help="skip family detection")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a detected config field (repeatable)")

    info = sub.add_parser("info", help="what the loader detects in a checkpoint")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print JSON")
    detection_args(info)
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="write a checkpoint's model weights as .safetensors with its config")
    conv.add_argument("checkpoint")
    conv.add_argument("output")
    conv.add_argument("--dtype", choices=list(DTYPES), help="cast floating-point weights")
    detection_args(conv)
    conv.set_defaults(func=cmd_convert)
    ext = sub.add_parser("extract-branches", help="write a Skip-Wan's skip branches alone (a few %% of its parameters), "
                         "to attach to its base Wan (--skip-branches, ComfyUI's Load Skip Branches)")
    ext.add_argument("checkpoint", help="a Skip-Wan checkpoint (or training run)")
    ext.add_argument("-o", "--output", required=True, help="the branches file (.safetensors)")
    ext.add_argument("--base", help="the base model the Skip-Wan was trained from (recorded in the file, e.g. its file name)")
    ext.add_argument("--dtype", choices=list(DTYPES), help="cast the branch weights (default: as in the checkpoint)")
    ext.add_argument("--fusion", choices=list(SKIP_FUSIONS),
                     help="the skip fusion, for a checkpoint whose metadata does not say it (default: its metadata's, else "
                          "replace, the paper's); a value that contradicts the metadata is refused")
    ext.set_defaults(func=cmd_extract_branches)

    new = sub.add_parser("new", help="write a freshly initialised model of a preset (a starting point for training)")
    new.add_argument("output", help="a .safetensors path")
    new.add_argument("--family", required=True, choices=list(models.FAMILIES))
    new.add_argument("--preset", help="e.g. DiT-XL/2, Latte-XL/2, Latte-1-skip (see --list-presets)")
    new.add_argument("--set", action="append", metavar="KEY=VALUE", help="set a config field (repeatable), e.g. skip=true")
    new.add_argument("--seed", type=int, default=0)
    new.set_defaults(func=cmd_new)

    many = sub.add_parser("sample-many", help="many samples for evaluation (FID / FVD): sharded over the processes of "
                          "torchrun / accelerate launch, resumable, one .npz per setting and a summary.json")
    request_args(many)
    many.add_argument("--num-samples", type=int, required=True)
    many.add_argument("--out", required=True, help="output folder (one sub-folder and one .npz per setting, summary.json)")
    many.add_argument("--labels", nargs="+", metavar="LABEL",
                      help="class labels sample i cycles through (labels[i %% len]); 'all': every class of the model")
    many.add_argument("--batch-size", type=int, default=1,
                      help="samples per model call; a sample depends on it, not on the number of processes")
    many.add_argument("--cache-intervals", type=int, nargs="+", default=[1],
                      help="one setting per Skip-Cache interval, 1 = uncached (e.g. 1 2 3)")
    preset_arg(many)
    cache_args(many)
    many.add_argument("--no-progress", action="store_true")
    many.set_defaults(func=cmd_sample_many)

    ev = sub.add_parser(
        "evaluate", help="FID (images) / FVD (videos) of sample-many outputs against a reference set; features cached",
        description="FID with the TorchScript Inception of StyleGAN2-ADA / StyleGAN-V (--inception, 2048-d pool "
                    "features, uint8 images), FVD with StyleGAN-V's TorchScript I3D (--i3d, 400-d, the first --frames "
                    "frames in [-1, 1]); local files only, nothing is downloaded. Each set's features are cached "
                    "(beside it or in --cache-dir); under torchrun / accelerate launch every process extracts a share.")
    ev.add_argument("samples", help="a sample-many --out folder (every setting in its summary.json), one setting's "
                    ".npz or folder of .npy, or any .npz of uint8 arrays (arr_0)")
    ev.add_argument("--reference", required=True,
                    help="a folder of videos (mp4, webm, avi, ...) or images (png, jpg, ...; needs Pillow), searched "
                         "recursively, or an .npz of uint8 arrays (arr_0: (N, [F,] H, W, 3))")
    ev.add_argument("--inception", metavar="PATH", help="FID: inception-2015-12-05.pt (TorchScript)")
    ev.add_argument("--i3d", metavar="PATH", help="FVD: i3d_torchscript.pt (TorchScript)")
    ev.add_argument("--frames", type=int, default=16,
                    help="FVD: the first F frames of every video (default 16, FVD-16); shorter videos are discarded")
    ev.add_argument("--max-reference", type=int, metavar="N",
                    help="only the first N reference items (sorted by path; StyleGAN-V's fvd2048_16f takes 2048)")
    ev.add_argument("--batch-size", type=int, default=8, help="items per network call and per cached chunk")
    ev.add_argument("--cache-dir", help="where features are cached (default: beside each set); one all processes see")
    ev.add_argument("-o", "--output", help="a JSON report (default for a sample-many folder: <folder>/evaluation-<metric>.json)")
    ev.add_argument("--device", help="default: cuda if available (cuda:LOCAL_RANK under a launcher), else cpu")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    sample = sub.add_parser("sample", help="generate a video or image, optionally with Skip-Cache")
    generation_args(sample, bench=False)
    sample.add_argument("-o", "--output", default="outputs/sample.mp4", help=".mp4, .webm, .gif or .png")
    sample.add_argument("--fps", type=int, default=8)
    sample.add_argument("--parallel", choices=["none", "cfg", "sequence"], default="none",
                        help="one sample over the processes of torchrun / accelerate launch: cfg (2 processes, one "
                             "guidance half each) or sequence (tokens split, Ulysses attention; needs yunchang)")
    sample.set_defaults(func=cmd_sample)

    bench = sub.add_parser("bench", help="uncached vs Skip-Cache settings: time, speedup, bound, PSNR / SSIM")
    generation_args(bench, bench=True)
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the bundled demo model: one video without and with Skip-Cache, speedup and PSNR")
    demo.add_argument("--class", dest="label", default="circle", help="circle, square, triangle or cross (or 0..3)")
    demo.add_argument("--out", default="outputs", help="folder for the two mp4 files")
    demo.add_argument("--interval", type=int, default=2, help="Skip-Cache interval n")
    demo.add_argument("--steps", type=int, default=50, help="DDIM steps")
    demo.add_argument("--guidance", type=float, default=4.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--repeats", type=int, default=3, help="timed runs of each (the fastest is kept)")
    demo.add_argument("--model", help="another checkpoint of the demo's kind (default: the bundled Skip-Latte)")
    demo.add_argument("--scale", type=int, help="upscale the written videos (nearest neighbour; default: to >= 128 px)")
    demo.set_defaults(func=cmd_demo)

    analyze = sub.add_parser("analyze", help="feature dynamics heatmap (paper Figure 4) and suggested Skip-Cache settings")
    request_args(analyze)
    analyze.set_defaults(ddpm_family_sampler="ddim", func=cmd_analyze)
    analyze.add_argument("--twin", help="a vanilla twin checkpoint (no long skips) to draw beside it")
    analyze.add_argument("--threshold", type=float, default=0.99,
                         help="cosine similarity the reused deep feature must keep to the previous step inside the window (default 0.99)")
    analyze.add_argument("--cache-depth", type=int, default=1, help="units recomputed at each end (k)")
    analyze.add_argument("--max-lag", type=int, default=5, help="largest reuse distance tried (interval up to max-lag + 1)")
    analyze.add_argument("-o", "--output", default="outputs/feature-dynamics.png", help="the heatmap PNG")
    analyze.add_argument("--speed", default="2x", help="the speed to suggest a setting for, e.g. 1.5x, 2x, 3x, 4x")
    analyze.add_argument("--margin", type=float, default=BUDGET_MARGIN,
                         help="block-compute budget = margin / speed (room for what is not blocks)")
    analyze.add_argument("--classes", type=int, nargs="+",
                         help="class labels of the trajectories the setting is chosen on (default: --label)")
    analyze.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                         help="seeds of those trajectories (one setting tuned on one trajectory overfits it)")
    analyze.add_argument("--seconds", type=float, default=600.0,
                         help="time budget of the search: it stops adding trajectories when the next round would pass it")

    presets = sub.add_parser("presets", help="list the model presets of every family")
    presets.set_defaults(func=cmd_presets)

    enc = sub.add_parser(
        "encode-text", help="captions -> text-encoder states for --text-embeddings or training sidecars (Latte T2V, Hunyuan-DiT, Wan)",
        description="Encode captions with local text encoders (transformers, nothing downloaded; pip install '.[text]'). "
                    "A file holds prompt_embeds (B, L, D) float32, prompt_attention_mask (B, L) int64, Hunyuan-DiT also "
                    "prompt_embeds_2 / prompt_attention_mask_2 (mT5), and with --prompt / --captions the negative_* of "
                    "--negative-prompt for guidance; B = 1 but for --captions into one .safetensors; L: the max length, "
                    "states padded to it (Wan: umT5 states of the padding zeroed, as WanPipeline gives them).")
    enc.add_argument("--family", required=True, choices=list(models.FAMILIES), help="latte_t2v (T5), hunyuan (BERT + mT5) or wan (umT5-XXL)")
    enc.add_argument("--text-encoder", required=True, metavar="DIR",
                     help="Latte T2V's T5, Hunyuan-DiT's BERT or Wan's umT5-XXL: a transformers folder (config.json, "
                          "weights, tokenizer) or a diffusers pipeline folder with text_encoder/ + tokenizer/ "
                          "(e.g. Wan2.1-T2V-1.3B-Diffusers)")
    enc.add_argument("--text-encoder-2", metavar="DIR",
                     help="Hunyuan-DiT's mT5 (default: text_encoder_2/ + tokenizer_2/ of a pipeline folder given as --text-encoder)")
    what = enc.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt -> the file --output, for skipdit sample --text-embeddings")
    what.add_argument("--captions", metavar="FILE.txt",
                      help="one caption per line (blank lines skipped) -> OUTPUT/00001.safetensors, ... named by line "
                           "number, each for skipdit sample; or, OUTPUT a .safetensors path, one file with row i the "
                           "i-th caption, for skipdit sample-many")
    what.add_argument("--caption-dir", metavar="DIR",
                      help="Latte T2V / Wan training data: for every video under DIR (recursive) its caption <name>.txt -> "
                           "<name>.safetensors beside it, the sidecar video_folder reads (prompt only, no negative)")
    enc.add_argument("-o", "--output", help="a .safetensors file (--prompt), a folder or a .safetensors file (--captions)")
    enc.add_argument("--negative-prompt", help="the unconditional half of guidance (default: the empty prompt, as the pipelines)")
    enc.add_argument("--max-length", type=int, help="tokens of the first encoder (default: Latte T2V 120, Hunyuan-DiT 77, Wan 512)")
    enc.add_argument("--max-length-2", type=int, help="tokens of Hunyuan-DiT's mT5 (default 256)")
    enc.add_argument("--batch-size", type=int, default=8, help="captions encoded at a time")
    enc.add_argument("--device", help="default: cuda if available, else cpu")
    enc.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the encoders' dtype (files are float32 anyway)")
    enc.set_defaults(func=cmd_encode_text)
    return p


def cmd_demo(args) -> int:
    from dataclasses import replace

    from .demo import DEMO_CACHE, DEMO_MODEL, run_demo

    cache = replace(DEMO_CACHE, interval=args.interval)
    print(f"demo model {args.model or DEMO_MODEL}: class {args.label!r}, DDIM {args.steps} steps, guidance {args.guidance}, "
          f"seed {args.seed}; Skip-Cache {cache.describe()}")
    r = run_demo(args.out, args.label, cache, steps=args.steps, guidance=args.guidance, seed=args.seed,
                 repeats=args.repeats, model_path=args.model, scale=args.scale)
    print(f"without Skip-Cache: {r.uncached_seconds:.3f} s -> {r.uncached_path}")
    print(f"with Skip-Cache:    {r.cached_seconds:.3f} s -> {r.cached_path} ({r.summary})")
    print(f"speedup {r.speedup:.2f}x (bound {r.speedup_bound:.2f}x), PSNR {r.psnr:.2f} dB, SSIM {r.ssim:.3f} "
          "(cached vs uncached, same seed)")
    noise = timing_noise(r.speedup, r.speedup_bound, "a busy machine; raise --repeats")
    if noise:
        print(f"note: {noise}")
    return 0


def cmd_analyze(args) -> int:
    import os

    from .analyze import plot_dynamics, record_dynamics, suggest
    from .loading import load_model

    panels = []
    for path in [args.checkpoint] + ([args.twin] if args.twin else []):
        model, ckpt = load_model(path, dtype=DTYPES[args.dtype], device=_device(args.device))
        if not panels:  # --skip-branches belong to the checkpoint, not to the twin
            model, ckpt = _with_branches(args, model, ckpt)
        req = _request(args, model, ckpt.family)
        if not panels:
            skip_model, skip_req, skip_ckpt = model, req, ckpt
        dyn = record_dynamics(model, req, max_lag=args.max_lag, progress=_Progress(os.path.basename(path)))
        panels.append((path, dyn))
        unit = dyn.cached_unit(args.cache_depth)  # the reused unit, or its place in a vanilla twin
        print(f"{path}: {dyn.num_units} units, {dyn.num_skips} long skips, {len(dyn.timesteps)} {req.sampler} steps "
              f"({dyn.seconds:.1f} s); unit {unit} vs the previous step: mean cosine {dyn.mean_similarity(unit):.4f}, "
              f"min {float(dyn.similarity[0, unit].nan_to_num(2.0).min()):.4f}")
    skip_dyn = panels[0][1]
    tip = suggest(skip_dyn, args.threshold, args.cache_depth)
    short = lambda p: p if len(p) <= 60 else "..." + p[-57:]  # noqa: E731
    names = [f"{short(p)} ({'skip' if d.num_skips else 'vanilla'})" for p, d in panels]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    plot_dynamics(list(zip(names, [d for _, d in panels])), args.output, tip, args.cache_depth)
    print(f"heatmap: {args.output}")
    if tip is not None:
        print(f"smooth window of the reused feature (unit {skip_dyn.cached_unit(args.cache_depth)}, cosine >= "
              f"{args.threshold}): interval {tip.interval}, t {tip.start} -> {tip.end} ({tip.stats.summary()})")
    elif skip_dyn.num_skips:
        print(f"the reused feature (unit {skip_dyn.cached_unit(args.cache_depth)}) never stays above {args.threshold} "
              "between two steps")
    _suggest_from_trajectories(args, skip_model, skip_req, skip_ckpt.family)
    return 0


def _suggest_from_trajectories(args, model, req, family: str) -> None:
    """The setting for --speed chosen on classes x seeds (skipdit_core.cache_search), and the presets scored on the
    same trajectories beside it."""
    from dataclasses import replace

    from .cache_search import Reference, block_compute, candidates, score, search
    from .skip_cache_presets import PRESETS, speed_budget

    budget = speed_budget(args.speed, args.margin)
    classes = args.classes if args.classes else [req.label]
    reqs = [replace(req, label=c, seed=s) for c in classes for s in args.seeds]
    skips = model.stack.num_skips > 0
    print(f"choosing a Skip-Cache setting for {args.speed} (at most {budget:.0%} of the block compute) on "
          f"{len(reqs)} trajectories (classes {classes} x seeds {args.seeds}), within {args.seconds:g} s")
    ref = Reference(model, reqs)
    rows = search(model, reqs, budget, candidates(skips, depth=args.cache_depth), seconds=args.seconds,
                  reference=ref, log=lambda line: print("  " + line))
    best, used = rows[0], rows[0]["trajectories"]
    c = best["config"]
    print(f"suggested Skip-Cache: {c.describe()}: {best['compute']:.0%} of the block compute (bound "
          f"{1 / best['compute']:.2f}x), PSNR to the uncached output {best['psnr']:.2f} dB (min {best['psnr_min']:.2f}) "
          f"over {used} trajectories")
    flags = (f"--cache-interval {c.interval} --cache-start {c.start:g} --cache-end {c.end:g} --cache-depth {c.depth} "
             f"--cache-forecast {c.forecast}")
    flags += f" --cache-forecast-damping {c.forecast_damping:g}" if c.forecast and c.forecast_damping != 1.0 else ""
    flags += f" --cache-empty-steps {c.empty_steps}" if c.empty_steps else ""
    flags += " --cache-forecast-warmup" if c.forecast_warmup else ""
    print(f"  skipdit sample ... {flags}")
    print(f"  ComfyUI Apply Skip-Cache (settings custom): interval {c.interval}, start {c.start:g}, end {c.end:g} "
          f"(timesteps), depth {c.depth}, forecast {c.forecast}, forecast_damping {c.forecast_damping:g}, "
          f"empty_steps {c.empty_steps}, forecast_warmup {c.forecast_warmup}")
    presets = PRESETS.get((family, skips), {})
    if not presets:
        print("  (no presets exist for this kind of model to compare with)")
        return
    ts = ref.schedule()
    print(f"  the presets on the same {used} trajectories:")
    for name, config in presets.items():
        f = block_compute(config, ts, model.stack.num_units, model.stack.num_skips, family)
        s = score(model, config, ref, used)
        print(f"    preset {name}: {config.describe()}: {f:.0%} of the block compute, PSNR {s['psnr']:.2f} dB "
              f"(min {s['psnr_min']:.2f})")


def cmd_presets(args) -> int:
    for name, fam in models.FAMILIES.items():
        print(f"{name}: {fam.description}")
        for preset, values in fam.presets.items():
            print(f"  {preset:24s} " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return 0


def cmd_encode_text(args) -> int:
    from . import text_encoding as te

    plan = te.plan_outputs(args.family, prompt=args.prompt, captions=args.captions, caption_dir=args.caption_dir,
                           output=args.output)
    shapes = te.write_embeddings(plan, args.family, [args.text_encoder, args.text_encoder_2],
                                 max_lengths=[args.max_length, args.max_length_2], negative_prompt=args.negative_prompt,
                                 batch_size=args.batch_size, dtype=DTYPES[args.dtype],
                                 device=_device(args.device))
    paths = list(dict.fromkeys(path for _, path in plan.items))
    where = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
    print(f"wrote {where}: " + ", ".join(f"{k} {s}" for k, s in shapes.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError) as e:
        print(f"skipdit: error: {e}", file=sys.stderr)
        return 2
