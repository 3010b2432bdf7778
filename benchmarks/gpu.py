"""The GPU figures the docs lack, in one command on one NVIDIA GPU (sized from the FLOP counts to take under 8
minutes on an H100 / H200; not yet run on a GPU):

    python benchmarks/gpu.py                      # writes docs/gpu.md and prints it
    python benchmarks/gpu.py --compile            # the same with each model wrapped in torch.compile
    python benchmarks/gpu.py --peak-tflops 500    # a device not in PEAK_TFLOPS
    python benchmarks/gpu.py --dry --out /tmp/gpu.md   # tiny shapes on the CPU, fp32, 3 steps (the tests run it)

Measured, bf16, random weights (speed does not depend on them), classifier-free guidance as one batch of 2:
1. Speed per family at its full-size shape (FULL): uncached, Skip-Cache n = 2 in the family's AUTHORS_SETTINGS
   window, and n = 3 1000 -> 0 forecast 1 damping 0.7 (README), each timed through `pipeline.generate` as
   benchmarks/speed.py does (its `build`, `request`, `settings`, `label`; uncached first and again last, the
   faster of the two is the reference), with the peak memory (torch.cuda.max_memory_allocated) of each run.
2. `sample-many` throughput (samples/s, `skipdit_core.sample_many.run`) at the Latte-XL/2 shape, uncached
   and with Skip-Cache n = 2 (Latte's authors' window).
3. The uncached forward's share of the device's dense bf16 peak: `model_flops` (attention + MLP matmuls counted
   from the shapes, see `block_flops`) x 2 CFG rows x steps / the uncached run's seconds / the peak. Checked
   >= 50% at the Latte-XL/2 shape: PASS or FAIL is printed and written (a FAIL still exits 0).
4. One stage-1 step of the Skip-Wan conversion: the model of training/configs/convert-wan2.1-t2v-1.3B-stage1.yaml
   (Wan 2.1 1.3B with 15 long skips in the residual fusion) and its way of training (bf16 autocast over float32
   weights, activation checkpointing of the blocks, AdamW on the skip branches only, a float32 EMA of the whole
   model updated each step), on one 480p clip of 33 frames (latent 9 x 60 x 104, 14,040 tokens; the recipe's data
   has 81 frames, 32,760 tokens) and 512 text tokens: seconds per step (the mean of STAGE1_STEPS after one warm-up
   step) and the peak memory.

The attention is PyTorch's fused `scaled_dot_product_attention` already (the models and
skipdit_core/parallel.py `attend` call it); `--compile` additionally compiles each model (`nn.Module.compile`,
in place, so `generate` sees the same module).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from speed import build, label, request, settings  # noqa: E402

from skipdit_core.loading import DTYPES  # noqa: E402
from skipdit_core.models import build_model, make_config  # noqa: E402
from skipdit_core.pipeline import generate  # noqa: E402
from skipdit_core.sample_many import Setting  # noqa: E402
from skipdit_core.sample_many import run as sample_many  # noqa: E402
from skipdit_core.skip_cache import AUTHORS_SETTINGS  # noqa: E402

FAMILIES = ["dit", "latte", "latte_t2v", "hunyuan", "wan"]
# Per family: preset, video frames (latent), latent size (height = width), text tokens of the random text states.
FULL = {
    "dit": {"preset": "DiT-XL/2", "frames": 1, "size": 32, "what": "256^2"},
    "latte": {"preset": "Latte-XL/2-ucf101", "frames": 16, "size": 32, "what": "16 x 256^2"},
    "latte_t2v": {"preset": "Latte-1-skip", "frames": 16, "size": 64, "text": 120, "what": "16 x 512^2, 120 T5 tokens"},
    "hunyuan": {"preset": "HunyuanDiT-v1.2", "frames": 1, "size": 128, "what": "1024^2, 77 + 256 text tokens"},
    # 33 video frames (9 latent) of 512^2: 9,216 tokens (480p x 81 frames is 32,760 and would not fit the 8 minutes)
    "wan": {"preset": "1.3B", "frames": 9, "size": 64, "text": 512, "what": "Wan 2.1 1.3B, 33 x 512^2, 512 text tokens"},
}
TINY = {
    "dit": {"preset": "DiT-tiny", "frames": 1, "size": 8, "what": "tiny"},
    "latte": {"preset": "Latte-tiny", "frames": 4, "size": 8, "what": "tiny"},
    "latte_t2v": {"preset": "Latte-T2V-tiny", "frames": 4, "size": 8, "text": 6, "what": "tiny"},
    "hunyuan": {"preset": "HunyuanDiT-tiny", "frames": 1, "size": 16, "what": "tiny"},
    "wan": {"preset": "tiny", "frames": 2, "size": 8, "text": 8, "what": "tiny"},
}
# Dense (no sparsity) bf16 tensor-core peaks, TFLOPS, by a substring of torch.cuda.get_device_name().
# The first name found in the device name wins (so "H100 PCIe" before "H100", the SXM part).
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
CHECK_FAMILY, CHECK_SHARE = "latte", 0.50
# Stage 1 of the Wan 2.1 1.3B conversion: latent (frames, height, width) of 33 frames at 480 x 832, text tokens.
STAGE1 = {"preset": "1.3B", "skips": 15, "latent": (9, 60, 104), "text": 512, "what": "480p (480 x 832), 33 frames"}
STAGE1_TINY = {"preset": "tiny", "skips": 1, "latent": (2, 8, 8), "text": 8, "what": "tiny"}
STAGE1_STEPS = 5


def block_flops(width: int, tokens: int, heads: int, attn_len: int | None = None, mlp_hidden: int | None = None,
                text_tokens: int = 0) -> int:
    """Matmul FLOPs (a multiply-add = 2) of one transformer block on one sample of `tokens` tokens of width D:

        qkv + out projections      8 T D^2
        attention scores + mixing  4 T S D      S = attn_len, the tokens each token attends to (default T);
                                                per head 2 T S (D / heads) x 2, so the heads cancel
        MLP                        4 T D H      H = mlp_hidden (default 4 D)
        cross-attention (L > 0)    4 T D^2 + 4 L D^2 + 4 T L D   (q, out; k, v of the L text tokens; scores, mixing)

    Norms, adaLN modulation, embeddings, the head and the Skip fusion layers are not counted (a lower bound)."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} heads")
    d, t = width, tokens
    s = tokens if attn_len is None else attn_len
    h = 4 * width if mlp_hidden is None else mlp_hidden
    flops = 8 * t * d * d + 4 * t * s * d + 4 * t * d * h
    if text_tokens:
        flops += 4 * t * d * d + 4 * text_tokens * d * d + 4 * t * text_tokens * d
    return flops


def model_flops(family: str, c, frames: int, size: int, text_tokens: int = 0) -> int:
    """`block_flops` summed over the blocks of one forward on one sample. Latte: `depth` blocks, half spatial
    (attending within a frame), half temporal (across the frames of a position); Latte T2V: `num_layers`
    spatial blocks with cross-attention to the text and as many temporal blocks without; Hunyuan-DiT and Wan:
    cross-attention to their 77 + 256 / 512 text tokens."""
    if family == "wan":
        t = frames * (size // c.patch_size[1]) * (size // c.patch_size[2])
        return c.num_layers * block_flops(c.dim, t, c.num_heads, mlp_hidden=c.ffn_dim, text_tokens=c.text_len)
    if family == "latte_t2v":
        width, per_frame = c.num_heads * c.head_dim, (size // c.patch_size) ** 2
        t, mlp = frames * per_frame, int(width * c.mlp_ratio)
        return c.num_layers * (block_flops(width, t, c.num_heads, per_frame, mlp, text_tokens)
                               + block_flops(width, t, c.num_heads, frames, mlp))
    per_frame = (size // c.patch_size) ** 2
    if family == "latte":
        t, mlp = frames * per_frame, int(c.hidden_size * c.mlp_ratio)
        return c.depth // 2 * (block_flops(c.hidden_size, t, c.num_heads, per_frame, mlp)
                               + block_flops(c.hidden_size, t, c.num_heads, frames, mlp))
    text = c.text_len + c.text_len_t5 if family == "hunyuan" else 0
    return c.depth * block_flops(c.hidden_size, per_frame, c.num_heads, mlp_hidden=int(c.hidden_size * c.mlp_ratio),
                                 text_tokens=text)


def make_model(family: str, preset: str, device, dtype, compile_: bool):
    """speed.py's `build` (the skip model of the preset, initialised on the CPU, then moved); Wan: the released
    shape (no long skips; Skip-Cache cuts its plain stack). `compile_`: `nn.Module.compile` in place."""
    if family == "wan":
        torch.manual_seed(0)
        model = build_model(family, make_config(family, {}, preset=preset)).to(device=device, dtype=dtype).eval()
    else:
        model = build(family, preset, device, dtype)
    if compile_:
        model.compile()
    return model


def make_request(family: str, model, shape: dict, steps: int):
    """speed.py's `request` (DDIM, guidance 4); Wan: its flow Euler sampler; text families: random text states."""
    req = replace(request(family, model, shape["frames"], shape["size"], steps), steps=steps)
    c = model.config
    if family in ("latte_t2v", "wan"):
        width = c.caption_channels if family == "latte_t2v" else c.text_dim
        g = torch.Generator().manual_seed(1)
        req = replace(req, label=None, text={"prompt_embeds": torch.randn(1, shape["text"], width, generator=g)})
    if family == "wan":
        req = replace(req, sampler=None)
    return req


def cache_settings(family: str, max_depth: int) -> list:
    """None, n = 2 in the family's authors' window, n = 3 1000 -> 0 forecast 1 damping 0.7 (speed.py's `settings`),
    at the authors' k (capped at the model's deepest cut: DiT's k = 4 does not fit DiT-tiny)."""
    a = AUTHORS_SETTINGS[family]
    depth = min(a.depth, max_depth)
    authors = settings([2], [f"{a.start:g}:{a.end:g}"], depth, False)
    forecast = settings([3], ["1000:0"], depth, False, forecasts=(1,), damping=0.7)
    return authors + forecast[1:]


def warm_up(model, req, configs: list, compiled: bool) -> None:
    """Kernels and the allocator: a short uncached run; compiled, a run of every setting (the capturing and the
    cached steps of Skip-Cache are further graphs), so that no compilation falls into a timed run."""
    with torch.no_grad():
        for cache in configs if compiled else [None]:
            generate(model, replace(req, steps=4 if compiled else 2), cache)


def timed(model, req, cache, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = generate(model, req, cache)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return result, peak


def gib(peak) -> str:
    return f"{peak:.2f}" if peak is not None else "n/a (CPU)"


def speed_rows(family: str, shape: dict, args, device, dtype, cuda: bool, peak_tflops):
    model = make_model(family, shape["preset"], device, dtype, args.compile)
    req = make_request(family, model, shape, args.steps)
    rows, configs = [], cache_settings(family, model.stack.max_depth)
    warm_up(model, req, configs, args.compile)
    for cache in configs:
        result, peak = timed(model, req, cache, cuda)
        rows.append({"family": family, "setting": label(cache) if cache else "uncached", "seconds": result.seconds,
                     "peak": peak, "full": result.stats.full_steps if cache else args.steps,
                     "cached": result.stats.cached_steps if cache else 0, "bound": result.speedup_bound})
    again, peak = timed(model, req, None, cuda)  # uncached again: the faster of the two is the reference
    rows[0]["seconds"] = min(rows[0]["seconds"], again.seconds)
    rows[0]["peak"] = max(rows[0]["peak"], peak) if cuda else None
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    text = shape.get("text", 0) if family == "latte_t2v" else 0
    flops = 2 * args.steps * model_flops(family, model.config, shape["frames"], shape["size"], text)  # 2 CFG rows
    achieved = flops / rows[0]["seconds"] / 1e12
    share = achieved / peak_tflops if peak_tflops else None
    peak_row = {"family": family, "preset": shape["preset"], "shape": shape["what"], "tflop_step": flops / args.steps / 1e12,
                "ms_step": 1e3 * rows[0]["seconds"] / args.steps, "tflops": achieved, "share": share}
    del model
    if cuda:
        torch.cuda.empty_cache()
    return rows, peak_row


def throughput_rows(shape: dict, args, device, dtype, cuda: bool):
    model = make_model("latte", shape["preset"], device, dtype, args.compile)
    req = make_request("latte", model, shape, args.steps)
    rows, configs = [], cache_settings("latte", model.stack.max_depth)[:2]
    warm_up(model, replace(req, batch=args.batch_size), configs, args.compile)  # at the batch size
    with tempfile.TemporaryDirectory() as out, torch.no_grad():
        for cache in configs:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            summary = sample_many(model, req, [Setting.of(cache)], Path(out), args.num_samples, args.batch_size,
                                  labels=[1], progress=False)
            row = summary["settings"][0]
            rows.append({"setting": label(cache) if cache else "uncached", "samples": args.num_samples,
                         "batch": args.batch_size, "seconds": row["wall_seconds"], "per_s": row["samples_per_second"],
                         "peak": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
    del model
    if cuda:
        torch.cuda.empty_cache()
    return rows


def stage1_row(shape: dict, args, device, cuda: bool) -> dict:
    """Seconds per stage-1 step and peak memory of the Skip-Wan conversion at `shape` (module docstring, item 4)."""
    import copy

    from skipdit_core.models.wan import WAN_PRESETS
    from training.objective import make_objective
    from training.sharding import checkpoint_blocks
    from training.train import select_trainable, update_ema

    config = make_config("wan", {**WAN_PRESETS[shape["preset"]], "num_skips": shape["skips"], "skip_fusion": "residual"})
    model = build_model("wan", config).to(device).train()
    select_trainable(model, "skip_branches")
    checkpoint_blocks(model)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    objective = make_objective("wan", config, 5.0)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(1, config.in_channels, *shape["latent"], device=device, generator=g)
    text = torch.randn(1, shape["text"], config.text_dim, device=device, generator=g)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)  # the CPU's too in the dry run

    def step():
        sigma = objective.sample_timesteps(1, device, g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        with autocast:
            out = model(objective.q_sample(x0, sigma, noise), objective.model_timesteps(sigma), text)
        loss = objective.losses(out, x0, None, sigma, noise)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.999)
        return loss.detach().item()

    step()  # warm-up: allocator, kernels, optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(STAGE1_STEPS)]
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / STAGE1_STEPS
    tokens = shape["latent"][0] * (shape["latent"][1] // 2) * (shape["latent"][2] // 2)
    row = {"what": f"Wan 2.1 {shape['preset']} + {shape['skips']} skips (residual), {shape['what']}", "tokens": tokens,
           "seconds": seconds, "peak": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "finite": all(l == l and abs(l) != float("inf") for l in losses),
           "trained": sum(q.numel() for q in model.parameters() if q.requires_grad)}
    del model, optimizer, ema
    if cuda:
        torch.cuda.empty_cache()
    return row


def report(args, device_name: str, peak_tflops, speed: list, peaks: list, throughput: list, shapes: dict,
           check: str, command: str, stage1: dict) -> str:
    lines = [f"# GPU figures{' (dry run: tiny shapes, CPU, fp32; not figures)' if args.dry else ''}", "",
             f"- device: {device_name}", f"- torch {torch.__version__}", f"- date: {datetime.date.today().isoformat()}",
             f"- command: `{command}`",
             f"- dtype {args.dtype}, DDIM {args.steps} steps (Wan: flow Euler {args.steps}), guidance 4 as one batch of 2, "
             f"random weights{', torch.compile' if args.compile else ''}", "",
             "## Speed per family (uncached and Skip-Cache)", "",
             "| family | preset, shape | setting | full / cached steps | seconds | speedup | bound | peak memory, GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in speed:
        s = shapes[r["family"]]
        lines.append(f"| {r['family']} | {s['preset']}, {s['what']} | {r['setting']} | {r['full']} / {r['cached']} | "
                     f"{r['seconds']:.3f} | {r['speedup']:.2f}x | {r['bound']:.2f}x | {gib(r['peak'])} |")
    lines += ["", f"## sample-many throughput ({shapes['latte']['preset']}, {shapes['latte']['what']})", "",
              "| setting | samples | batch | seconds | samples/s | peak memory, GiB |", "|---|---:|---:|---:|---:|---:|"]
    for r in throughput:
        lines.append(f"| {r['setting']} | {r['samples']} | {r['batch']} | {r['seconds']:.3f} | {r['per_s']} | {gib(r['peak'])} |")
    lines += ["", "## Uncached forward's share of the bf16 peak", "",
              f"FLOPs: `block_flops` / `model_flops` in benchmarks/gpu.py (attention + MLP matmuls from the shapes, "
              f"x 2 CFG rows x steps) over the uncached run's whole sampling time (sampler and guidance included); peak: "
              f"{f'{peak_tflops:g} TFLOPS dense bf16' if peak_tflops else 'unknown'}. Peak memory: "
              f"torch.cuda.max_memory_allocated over the run, weights included.", "",
              "| family | preset, shape | TFLOP per step | ms per step | TFLOPS | share of peak |",
              "|---|---|---:|---:|---:|---:|"]
    for r in peaks:
        share = f"{r['share']:.1%}" if r["share"] is not None else "n/a"
        lines.append(f"| {r['family']} | {r['preset']}, {r['shape']} | {r['tflop_step']:.4g} | {r['ms_step']:.2f} | "
                     f"{r['tflops']:.4g} | {share} |")
    lines += ["", check, "", "## One stage-1 step of the Skip-Wan conversion", "",
              f"training/configs/convert-wan2.1-t2v-1.3B-stage1.yaml's model and way of training: batch 1, bf16 "
              f"autocast over float32 weights, activation checkpointing, AdamW on the skip branches only, a float32 EMA "
              f"of the whole model; the mean of {STAGE1_STEPS} steps after a warm-up step. The clip is 33 frames (the "
              "recipe's data has 81).", "",
              "| model, clip | tokens | trained parameters | seconds per step | peak memory, GiB | loss finite |",
              "|---|---:|---:|---:|---:|---|",
              f"| {stage1['what']} | {stage1['tokens']:,} | {stage1['trained']:,} | {stage1['seconds']:.3f} | "
              f"{gib(stage1['peak'])} | {'yes' if stage1['finite'] else 'NO'} |", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU, fp32, 3 steps; writes --out, never docs/")
    p.add_argument("--out", help="the markdown file (default: docs/gpu.md; --dry: a temporary file)")
    p.add_argument("--steps", type=int, help="sampling steps (default 50; --dry: 3)")
    p.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    p.add_argument("--num-samples", type=int, help="sample-many samples (default 16; --dry: 2)")
    p.add_argument("--batch-size", type=int, help="sample-many batch size (default 4; --dry: 1)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (needed for a device not in PEAK_TFLOPS)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (ignored with --dry)")
    args = p.parse_args(argv)
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.dry:
        args.steps, args.num_samples, args.batch_size = args.steps or 3, args.num_samples or 2, args.batch_size or 1
        args.dtype, args.compile, shapes, device = "fp32", False, TINY, torch.device("cpu")
        if args.out:
            out = Path(args.out)
        else:
            fd, name = tempfile.mkstemp(prefix="gpu-dry-", suffix=".md")
            os.close(fd)
            out = Path(name)
        device_name, peak_tflops = "CPU (dry run)", None
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a machine with an NVIDIA GPU, or use --dry")
        args.steps, args.num_samples, args.batch_size = args.steps or 50, args.num_samples or 16, args.batch_size or 4
        args.dtype, shapes, device = "bf16", FULL, torch.device("cuda")
        out = Path(args.out) if args.out else HERE.parent / "docs" / "gpu.md"
        device_name = torch.cuda.get_device_name()
        peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
        if peak_tflops is None:
            p.error(f"unknown bf16 peak for {device_name!r}: give --peak-tflops (known: {', '.join(PEAK_TFLOPS)})")
    dtype, cuda = DTYPES[args.dtype], device.type == "cuda"

    start = time.perf_counter()
    speed, peaks = [], []
    for family in args.families:
        rows, peak_row = speed_rows(family, shapes[family], args, device, dtype, cuda, peak_tflops)
        speed += rows
        peaks.append(peak_row)
        print(f"[{time.perf_counter() - start:.0f}s] {family}: done", file=sys.stderr, flush=True)
    throughput = throughput_rows(shapes["latte"], args, device, dtype, cuda)
    print(f"[{time.perf_counter() - start:.0f}s] sample-many: done", file=sys.stderr, flush=True)

    stage1 = stage1_row(STAGE1_TINY if args.dry else STAGE1, args, device, cuda)
    print(f"[{time.perf_counter() - start:.0f}s] stage-1 step: done", file=sys.stderr, flush=True)

    latte = next((r for r in peaks if r["family"] == CHECK_FAMILY), None)
    if args.dry:
        check = "Peak check: skipped (dry run: tiny shapes on the CPU in fp32 say nothing of a GPU's bf16 peak)."
    elif latte is None:
        check = f"Peak check: skipped ({CHECK_FAMILY} not among --families)."
    else:
        verdict = "PASS" if latte["share"] >= CHECK_SHARE else "FAIL"
        check = (f"Peak check: {verdict}: the uncached {latte['preset']} forward ({latte['shape']}) runs at "
                 f"{latte['share']:.1%} of the {peak_tflops:g} TFLOPS bf16 peak (required: >= {CHECK_SHARE:.0%}).")
    text = report(args, device_name, peak_tflops, speed, peaks, throughput, shapes, check, command, stage1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written: {out} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
