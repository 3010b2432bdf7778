"""Checks that need ComfyUI's Python objects, run in a separate process by test_comfyui_integration.py:

    python tests/comfyui_inprocess.py COMFYUI_PATH PACK_DIR BASE_DIR CHECK[,CHECK...]

ComfyUI is imported as its server does (`--cpu`, `--base-directory BASE_DIR`), the pack is loaded with
ComfyUI's own `nodes.load_custom_node`, and the nodes are called with real ComfyUI models, conditioning
and `nodes.common_ksampler`. Block calls are counted with forward hooks on the model's blocks (test-side
instrumentation, independent of the pack's own statistics). Prints one JSON object per check.

CHECK: "hunyuan" (ComfyUI's own Hunyuan-DiT through our loader and Apply Skip-Cache), "latte_t2v"
(text conditioning of two lengths: cond and uncond in separate batches), "heun" (a sampler that
evaluates the model twice per step), "pixel_clamp" (the clamped x0 of pixel-space models against
skipdit_core's sampler), "v_prediction" (the same for a v-prediction Latte), "bundled" (the models bundled in skipdit_core/assets/ are listed; a stand-in
folder replaces it), "null_caption" (Latte T2V files with and without caption_projection.y_embedding),
and the others named in run_check.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys


def setup(comfy_path: str, base_dir: str):
    sys.path.insert(0, comfy_path)
    os.chdir(comfy_path)
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = base_dir
    import nodes  # ComfyUI's nodes.py (registers the core nodes)

    return nodes


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


RECORDS = Records()  # every log record of this process (checks read the lines their runs wrote)


def block_counter(blocks):
    counts = {"calls": 0}

    def hook(module, inputs):
        counts["calls"] += 1

    for b in blocks:
        b.register_forward_pre_hook(hook)
    return counts


def to_diffusers_layout(sd: dict) -> dict:
    """Tencent-layout Hunyuan-DiT state dict -> diffusers' HunyuanDiT2DModel layout: the inverse of
    skipdit_core's mapping tables (a file as diffusers saves it, to load through the pack's loader)."""
    import re

    import torch
    from skipdit_core.models import hunyuan as h

    out = {}
    for key, value in sd.items():
        m = re.match(r"(blocks\.\d+\.)(.*)", key)
        if m is None:
            d, t = next((d, t) for d, t in h._TOP_RENAMES if key.startswith(t))
            new = d + key[len(t):]
            if key.startswith("final_layer.adaLN_modulation.1."):
                shift, scale = value.chunk(2, dim=0)
                value = torch.cat([scale, shift], dim=0)
            out[new] = value
            continue
        prefix, rest = m.groups()
        split = {"attn1.Wqkv.": ("attn1.to_q.", "attn1.to_k.", "attn1.to_v."), "attn2.kv_proj.": ("attn2.to_k.", "attn2.to_v.")}
        fused = next((f for f in split if rest.startswith(f)), None)
        if fused is not None:
            for name, part in zip(split[fused], value.chunk(len(split[fused]), dim=0)):
                out[prefix + name + rest[len(fused):]] = part
            continue
        d, t = next((d, t) for d, t in h._BLOCK_RENAMES if rest.startswith(t))
        out[prefix + d + rest[len(t):]] = value
    return out


def tiny_t5_clip():
    """A ComfyUI CLIP object with ComfyUI's PixArt T5 tokenizer and a 2-layer, 32-wide T5 encoder with random
    weights: the text path of Load CLIP (type pixart) at test size (T5-XXL itself is 4.7 B parameters)."""
    import torch

    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.t5

    config = {"d_ff": 64, "d_kv": 8, "d_model": 32, "num_heads": 4, "num_layers": 2, "vocab_size": 32128,
              "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "t5",
              "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}

    class TinyT5(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, textmodel_json_config=config, dtype=dtype, special_tokens={"end": 1, "pad": 0},
                             model_class=comfy.text_encoders.t5.T5, model_options={**model_options, "model_name": "t5xxl"})

    class TinyTE(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=TinyT5, model_options=model_options)

    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer, TinyTE))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
    return clip


def run_sampler(nodes, model, positive, negative, latent, steps, cfg, sampler="euler", seed=3, scheduler="normal"):
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out["samples"]


def rel_diff(a, b) -> float:
    return float((a - b).norm() / b.norm())


def skip_cache(node, model, n, start=1000.0, end=0.0, depth=1, forecast=0, forecast_damping=1.0, empty_steps=0,
               forecast_warmup=False, reuse="state"):
    return node.execute(model, n, "custom", "timesteps", start, end, depth, forecast, forecast_damping, empty_steps,
                        forecast_warmup, reuse).args[0]


def run_two_threads(work) -> list:
    """work(i, barrier) in two threads at once (MultiGPU CFG Split's two device workers), `barrier` a 2-party
    threading.Barrier they may wait on: the repr of what each raised. A thread that raises breaks the barrier, so the
    other fails at its next wait instead of waiting forever."""
    import threading

    errors, barrier = [], threading.Barrier(2)

    def worker(i):
        try:
            work(i, barrier)
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def compare_intervals(nodes, apply, model, counts, result, positive, negative, latent, steps, cfg) -> dict:
    """Sample the model plain, with Apply Skip-Cache n = 1 and n = 2 (same seed); record each run's block
    calls and how n = 1 / n = 2 compare with the plain run in `result`. Returns the three outputs."""
    import torch  # after ComfyUI's start-up settings, like the checks below

    runs = {}
    for name, m in (("plain", model), ("n1", skip_cache(apply, model, 1)), ("n2", skip_cache(apply, model, 2))):
        counts["calls"] = 0
        runs[name] = run_sampler(nodes, m, positive, negative, latent, steps, cfg)
        result[f"block_calls_{name}"] = counts["calls"]
    result["n1_identical"] = bool(torch.equal(runs["n1"], runs["plain"]))
    result["n2_rel_diff"] = rel_diff(runs["n2"], runs["plain"])
    return runs


def main():
    comfy_path, pack_dir, base_dir, checks = sys.argv[1:5]
    nodes = setup(comfy_path, base_dir)
    records = RECORDS
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    ok = asyncio.run(nodes.load_custom_node(pack_dir))
    pack = sys.modules[pack_dir.replace(".", "_x_")]
    for check in checks.split(","):
        records.messages.clear()
        result = run_check(check, nodes, pack, base_dir, loaded=bool(ok), records=records)
        result["log"] = [m for m in records.messages if m.startswith(("Skip-Cache", "EasyCache - "))]
        print("RESULT " + json.dumps({"check": check, **result}), flush=True)


def run_check(check, nodes, pack, base_dir, loaded, records=None):
    import torch

    loader = nodes.NODE_CLASS_MAPPINGS["SkipDiTModelLoader"]
    apply = nodes.NODE_CLASS_MAPPINGS["SkipDiTApplySkipCache"]
    state_mod = sys.modules[pack.__name__ + ".nodes.cache_state"]
    result = {"loaded": loaded}
    torch.manual_seed(0)

    if check == "hunyuan":
        model = loader.execute("hunyuan-core-tiny.safetensors", "fp32").args[0]
        dm = model.model.diffusion_model
        result["model_class"] = type(dm).__module__ + "." + type(dm).__name__
        counts = block_counter(dm.blocks)
        clip = torch.randn(1, 77, 1024) * 0.5
        t5 = torch.randn(1, 256, 2048) * 0.5
        extra = {"attention_mask": torch.ones(1, 77), "conditioning_mt5xl": t5, "attention_mask_mt5xl": torch.ones(1, 256)}
        positive = [[clip, dict(extra)]]
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        steps = 6
        runs = compare_intervals(nodes, apply, model, counts, result, positive, positive, latent, steps, 1.0)
        result["depth"] = dm.depth
        # A forecast of the cut state through the same block patches: the same blocks run, another output.
        counts["calls"] = 0
        n2_forecast = run_sampler(nodes, skip_cache(apply, model, 2, forecast=1), positive, positive, latent, steps, 1.0)
        result["block_calls_forecast"] = counts["calls"]
        result["forecast_differs"] = not bool(torch.equal(n2_forecast, runs["n2"])) and bool(torch.isfinite(n2_forecast).all())
        # forecast_damping 0 feeds the last full state (the paper's reuse), 0.5 something between
        undamped = run_sampler(nodes, skip_cache(apply, model, 2, forecast=1, forecast_damping=0.0), positive, positive, latent, steps, 1.0)
        half = run_sampler(nodes, skip_cache(apply, model, 2, forecast=1, forecast_damping=0.5), positive, positive, latent, steps, 1.0)
        result["damping_zero_is_reuse"] = bool(torch.equal(undamped, runs["n2"]))
        result["damping_half_differs"] = not bool(torch.equal(half, runs["n2"])) and not bool(torch.equal(half, n2_forecast))
        # Empty steps through patches on every block: F C E F C E runs no block on the empty steps, and the
        # log line names them; with the warm-up F F C E F C (order 1 needs two full steps).
        for name, warmup in (("empty", False), ("empty_warmup", True)):
            counts["calls"] = 0
            mark = len(records.messages)
            out = run_sampler(nodes, skip_cache(apply, model, 3, forecast=1, empty_steps=1, forecast_warmup=warmup),
                              positive, positive, latent, steps, 1.0)
            result[f"block_calls_{name}"] = counts["calls"]
            result[f"{name}_finite"] = bool(torch.isfinite(out).all())
            result[f"{name}_log"] = [m for m in records.messages[mark:] if m.startswith("Skip-Cache [")]
        # The input model is untouched: no state, no patches, and it samples as before.
        options = model.model_options["transformer_options"]
        result["input_untouched"] = state_mod.STATE_KEY not in options and not options.get("patches_replace")
        result["plain_again_identical"] = bool(torch.equal(run_sampler(nodes, model, positive, positive, latent, steps, 1.0), runs["plain"]))
        # Applied twice: the last application wins, with one set of patches and one wrapper of each kind.
        twice = skip_cache(apply, skip_cache(apply, model, 3, depth=2), 2)
        patch_mod = sys.modules[pack.__name__ + ".nodes.skip_cache_patch"]
        patches = twice.model_options["transformer_options"]["patches_replace"]["dit"]
        setup = twice.model_options["transformer_options"][state_mod.STATE_KEY]
        result["twice"] = {
            "interval": setup.config.interval,
            "patched_blocks": sorted(i for _, i in patches),
            "own_state": all(p.setup is setup and p.inner is None for p in patches.values()),
            "wrappers": [len(twice.get_wrappers(kind, patch_mod.WRAPPER_KEY)) for kind in ("outer_sample", "apply_model")],
        }
        result["steps"] = steps
        # Exact hand-over: a full call, then a cached call on the same input, through the patched model.
        patched = skip_cache(apply, model, 2)
        state = patched.model_options["transformer_options"][state_mod.STATE_KEY].new_run()
        base = patched.model
        sigma = base.model_sampling.sigma(torch.tensor([500.0]))
        x = torch.randn(1, 4, 8, 8) * float(sigma)
        conds = {"c_crossattn": clip, "text_embedding_mask": extra["attention_mask"], "encoder_hidden_states_t5": t5,
                 "text_embedding_mask_t5": extra["attention_mask_mt5xl"], "image_meta_size": torch.tensor([[64.0, 64, 64, 64, 0, 0]])}
        options = patched.model_options["transformer_options"]
        outs = []
        for i, step_sigma in enumerate((1.0, 0.5)):  # two steps: full (captures), then cached (n=2)
            cut = state.begin("k", step_sigma, 500.0)
            outs.append((cut is not None and cut.cached is not None, base.apply_model(x, sigma, transformer_options=options, **conds)))
            state.end("k", cut, 0.0)
        result["handoff_kinds"] = [kind for kind, _ in outs]
        result["handoff_exact"] = bool(torch.equal(outs[0][1], outs[1][1]))
        result["handoff_max_abs"] = float((outs[0][1] - outs[1][1]).abs().max().detach())
    elif check == "wan":
        result.update(core_wan(nodes, pack, apply, state_mod))
    elif check == "skip_branches":
        result.update(core_wan_branches(nodes, pack, loader, apply, state_mod, base_dir, records))
    elif check == "hunyuan_layouts":
        from safetensors.torch import load_file, save_file

        own = os.path.join(base_dir, "models", "skipdit")
        sd = load_file(os.path.join(own, "hunyuan-core-tiny.safetensors"))
        save_file(to_diffusers_layout(sd), os.path.join(own, "hunyuan-tiny-diffusers.safetensors"))
        aio = {"model.diffusion_model." + k: v for k, v in sd.items()}
        aio["vae.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # stands for the VAE / text encoders beside it
        save_file(aio, os.path.join(own, "hunyuan-tiny-all-in-one.safetensors"))
        files = {"tencent": "hunyuan-core-tiny.safetensors", "diffusers": "hunyuan-tiny-diffusers.safetensors",
                 "all_in_one": "hunyuan-tiny-all-in-one.safetensors"}
        weights, result["classes"] = {}, {}
        for kind, name in files.items():
            dm = loader.execute(name, "fp32").args[0].model.diffusion_model
            result["classes"][kind] = type(dm).__name__
            weights[kind] = dm.state_dict()
        result["same_weights"] = {
            kind: weights[kind].keys() == weights["tencent"].keys()
            and all(torch.equal(weights[kind][k], weights["tencent"][k]) for k in weights["tencent"])
            for kind in ("diffusers", "all_in_one")
        }
    elif check == "latte_t2v":
        model = loader.execute("latte-t2v-tiny-skip.safetensors", "default").args[0]
        dm = model.model.diffusion_model
        counts = block_counter(list(dm.transformer_blocks) + list(dm.temporal_transformer_blocks))
        positive = [[torch.randn(1, 7, 32), {}]]
        negative = [[torch.randn(1, 3, 32), {}]]  # another token count: cond and uncond run as separate batches
        latent = {"samples": torch.zeros(1, 4, 3, 8, 8)}
        steps = 6
        runs = compare_intervals(nodes, apply, model, counts, result, positive, negative, latent, steps, 3.0)
        result["shape"] = list(runs["plain"].shape)
    elif check == "null_caption":
        # The authors' Latte-skip.pt layout (bare state dict, with diffusers 0.24's y_embedding) and the
        # same weights without it, through the loader: both strict, same model outputs.
        from safetensors.torch import load_file

        own = os.path.join(base_dir, "models", "skipdit")
        sd = load_file(os.path.join(own, "latte-t2v-tiny-skip.safetensors"))
        torch.save(dict(sd, **{"caption_projection.y_embedding": torch.randn(120, 32)}), os.path.join(own, "Latte-skip-tiny.pt"))
        torch.save(sd, os.path.join(own, "Latte-skip-tiny-no-y.pt"))
        positive = [[torch.randn(1, 7, 32), {}]]
        latent = {"samples": torch.zeros(1, 4, 2, 8, 8)}
        outs = {}
        for name in ("Latte-skip-tiny.pt", "Latte-skip-tiny-no-y.pt"):
            model = loader.execute(name, "fp32").args[0]
            outs[name] = run_sampler(nodes, model, positive, positive, latent, 3, 1.0)
        a, b = outs.values()
        result["same_outputs"] = bool(torch.isfinite(a).all() and torch.equal(a, b))
    elif check == "t5":
        clip = tiny_t5_clip()
        encode = nodes.NODE_CLASS_MAPPINGS["SkipDiTLatteT2VTextEncode"]
        positive = encode.execute(clip, "a red ball bounces over a green field " * 40, 120).args[0]
        negative = encode.execute(clip, "", 120).args[0]
        result["positive_shape"] = list(positive[0][0].shape)
        result["negative_shape"] = list(negative[0][0].shape)
        model = loader.execute("latte-t2v-tiny-skip.safetensors", "default").args[0]
        latent = {"samples": torch.zeros(1, 4, 2, 8, 8)}
        plain = run_sampler(nodes, model, positive, negative, latent, 4, 4.0)
        n2 = run_sampler(nodes, skip_cache(apply, model, 2), positive, negative, latent, 4, 4.0)
        result["finite"] = bool(torch.isfinite(plain).all() and torch.isfinite(n2).all())
        result["n2_rel_diff"] = rel_diff(n2, plain)
    elif check == "vae_decode":
        import comfy.sd
        import comfy.taesd.taesd

        g = torch.Generator().manual_seed(0)  # a TAESD-shaped image VAE with random weights stands for the SD VAE
        sd = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in comfy.taesd.taesd.TAESD().state_dict().items()}
        vae = comfy.sd.VAE(sd=sd)
        latent = torch.randn(2, 4, 3, 8, 8)  # two videos of three frames
        images = nodes.NODE_CLASS_MAPPINGS["SkipDiTDecodeVideo"].execute({"samples": latent}, vae).args[0]
        result["shape"] = list(images.shape)
        # frame 2 of video 1 is image 5, decoded alone
        result["order_ok"] = bool(torch.allclose(images[5], vae.decode(latent[1:2, :, 2])[0], atol=1e-5))
    elif check == "heun":
        model = loader.execute("latte-tiny-pixels-skip.safetensors", "default").args[0]
        label = nodes.NODE_CLASS_MAPPINGS["SkipDiTClassLabel"].execute(1).args
        latent = {"samples": torch.zeros(1, 3, 4, 8, 8)}
        steps = 6
        plain = run_sampler(nodes, model, label[0], label[1], latent, steps, 3.0, sampler="heun")
        n1 = run_sampler(nodes, skip_cache(apply, model, 1), label[0], label[1], latent, steps, 3.0, sampler="heun")
        n2 = run_sampler(nodes, skip_cache(apply, model, 2), label[0], label[1], latent, steps, 3.0, sampler="heun")
        result["n1_identical"] = bool(torch.equal(n1, plain))
        result["n2_rel_diff"] = rel_diff(n2, plain)
        result["steps"] = steps
    elif check == "pixel_clamp":
        result.update(pixel_clamp(nodes, pack, loader, apply, base_dir))
    elif check == "v_prediction":
        result.update(pixel_clamp(nodes, pack, loader, apply, base_dir, "latte-tiny-pixels-v.safetensors", "v"))
    elif check == "reload":
        # MultiGPU's per-device copies (0.38 deepclone_multigpu) call cached_patcher_init[0](*[1]).
        for name in ("latte-tiny-pixels-skip.safetensors", "hunyuan-core-tiny.safetensors"):
            model = loader.execute(name, "fp32").args[0]
            factory, fargs = model.cached_patcher_init
            copy = factory(*fargs, disable_dynamic=True)
            a, b = model.model.diffusion_model.state_dict(), copy.model.diffusion_model.state_dict()
            result[name] = {
                "independent": copy.model is not model.model,
                "same_weights": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
                "has_init": getattr(copy, "cached_patcher_init", None) is not None,
            }
    elif check == "odd_sizes":
        # Latents that are not a multiple of the patch (core Empty Latent Image at 72 px gives 9 x 9 for DiT;
        # 8 px a 1 x 1 latent), and a Latte with more frames than it was trained on.
        dit = loader.execute("dit-tiny-skip.safetensors", "fp32").args[0]
        label = nodes.NODE_CLASS_MAPPINGS["SkipDiTClassLabel"].execute(1).args
        shapes = {}
        for size in ((9, 9), (1, 1), (8, 6)):
            out = run_sampler(nodes, skip_cache(apply, dit, 2), label[0], label[1], {"samples": torch.zeros(1, 4, *size)}, 3, 2.0)
            shapes[f"{size[0]}x{size[1]}"] = [list(out.shape), bool(torch.isfinite(out).all())]
        latte = loader.execute("latte-tiny-pixels-skip.safetensors", "fp32").args[0]
        out = run_sampler(nodes, latte, label[0], label[1], {"samples": torch.zeros(1, 3, 6, 9, 7)}, 3, 2.0)
        shapes["latte 6 frames 9x7"] = [list(out.shape), bool(torch.isfinite(out).all())]
        result["shapes"] = shapes
        result["warnings"] = [m for m in records.messages if m.startswith("Skip-DiT:")]
    elif check == "easycache":
        # Core EasyCache acts through the DIFFUSION_MODEL wrapper, which our forward runs; with Apply
        # Skip-Cache as well, our log line names it.
        from comfy_extras.nodes_easycache import EasyCacheNode as easy  # core's, not registered by `import nodes`

        model = loader.execute("latte-tiny-pixels-skip.safetensors", "fp32").args[0]
        label = nodes.NODE_CLASS_MAPPINGS["SkipDiTClassLabel"].execute(1).args
        latent = {"samples": torch.zeros(1, 3, 4, 8, 8)}
        plain = run_sampler(nodes, model, label[0], label[1], latent, 12, 3.0)
        cached = run_sampler(nodes, easy.execute(model, 3.0, 0.0, 1.0, False).args[0], label[0], label[1], latent, 12, 3.0)
        result["easycache_changed_output"] = not bool(torch.equal(plain, cached))
        both = easy.execute(skip_cache(apply, model, 2), 3.0, 0.0, 1.0, False).args[0]
        run_sampler(nodes, both, label[0], label[1], latent, 12, 3.0)
    elif check == "compile":
        # Apply Skip-Cache on a model that went through core's torch.compile wrapper (TorchCompileModel's
        # set_torch_compile_wrapper; backend "eager": dynamo's tracing without a C++ toolchain), both orders.
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        model = loader.execute("latte-tiny-pixels-skip.safetensors", "fp32").args[0]
        label = nodes.NODE_CLASS_MAPPINGS["SkipDiTClassLabel"].execute(1).args
        latent = {"samples": torch.zeros(1, 3, 4, 8, 8)}
        plain = run_sampler(nodes, skip_cache(apply, model, 2), label[0], label[1], latent, 6, 3.0)
        compiled = model.clone()
        set_torch_compile_wrapper(model=compiled, backend="eager")
        after = run_sampler(nodes, skip_cache(apply, compiled, 2), label[0], label[1], latent, 6, 3.0)
        before = skip_cache(apply, model, 2).clone()
        set_torch_compile_wrapper(model=before, backend="eager")
        first = run_sampler(nodes, before, label[0], label[1], latent, 6, 3.0)
        result["compile_then_cache"] = float((after - plain).abs().max())
        result["cache_then_compile"] = float((first - plain).abs().max())
    elif check == "threads":
        result.update(thread_check(nodes, pack, loader, apply))
    elif check == "bundled":
        result.update(bundled_models(pack, loader, base_dir))
    else:
        raise SystemExit(f"unknown check {check!r}")
    return result


def live_run_objects() -> dict:
    """The pack's per-run Skip-Cache objects alive now (after a full collection), by class name."""
    import gc

    gc.collect()
    alive = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in ("SkipCacheState", "SkipCacheRun", "CutForecast", "_Track"):
            alive[name] = alive.get(name, 0) + 1
    return alive


def core_wan(nodes, pack, apply, state_mod) -> dict:
    """ComfyUI's own Wan (core Load Diffusion Model) with Apply Skip-Cache: n = 1 identical, the blocks a cached
    step runs (counted), a full and a cached call on the same input agreeing, a Wan 2.2 A14B-style chain of two
    experts through two KSamplerAdvanced, and a Wan variant refused by name."""
    import torch

    import comfy.samplers
    from skipdit_core.skip_cache import SkipCacheConfig, simulate

    unet = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]()
    model = unet.load_unet("wan-core-tiny.safetensors", "default")[0]
    dm = model.model.diffusion_model
    result = {"model_class": type(dm).__module__ + "." + type(dm).__name__, "blocks": len(dm.blocks)}
    counts = block_counter(dm.blocks)
    g = torch.Generator().manual_seed(5)
    positive = [[torch.randn(1, 16, 4096, generator=g) * 0.5, {}]]
    negative = [[torch.zeros(1, 16, 4096), {}]]
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    steps = 6
    compare_intervals(nodes, apply, model, counts, result, positive, positive, latent, steps, 1.0)
    result["steps"] = steps
    # A full call, then a cached call on the same input, for each kind of reuse: fed the deep state, the cached call
    # reproduces the full one exactly; fed the residual, h_1 + (h_5 - h_1), up to rounding.
    counts["calls"] = 0
    residual_run = run_sampler(nodes, skip_cache(apply, model, 2, reuse="residual"), positive, positive, latent, steps, 1.0)
    result["block_calls_residual"] = counts["calls"]
    result["residual_rel_diff"] = rel_diff(residual_run, run_sampler(nodes, model, positive, positive, latent, steps, 1.0))
    sigma = torch.tensor([0.6])
    x = torch.randn(1, 16, 2, 8, 8, generator=g) * 0.6
    for reuse in ("state", "residual"):
        patched = skip_cache(apply, model, 2, reuse=reuse)
        options = patched.model_options["transformer_options"]
        state = options[state_mod.STATE_KEY].new_run()
        outs = []
        for step_sigma in (1.0, 0.5):
            cut = state.begin("k", step_sigma, 600.0)
            outs.append((cut.kind, patched.model.apply_model(x, sigma, c_crossattn=positive[0][0], transformer_options=options)))
            state.end("k", cut, 0.0)
        result[f"handoff_{reuse}"] = {"kinds": [kind for kind, _ in outs], "rel_diff": rel_diff(outs[1][1], outs[0][1]),
                                      "settings": options[state_mod.STATE_KEY].describe_settings()}
        del state, outs
    # The node's preset input: the Wan preset's settings, named in the settings the log line gives; core
    # Hunyuan-DiT has no presets (refused in one line, tested with the Hunyuan check's model elsewhere).
    from skipdit_core.skip_cache_presets import PRESETS

    for name in PRESETS[("wan", False)]:
        preset = apply.execute(model, 2, "auto", "timesteps", 700.0, 50.0, 1, 0, 1.0, 0, False, "state", name).args[0]
        setup = preset.model_options["transformer_options"][state_mod.STATE_KEY]
        result.setdefault("presets", {})[name] = {"config": setup.config == PRESETS[("wan", False)][name],
                                                  "settings": setup.describe_settings()}
    # Wan 2.2 A14B: a high-noise expert samples steps 0..5 of 10 and hands on its noisy latent, a low-noise expert
    # steps 5..10; each through its own Apply Skip-Cache (the paper's window 700 -> 50, n = 2).
    low = unet.load_unet("wan-core-tiny-low.safetensors", "default")[0]
    advanced = nodes.NODE_CLASS_MAPPINGS["KSamplerAdvanced"]()
    experts = [skip_cache(apply, m, 2, start=700.0, end=50.0) for m in (model, low)]  # the deep state, by default
    mark = len(RECORDS.messages)
    (half,) = advanced.sample(experts[0], "enable", 7, 10, 3.0, "euler", "simple", positive, negative, latent, 0, 5, "enable")
    (done,) = advanced.sample(experts[1], "disable", 7, 10, 3.0, "euler", "simple", positive, negative, half, 5, 10, "disable")
    result["chain_log"] = [m for m in RECORDS.messages[mark:] if m.startswith("Skip-Cache [")]
    result["chain_finite"] = bool(torch.isfinite(done["samples"]).all())
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 10)
    timesteps = [float(model.model.model_sampling.timestep(s)) for s in sigmas[:-1]]
    config = SkipCacheConfig(interval=2, start=700.0, end=50.0, depth=1)
    runs = [simulate(config, ts, 6, 0, "wan") for ts in (timesteps[:5], timesteps[5:])]
    result["chain_expected"] = [[stats.full_steps, stats.cached_steps] for stats in runs]
    result["chain_timesteps"] = timesteps
    del experts, half, done
    result["alive_after"] = live_run_objects()
    # A Wan variant (VACE, camera, S2V, ... are subclasses of WanModel with their own block loops) is refused by name.
    import types

    variant_class = type("VaceWanModel", (type(dm),), {})
    variant = model.clone()  # the clone's own `model` attribute: the loaded model is not touched
    variant.model = types.SimpleNamespace(diffusion_model=variant_class.__new__(variant_class))
    try:
        skip_cache(apply, variant, 2)
        result["variant_error"] = None
    except ValueError as e:
        result["variant_error"] = str(e)
    return result


SKIP_WAN_BASE = "skip-wan-core-tiny-base.safetensors"  # models/diffusion_models/: the Skip-Wan without its branches
SKIP_WAN_FULL = "skip-wan-core-tiny-full.safetensors"  # the base directory itself: the whole Skip-Wan, for skipdit_core
SKIP_WAN_BRANCHES = "skip-wan-core-tiny-branches.safetensors"  # models/skipdit_branches/: its branches alone
# The same base with branches of the residual fusion (hidden + branch, the conversion recipes' form):
SKIP_WAN_RESIDUAL_FULL = "skip-wan-core-tiny-residual-full.safetensors"
SKIP_WAN_RESIDUAL_BRANCHES = "skip-wan-core-tiny-residual-branches.safetensors"


def core_wan_branches(nodes, pack, loader, apply, state_mod, base_dir, records) -> dict:
    """Load Skip Branches on ComfyUI's own Wan (core Load Diffusion Model) against skipdit_core's Skip-Wan of the
    same weights: the same output; Apply Skip-Cache after it cutting the long skips (n = 1 identical, 2k of L blocks
    on cached steps, a cached call equal to skipdit_core's cut run, the depth checked against S); LoRA, fp8 base
    weights, two threads; and the refusals."""
    import types

    import torch

    import comfy.model_management
    from skipdit_core.loading import load_model
    from skipdit_core.models import StackCut

    branch_mod = sys.modules[pack.__name__ + ".nodes.branch_patch"]
    node = nodes.NODE_CLASS_MAPPINGS["SkipDiTLoadSkipBranches"]
    unet = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]()
    model = unet.load_unet(SKIP_WAN_BASE, "default")[0]
    dm = model.model.diffusion_model
    schema = node.GET_SCHEMA() if hasattr(node, "GET_SCHEMA") else node.define_schema()
    result = {"model_class": type(dm).__module__ + "." + type(dm).__name__, "blocks": len(dm.blocks),
              "listed": next(i for i in schema.inputs if i.id == "branches").options}
    mark = len(records.messages)
    patched = node.execute(model, SKIP_WAN_BRANCHES).args[0]
    result["node_log"] = [m for m in records.messages[mark:] if m.startswith("Load Skip Branches")]
    options = patched.model_options["transformer_options"]
    branch_set = options[branch_mod.BRANCHES_KEY]
    result["skips"] = branch_set.num_skips
    result["patched_blocks"] = sorted(i for _, i in options["patches_replace"]["dit"])
    own = model.model_options["transformer_options"]
    result["input_untouched"] = branch_mod.BRANCHES_KEY not in own and not own.get("patches_replace")

    # Parity: core Wan + the branches = skipdit_core's Skip-Wan (fp32, the same x, t, context).
    ours, _ = load_model(os.path.join(base_dir, SKIP_WAN_FULL), dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 2, 8, 8, generator=g)
    t = torch.tensor([900.0, 250.0])
    ctx = torch.randn(2, 16, 4096, generator=g) * 0.5
    with torch.no_grad():
        ref = ours(x, t, ctx)
        call_options = dict(options)  # each model call gets a copy of the options (as _calc_cond_batch makes)
        core = dm(x, t, ctx, transformer_options=call_options)
        plain = dm(x, t, ctx, transformer_options={})
    result["parity_rel_diff"] = rel_diff(core, ref)
    result["without_branches_rel_diff"] = rel_diff(plain, ref)
    result["outputs_left_in_options"] = branch_mod.STORE_KEY in call_options or branch_mod.STORE_KEY in options

    # Two threads at once (MultiGPU CFG Split's device workers), each with its own copy of the options.
    threaded = [None, None]

    def worker(i, barrier):
        barrier.wait()
        with torch.no_grad():
            threaded[i] = dm(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], transformer_options=dict(options))

    errors = run_two_threads(worker)
    result["threads"] = {"errors": errors, "rel_diff": max(rel_diff(threaded[i], ref[i:i + 1]) for i in range(2)) if not errors else None}

    # Apply Skip-Cache on top: the long skips are cut (k = 1 and k = S = 2).
    counts = block_counter(dm.blocks)
    positive = [[torch.randn(1, 16, 4096, generator=g) * 0.5, {}]]
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    steps = 6
    runs = compare_intervals(nodes, apply, patched, counts, result, positive, positive, latent, steps, 1.0)
    counts["calls"] = 0
    k2 = run_sampler(nodes, skip_cache(apply, patched, 2, depth=2), positive, positive, latent, steps, 1.0)
    result["block_calls_k2"] = counts["calls"]
    result["k2_rel_diff"] = rel_diff(k2, runs["plain"])
    result["steps"] = steps
    try:
        skip_cache(apply, patched, 2, depth=3)
        result["depth3_error"] = None
    except ValueError as e:
        result["depth3_error"] = str(e)
    result["depth3_on_base"] = skip_cache(apply, model, 2, depth=3) is not None  # 8 blocks, no skips: k = 3 fits
    # A full call on one input, then a cached call on another: the cached call equals skipdit_core's cut run (the deep
    # state of the full call, the first k blocks' fresh outputs through the skips); on the same input it reproduces
    # the full call exactly.
    xb = torch.randn(1, 16, 2, 8, 8, generator=g)
    t1, c1 = t[:1], ctx[:1]
    for depth in (1, 2):
        p = skip_cache(apply, patched, 2, depth=depth)
        popts = p.model_options["transformer_options"]
        for name, second in (("other_input", xb), ("same_input", x[:1])):
            state = popts[state_mod.STATE_KEY].new_run()
            outs, kinds = [], []
            for step_sigma, xi in ((1.0, x[:1]), (0.5, second)):
                cut = state.begin("k", step_sigma, 600.0)
                with torch.no_grad():
                    outs.append(dm(xi, t1, c1, transformer_options=dict(popts)))
                kinds.append(cut.kind)
                state.end("k", cut, 0.0)
            entry = {"kinds": kinds}
            if name == "same_input":
                entry["rel_diff_to_full"] = rel_diff(outs[1], outs[0])
            else:
                full_cut = StackCut(depth)
                with torch.no_grad():
                    ours(x[:1], t1, c1, cut=full_cut)
                    expected = ours(second, t1, c1, cut=StackCut(depth, cached=full_cut.captured))
                entry["rel_diff_to_ours"] = rel_diff(outs[1], expected)
                entry["full_rel_diff_to_ours"] = rel_diff(outs[0], ref[:1])
            result[f"handoff_k{depth}_{name}"] = entry
            del state
    result["outputs_left_after_cut"] = branch_mod.STORE_KEY in popts

    # The residual fusion's branches on the same base: parity, and a cached call (k = S) equal to skipdit_core's.
    residual = node.execute(model, SKIP_WAN_RESIDUAL_BRANCHES).args[0]
    ropts = residual.model_options["transformer_options"]
    ours_residual, _ = load_model(os.path.join(base_dir, SKIP_WAN_RESIDUAL_FULL), dtype=torch.float32)
    entry = {"fusion": ropts[branch_mod.BRANCHES_KEY].info.fusion}
    with torch.no_grad():
        entry["parity_rel_diff"] = rel_diff(dm(x, t, ctx, transformer_options=dict(ropts)), ours_residual(x, t, ctx))
        entry["differs_from_replace_rel_diff"] = rel_diff(ours_residual(x, t, ctx), ref)
    p = skip_cache(apply, residual, 2, depth=2)
    popts = p.model_options["transformer_options"]
    state = popts[state_mod.STATE_KEY].new_run()
    outs = []
    for step_sigma, xi in ((1.0, x[:1]), (0.5, xb)):
        cut = state.begin("k", step_sigma, 600.0)
        with torch.no_grad():
            outs.append(dm(xi, t1, c1, transformer_options=dict(popts)))
        state.end("k", cut, 0.0)
    full_cut = StackCut(2)
    with torch.no_grad():
        ours_residual(x[:1], t1, c1, cut=full_cut)
        entry["cached_rel_diff_to_ours"] = rel_diff(outs[1], ours_residual(xb, t1, c1, cut=StackCut(2, cached=full_cut.captured)))
    del state
    result["residual"] = entry

    # The preset input on the Skip-Wan: the presets of a Wan with long skips.
    from skipdit_core.skip_cache_presets import PRESETS

    preset = apply.execute(patched, 2, "auto", "timesteps", 700.0, 50.0, 1, 0, 1.0, 0, False, "state", "1.5x").args[0]
    setup = preset.model_options["transformer_options"][state_mod.STATE_KEY]
    result["preset_1.5x"] = {"config": setup.config == PRESETS[("wan", True)]["1.5x"], "settings": setup.describe_settings()}

    # Refusals, one line each.
    refusals = {}
    variant_class = type("VaceWanModel", (type(dm),), {})
    variant = model.clone()
    variant.model = types.SimpleNamespace(diffusion_model=variant_class.__new__(variant_class))
    cases = {
        "not_wan": (loader.execute("latte-tiny-pixels-skip.safetensors", "fp32").args[0], SKIP_WAN_BRANCHES),
        "variant": (variant, SKIP_WAN_BRANCHES),
        "twice": (patched, SKIP_WAN_BRANCHES),
        "after_skip_cache": (skip_cache(apply, model, 2), SKIP_WAN_BRANCHES),
        "blocks": (model, "skip-wan-10-blocks-branches.safetensors"),
        "width": (model, "skip-wan-width-256-branches.safetensors"),
        "truncated": (model, "truncated-branches.safetensors"),
    }
    for name, (m, file) in cases.items():
        try:
            node.execute(m, file)
            refusals[name] = None
        except ValueError as e:
            refusals[name] = str(e)
    result["refusals"] = refusals

    # A LoRA on the base's block weights (core LoraLoaderModelOnly, after Load Skip Branches): applied, and the
    # branches still there: it equals skipdit_core's Skip-Wan with the same change to its weights.
    lora_loader = nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
    mark = len(records.messages)
    with_lora = lora_loader.load_lora_model_only(patched, "wan-block0-lora.safetensors", 1.0)[0]
    result["lora_keys_not_loaded"] = [m for m in records.messages[mark:] if "lora key not loaded" in m]
    from safetensors.torch import load_file

    lora = load_file(os.path.join(base_dir, "models", "loras", "wan-block0-lora.safetensors"))
    comfy.model_management.load_models_gpu([with_lora])
    with torch.no_grad():
        lora_out = dm(x, t, ctx, transformer_options=dict(with_lora.model_options["transformer_options"]))
        q = ours.blocks[0].self_attn.q.weight
        q += lora["lora_unet_blocks_0_self_attn_q.lora_up.weight"] @ lora["lora_unet_blocks_0_self_attn_q.lora_down.weight"]
        lora_ref = ours(x, t, ctx)
    result["lora_rel_diff"] = rel_diff(lora_out, lora_ref)
    result["lora_changed"] = rel_diff(lora_out, ref)
    comfy.model_management.unload_all_models()

    # fp8 base weights (core Load Diffusion Model, weight_dtype fp8_e4m3fn): the branches keep their float32.
    try:
        fp8 = node.execute(unet.load_unet(SKIP_WAN_BASE, "fp8_e4m3fn")[0], SKIP_WAN_BRANCHES).args[0]
        comfy.model_management.load_models_gpu([fp8])
        fp8_dm = fp8.model.diffusion_model
        with torch.no_grad():
            fp8_out = fp8.model.diffusion_model(x.to(fp8.model.get_dtype() if fp8.model.manual_cast_dtype is None
                                                      else fp8.model.manual_cast_dtype), t, ctx,
                                                transformer_options=dict(fp8.model_options["transformer_options"]))
        fp8_set = fp8.model_options["transformer_options"][branch_mod.BRANCHES_KEY]
        result["fp8"] = {"weights": str(fp8_dm.blocks[0].self_attn.q.weight.dtype), "branches": str(fp8_set.dtype),
                         "rel_diff": rel_diff(fp8_out.float(), ref), "finite": bool(torch.isfinite(fp8_out).all())}
        comfy.model_management.unload_all_models()
    except Exception as e:  # noqa: BLE001 - reported, the test decides
        result["fp8"] = {"error": repr(e)}
    return result


def thread_check(nodes, pack, loader, apply) -> dict:
    """Two threads driving one patched model at once, as MultiGPU CFG Split's device workers do (cond in
    one, uncond in the other, the same run), against the same calls made one after the other: with our
    Latte and with core Hunyuan-DiT's block patches. Outputs must be identical."""
    import torch

    state_mod = sys.modules[pack.__name__ + ".nodes.cache_state"]
    out = {}
    g = torch.Generator().manual_seed(0)
    cases = {
        "latte": ("latte-tiny-pixels-skip.safetensors", torch.randn(1, 3, 4, 8, 8, generator=g),
                  [{"y": torch.tensor([1])}, {"y": torch.tensor([4])}]),
        "hunyuan": ("hunyuan-core-tiny.safetensors", torch.randn(1, 4, 8, 8, generator=g), [
            {"c_crossattn": torch.randn(1, 77, 1024, generator=g) * 0.5, "text_embedding_mask": torch.ones(1, 77),
             "encoder_hidden_states_t5": torch.randn(1, 256, 2048, generator=g) * 0.5,
             "text_embedding_mask_t5": torch.ones(1, 256), "image_meta_size": torch.tensor([[64.0, 64, 64, 64, 0, 0]])}
            for _ in range(2)]),
    }
    for name, (file, x, conds) in cases.items():
        patched = skip_cache(apply, loader.execute(file, "fp32").args[0], 2)
        base = patched.model
        setup = patched.model_options["transformer_options"][state_mod.STATE_KEY]
        sigmas = [base.model_sampling.sigma(torch.tensor([t])) for t in (900.0, 700.0, 500.0, 300.0, 100.0, 20.0)]

        def call(state, i, sigma):
            # what a sampling run's transformer_options hold (prepare_model_patcher merges the wrappers in)
            options = dict(patched.model_options["transformer_options"], uuids=[f"cond-{i}"], cond_or_uncond=[i],
                           wrappers=patched.wrappers)
            options[state_mod.RUN_KEY] = state
            with torch.no_grad():
                return base.apply_model(x * float(sigma), sigma, transformer_options=options, **conds[i])

        run = setup.new_run()
        sequential = [[None] * len(sigmas) for _ in range(2)]
        for s, sigma in enumerate(sigmas):
            for i in range(2):
                sequential[i][s] = call(run, i, sigma)
        run = setup.new_run()
        threaded = [[None] * len(sigmas) for _ in range(2)]

        def device(i, barrier):
            for s, sigma in enumerate(sigmas):
                barrier.wait()  # both devices inside the same step
                threaded[i][s] = call(run, i, sigma)

        errors = run_two_threads(device)
        kinds = "".join(next(iter(run.tracks.values())).run.stats.schedule)
        out[name] = {
            "errors": errors,
            "identical": not errors and all(torch.equal(a, b) for i in range(2) for a, b in zip(sequential[i], threaded[i])),
            "schedule": kinds,
            "tracks": len(run.tracks),
            "calls": run.calls,
        }
    return out


def pixel_clamp(nodes, pack, loader, apply, base_dir, name="latte-tiny-pixels-skip.safetensors", prediction="eps") -> dict:
    """KSampler ddim + ddim_uniform on a pixel-space Latte (with and without the pack's x0 clamp) against
    skipdit_core's DDIM on the same noise and timesteps, for an eps or a v model."""
    import comfy.model_sampling
    import comfy.samplers
    import torch
    from skipdit_core.diffusion import DDIMSampler, Schedule, guided, linear_betas
    from skipdit_core.loading import load_model

    adapters = sys.modules[pack.__name__ + ".nodes.adapters"]
    clamp = adapters.clamp_denoised
    model = loader.execute(name, "fp32").args[0]
    post_cfg = lambda m: m.model_options.get("sampler_post_cfg_function", [])  # noqa: E731
    out = {"pixel_has_clamp": post_cfg(model).count(clamp) == 1}
    # 0.38's empty-latent / resize paths divide pixel sizes by this; pixels are not downscaled
    out["spacial_downscale_ratio"] = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", None)
    out["clamp_survives_clone"] = clamp in post_cfg(skip_cache(apply, model, 2)) and clamp in post_cfg(model.clone())
    out["latent_models_without_clamp"] = {
        n: clamp not in post_cfg(loader.execute(n, "default").args[0])
        for n in ("latte-t2v-tiny-skip.safetensors", "dit-tiny-skip.safetensors")
    }
    ms = model.get_model_object("model_sampling")
    out["model_sampling"] = [c.__name__ for c in type(ms).__mro__ if c.__module__ == comfy.model_sampling.__name__]
    label = nodes.NODE_CLASS_MAPPINGS["SkipDiTClassLabel"].execute(2).args
    latent = {"samples": torch.zeros(1, 3, 4, 8, 8)}
    steps, cfg, seed = 10, 4.0, 7
    kw = dict(sampler="ddim", seed=seed, scheduler="ddim_uniform")
    comfy_clamped = run_sampler(nodes, model, label[0], label[1], latent, steps, cfg, **kw)
    plain = model.clone()
    plain.model_options["sampler_post_cfg_function"] = [f for f in post_cfg(plain) if f is not clamp]
    comfy_unclamped = run_sampler(nodes, plain, label[0], label[1], latent, steps, cfg, **kw)
    # The same walk in skipdit_core: the timesteps of ComfyUI's ddim_uniform sigmas, DDIM eta 0.
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps)
    timesteps = [int(round(float(t))) for t in ms.timestep(sigmas[:-1])]
    core, _ = load_model(os.path.join(base_dir, "models", "skipdit", name), dtype=torch.float32)
    num_classes = core.config.num_classes
    y = torch.tensor([2, num_classes])  # cond first (Latte's convention), the null label second
    schedule = Schedule.from_betas(linear_betas(), prediction, learned_range=True)
    results = {}
    for clip in (True, False):
        ddim = DDIMSampler(schedule, timesteps, channel_dim=2, clip_denoised=clip)
        noise = comfy.sample.prepare_noise(latent["samples"], seed)  # ComfyUI's own noise of this seed
        # ComfyUI starts at x = noise * sigma_0 (its scaling); in the pipeline's scaling that is
        # noise * sqrt(1 - a_0). Latte's own layout: (B, F, C, H, W).
        a0 = float(schedule.alphas_cumprod[timesteps[0]])
        x = (noise * (1.0 - a0) ** 0.5).transpose(1, 2)
        with torch.no_grad():
            ref = ddim.sample(guided(lambda xb, tb: core(xb, tb, y), cfg, "latte"), x)
        results[clip] = ref.transpose(1, 2)
    out["timesteps"] = timesteps
    out["ref_clamped_max_abs"] = float(results[True].abs().max())
    out["comfy_clamped_max_abs"] = float(comfy_clamped.abs().max())
    out["comfy_unclamped_max_abs"] = float(comfy_unclamped.abs().max())
    out["clamped_vs_pipeline"] = rel_diff(comfy_clamped, results[True])
    out["unclamped_vs_pipeline_unclamped"] = rel_diff(comfy_unclamped, results[False])
    out["unclamped_vs_pipeline"] = rel_diff(comfy_unclamped, results[True])
    return out


def bundled_models(pack, loader_node, base_dir) -> dict:
    """The loader lists the models bundled in skipdit_core/assets/: by default that folder is an extra path
    of the "skipdit" folder; with a stand-in folder in its place, a file there is listed and loads."""
    import shutil

    import folder_paths

    adapters = sys.modules[pack.__name__ + ".nodes.adapters"]
    loader = sys.modules[pack.__name__ + ".nodes.loader"]
    paths = folder_paths.get_folder_paths(loader.FOLDER)
    own = os.path.join(folder_paths.models_dir, loader.FOLDER)
    out = {"default_paths": paths, "bundled_dir": str(adapters.BUNDLED_MODELS_DIR)}
    out["bundled_registered_after_own"] = paths.index(str(adapters.BUNDLED_MODELS_DIR)) > paths.index(own)
    real = os.path.join(str(adapters.BUNDLED_MODELS_DIR), "skip-latte-shapes.safetensors")
    out["real_resolved"] = (not os.path.exists(real)) or loader.checkpoint_path("skip-latte-shapes.safetensors") == real
    stand_in = os.path.join(base_dir, "bundled-stand-in")  # never skipdit_core/assets/ itself
    os.makedirs(stand_in, exist_ok=True)
    shutil.copy(os.path.join(own, "latte-tiny-pixels-skip.safetensors"), os.path.join(stand_in, "skip-latte-shapes.safetensors"))
    folder_paths.folder_names_and_paths[loader.FOLDER][0].remove(str(adapters.BUNDLED_MODELS_DIR))  # the stand-in in its place
    loader.register_model_folder(bundled=stand_in)
    out["listed"] = "skip-latte-shapes.safetensors" in loader.checkpoint_names()
    schema = loader_node.GET_SCHEMA() if hasattr(loader_node, "GET_SCHEMA") else loader_node.define_schema()
    combo = next(i for i in schema.inputs if i.id == "checkpoint")
    out["in_node_options"] = "skip-latte-shapes.safetensors" in combo.options
    out["resolved"] = loader.checkpoint_path("skip-latte-shapes.safetensors") == os.path.join(stand_in, "skip-latte-shapes.safetensors")
    model = loader_node.execute("skip-latte-shapes.safetensors", "default").args[0]
    out["loads"] = type(model.model).__name__
    # A file of the same name in models/skipdit/ comes first.
    shutil.copy(os.path.join(stand_in, "skip-latte-shapes.safetensors"), os.path.join(own, "skip-latte-shapes.safetensors"))
    out["own_folder_wins"] = loader.checkpoint_path("skip-latte-shapes.safetensors") == os.path.join(own, "skip-latte-shapes.safetensors")
    os.remove(os.path.join(own, "skip-latte-shapes.safetensors"))
    return out


if __name__ == "__main__":
    main()
