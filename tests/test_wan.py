"""Wan 2.1 / 2.2 text-to-video: parity with diffusers' WanTransformer3DModel (and ComfyUI core's WanModel when
COMFYUI_PATH is set), the released key layout and its shapes, loading the original, ComfyUI-prefixed and diffusers
layouts, refused variants and bad files, the 3-D RoPE, Skip-Wan long skips under Skip-Cache, the flow-matching
Euler sampler, and the `skipdit` commands on a tiny saved Wan."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, randomize
from safetensors.torch import load_file, save_file

from skipdit_core import CheckpointError, inspect_checkpoint, load_model
from skipdit_core.cli import main as cli_main
from skipdit_core.diffusion import make_sampler
from skipdit_core.flow import FlowEulerSampler, flow_sigmas
from skipdit_core.loading import save_safetensors
from skipdit_core.models import build_model, identify_family, make_config
from skipdit_core.models.hunyuan import apply_rope
from skipdit_core.models.wan import (
    WAN_PRESETS,
    WanConfig,
    WanModel,
    config_from_state_dict,
    from_diffusers_state_dict,
    is_diffusers_layout,
    to_diffusers_state_dict,
    wan_rope,
)
from skipdit_core.pipeline import Request, generate
from skipdit_core.skip_cache import SkipCacheConfig, simulate

diffusers = pytest.importorskip("diffusers")


def tiny_config(**kw) -> WanConfig:
    return WanConfig(**{**WAN_PRESETS["tiny"], **kw})


def diffusers_model(cfg: WanConfig):
    return diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps,
    ).eval()


def make_inputs(cfg: WanConfig, n: int = 2, frames: int = 3, h: int = 6, w: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(n, cfg.in_channels, frames, h, w, generator=g),
        t=torch.tensor([17.0, 803.0])[:n],
        encoder_hidden_states=torch.randn(n, cfg.text_len, cfg.text_dim, generator=g),
    )


@pytest.fixture(scope="module")
def paired():
    """A randomised diffusers model and ours holding the same weights (mapped from diffusers' names)."""
    cfg = tiny_config()
    ref = randomize(diffusers_model(cfg), seed=0)
    ours = WanModel(cfg).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref.state_dict()), strict=True)
    return cfg, ref, ours


def run_diffusers(ref, inp: dict, t=None) -> torch.Tensor:
    with torch.no_grad():
        return ref(inp["x"], inp["t"] if t is None else t, inp["encoder_hidden_states"], return_dict=False)[0]


# --------------------------------------------------------------------------- 1. parity


def test_parity_with_diffusers(paired):
    cfg, ref, ours = paired
    inp = make_inputs(cfg)
    with torch.no_grad():
        got = ours(**inp)
    assert got.shape == (2, cfg.out_channels, 3, 6, 8)
    assert_close(got, run_diffusers(ref, inp), rtol=1e-5)


def test_per_frame_and_per_token_timesteps_match_diffusers(paired):
    """Wan 2.2 TI2V: the first latent frame at t = 0 (its image), the rest at the step's t. diffusers takes one
    timestep per token; ComfyUI one per latent frame; both forms give the same output here."""
    cfg, ref, ours = paired
    inp = make_inputs(cfg)
    per_frame = torch.tensor([[0.0, 17.0, 17.0], [0.0, 803.0, 803.0]])
    per_token = per_frame.repeat_interleave(3 * 4, dim=1)  # 3 x 4 tokens per latent frame
    expected = run_diffusers(ref, inp, per_token)
    with torch.no_grad():
        assert_close(ours(**{**inp, "t": per_token}), expected, rtol=1e-5)
        assert_close(ours(**{**inp, "t": per_frame}), expected, rtol=1e-5)
        plain = ours(**inp)
        assert not torch.allclose(plain[:, :, :1], expected[:, :, :1])  # the first frame's t really changed
        with pytest.raises(ValueError, match="latent frames = 3"):
            ours(**{**inp, "t": torch.zeros(2, 5)})


def test_text_is_zero_padded_to_text_len(paired):
    cfg, _, ours = paired
    inp = make_inputs(cfg)
    short = inp["encoder_hidden_states"][:, :5]
    padded = torch.cat([short, torch.zeros(2, cfg.text_len - 5, cfg.text_dim)], dim=1)
    with torch.no_grad():
        assert torch.equal(ours(**{**inp, "encoder_hidden_states": short}), ours(**{**inp, "encoder_hidden_states": padded}))


def test_both_layouts_load_from_files_with_equal_outputs(tmp_path, paired):
    cfg, ref, ours = paired
    dpath, opath = tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "wan-tiny.safetensors"
    save_file(ref.state_dict(), str(dpath))
    save_file(ours.state_dict(), str(opath))  # the original layout, no metadata: detected from keys and shapes
    overrides = {"num_heads": cfg.num_heads, "text_len": cfg.text_len}  # neither is in the weights
    from_diffusers, dckpt = load_model(dpath, overrides=overrides)
    from_original, ockpt = load_model(opath, overrides=overrides)
    assert (dckpt.family, dckpt.layout, ockpt.family, ockpt.layout) == ("wan", "diffusers", "wan", "original")
    assert dckpt.config == ockpt.config == cfg
    inp = make_inputs(cfg, seed=1)
    expected = run_diffusers(ref, inp)
    with torch.no_grad():
        assert_close(from_diffusers(**inp), expected, rtol=1e-5)
        assert_close(from_original(**inp), expected, rtol=1e-5)


# --------------------------------------------------------------------------- 2. RoPE


def wan_rope_complex(x: torch.Tensor, grid: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """Wan's rope_apply, written independently: per-axis complex frequency tables (1024 positions each) over
    interleaved pairs, in complex128. x (N, T, heads, hd) -> same."""
    n, t, heads, hd = x.shape
    c = hd // 2

    def params(dim):
        freqs = torch.outer(torch.arange(1024, dtype=torch.float64),
                            1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return torch.polar(torch.ones_like(freqs), freqs)

    tables = torch.cat([params(hd - 4 * (hd // 6)), params(2 * (hd // 6)), params(2 * (hd // 6))], dim=1)
    ft, fh, fw = tables.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    rot = torch.cat([ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1), fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                     fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(t, 1, -1)
    z = torch.view_as_complex(x.double().reshape(n, t, heads, -1, 2))
    return torch.view_as_real(z * rot).flatten(3).float()


@pytest.mark.parametrize("hd,grid", [(128, (3, 5, 7)), (16, (4, 3, 2)), (24, (2, 2, 6))])
def test_rope_matches_wan_complex_formula_and_diffusers(hd, grid):
    g = torch.Generator().manual_seed(hd)
    t = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, t, 3, hd, generator=g)
    cos, sin = wan_rope(hd, *grid)
    assert cos.shape == (t, hd) and cos.dtype == torch.float32
    ours = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.allclose(ours, wan_rope_complex(x, grid), atol=1e-5)
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    dcos, dsin = WanRotaryPosEmbed(hd, (1, 2, 2), 1024)(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))
    assert torch.allclose(cos, dcos.reshape(t, hd), atol=1e-6) and torch.allclose(sin, dsin.reshape(t, hd), atol=1e-6)


def test_rope_split_per_axis():
    assert WanConfig(**WAN_PRESETS["1.3B"]).rope_split == (44, 42, 42)
    assert tiny_config().rope_split == (8, 4, 4)
    with pytest.raises(ValueError, match="head dim 5"):
        WanConfig(dim=20, num_heads=4)


# --------------------------------------------------------------------------- 3. key layout and shapes


def released_keys(cfg: WanConfig) -> set[str]:
    """The key names of Wan-AI's / ComfyUI's repackaged T2V files, written out from the reference layout."""
    wb = lambda p: {f"{p}.weight", f"{p}.bias"}  # noqa: E731
    keys = {"head.modulation"}
    for p in ["patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
              "time_projection.1", "head.head"]:
        keys |= wb(p)
    for n in range(cfg.num_layers):
        b = f"blocks.{n}"
        keys |= {f"{b}.modulation", f"{b}.self_attn.norm_q.weight", f"{b}.self_attn.norm_k.weight",
                 f"{b}.cross_attn.norm_q.weight", f"{b}.cross_attn.norm_k.weight"}
        for p in ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                  "cross_attn.v", "cross_attn.o", "norm3", "ffn.0", "ffn.2"]:
            keys |= wb(f"{b}.{p}")
    return keys


def test_released_key_layout_and_diffusers_mapping(paired):
    cfg, ref, ours = paired
    assert set(ours.state_dict()) == released_keys(cfg)
    dsd = ref.state_dict()
    assert is_diffusers_layout(dsd) and not is_diffusers_layout(ours.state_dict())
    mapped = from_diffusers_state_dict(dsd)
    assert set(mapped) == released_keys(cfg)
    # diffusers' norm2 (affine, before cross-attention) is the original norm3; the head's table is head.modulation
    assert torch.equal(mapped["blocks.1.norm3.weight"], dsd["blocks.1.norm2.weight"])
    assert torch.equal(mapped["head.modulation"], dsd["scale_shift_table"])
    assert torch.equal(mapped["blocks.1.modulation"], dsd["blocks.1.scale_shift_table"])
    back = to_diffusers_state_dict(mapped)
    assert set(back) == set(dsd) and all(torch.equal(back[k], dsd[k]) for k in dsd)
    # diffusers' fuse_projections() layout maps too
    fused = dict(dsd)
    for b in range(cfg.num_layers):
        p = f"blocks.{b}."
        for part in ("weight", "bias"):
            fused[p + "attn1.to_qkv." + part] = torch.cat([fused.pop(p + f"attn1.to_{x}.{part}") for x in "qkv"])
            fused[p + "attn2.to_kv." + part] = torch.cat([fused.pop(p + f"attn2.to_{x}.{part}") for x in "kv"])
    refused = from_diffusers_state_dict(fused)
    assert set(refused) == set(mapped) and all(torch.equal(refused[k], mapped[k]) for k in mapped)


@pytest.mark.parametrize("preset,params", [("1.3B", 1.42e9), ("14B", 14.29e9), ("5B", 5.0e9)])
def test_full_size_shapes_on_meta(preset, params):
    cfg = WanConfig(**WAN_PRESETS[preset])
    with torch.device("meta"):
        model = WanModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == released_keys(cfg)
    D, C = cfg.dim, cfg.in_channels
    assert shapes["patch_embedding.weight"] == (D, C, 1, 2, 2)
    assert shapes["text_embedding.0.weight"] == (D, 4096) and shapes["time_embedding.0.weight"] == (D, 256)
    assert shapes["time_projection.1.weight"] == (6 * D, D)
    assert shapes["blocks.0.modulation"] == (1, 6, D) and shapes["head.modulation"] == (1, 2, D)
    assert shapes["blocks.0.self_attn.norm_q.weight"] == (D,)  # RMSNorm across heads: no head split stored
    assert shapes["blocks.0.ffn.0.weight"] == (cfg.ffn_dim, D) and shapes["head.head.weight"] == (4 * C, D)
    assert cfg.head_dim == 128
    n = sum(v.numel() for v in model.state_dict().values())
    assert abs(n - params) / params < 0.02, n
    assert config_from_state_dict(model.state_dict()) == cfg  # heads from width / 128, as ComfyUI's detection


def test_presets_and_new_command(tmp_path, capsys):
    assert cli_main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "wan: Wan 2.1 / 2.2 text-to-video" in out and "dim=1536, ffn_dim=8960, num_layers=30" in out
    path = tmp_path / "skip-wan.safetensors"
    assert cli_main(["new", str(path), "--family", "wan", "--preset", "tiny", "--set", "num_skips=2"]) == 0
    ckpt = inspect_checkpoint(path)
    assert (ckpt.family, ckpt.config.num_skips, ckpt.config.patch_size) == ("wan", 2, (1, 2, 2))
    assert "skip_linears.1.linear.weight" in ckpt.state_dict and "skip_norms.0.bias" in ckpt.state_dict


# --------------------------------------------------------------------------- 4. loading: ComfyUI files, variants, bad files


def test_comfyui_prefixed_and_all_in_one_files_load(tmp_path, paired):
    cfg, _, ours = paired
    sd = ours.state_dict()
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    path = tmp_path / "wan2.1_t2v_tiny.safetensors"
    save_file(prefixed, str(path))
    overrides = {"num_heads": cfg.num_heads, "text_len": cfg.text_len}
    model, ckpt = load_model(path, overrides=overrides)
    assert ckpt.layout == "original, ComfyUI prefix model.diffusion_model." and ckpt.config == cfg
    inp = make_inputs(cfg, n=1)
    with torch.no_grad():
        assert torch.equal(model(**inp), ours(**inp))
    # a ComfyUI all-in-one checkpoint: the VAE and text encoder are left out, and said so
    aio = {**prefixed, "vae.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3, 3),
           "text_encoders.umt5xxl.transformer.shared.weight": torch.zeros(8, 4)}
    save_file(aio, str(tmp_path / "aio.safetensors"))
    ckpt = inspect_checkpoint(tmp_path / "aio.safetensors", overrides=overrides)
    assert ckpt.layout.endswith("(text_encoders., vae. left out)") and set(ckpt.state_dict) == set(sd)


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, **kw)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("extra,variant", [
    ({"img_emb.proj.0.bias": (1280,)}, "I2V image-to-video"),
    ({"img_emb.emb_pos": (1, 514, 1280)}, "FLF2V"),
    ({"blocks.0.cross_attn.k_img.weight": (64, 64)}, "I2V"),
    ({"vace_patch_embedding.weight": (64, 96, 1, 2, 2), "vace_blocks.0.after_proj.bias": (64,)}, "VACE"),
    ({"control_adapter.conv.weight": (64, 1536, 2, 2)}, "Fun Camera control"),
    ({"casual_audio_encoder.encoder.final_linear.weight": (4, 4)}, "S2V"),
    ({"face_adapter.fuser_blocks.0.k_norm.weight": (4,)}, "Animate"),
])
def test_variants_are_refused_with_one_line(tmp_path, paired, extra, variant):
    _, _, ours = paired
    sd = {**ours.state_dict(), **{k: torch.zeros(s) for k, s in extra.items()}}
    for name, tensors in (("orig", sd), ("comfy", {f"model.diffusion_model.{k}": v for k, v in sd.items()})):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        msg = _error(path)
        assert f"a Wan {variant}" in msg and "only text-to-video Wan" in msg


def test_image_conditioned_channels_and_diffusers_i2v_are_refused(tmp_path, paired):
    cfg, ref, ours = paired
    sd = dict(ours.state_dict())
    sd["patch_embedding.weight"] = torch.zeros(cfg.dim, 36, 1, 2, 2)  # Wan 2.2 I2V A14B: noise + mask + image
    save_file(sd, str(tmp_path / "i2v.safetensors"))
    assert "patch_embedding takes 36 latent channels, the head gives 4" in _error(tmp_path / "i2v.safetensors")
    dsd = {**ref.state_dict(), "blocks.0.attn2.add_k_proj.weight": torch.zeros(cfg.dim, cfg.dim)}
    save_file(dsd, str(tmp_path / "diffusers-i2v.safetensors"))
    msg = _error(tmp_path / "diffusers-i2v.safetensors")
    assert "a Wan I2V image-to-video (attn2.add_k_proj) checkpoint (key blocks.0.attn2.add_k_proj.weight)" in msg


def test_bad_wan_files(tmp_path, paired):
    cfg, _, ours = paired
    path = tmp_path / "wan.safetensors"
    save_file(ours.state_dict(), str(path))
    assert "give num_heads" in _error(path) and "width 64 is not a multiple of Wan's head dim 128" in _error(path)
    msg = _error(path, overrides={"num_heads": 4, "ffn_dim": 96})
    assert "shape mismatch at blocks.0.ffn.0.weight" in msg and "(96, 64)" in msg and "(128, 64)" in msg
    sd = dict(ours.state_dict())
    del sd["blocks.1.cross_attn.o.weight"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    msg = _error(tmp_path / "missing.safetensors", overrides={"num_heads": 4})
    assert "1 missing [blocks.1.cross_attn.o.weight]" in msg
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(path)
    pt = tmp_path / "wan.pt"
    torch.save({"model": ours.state_dict()}, pt)
    pt.write_bytes(pt.read_bytes()[:4000])
    assert "truncated" in _error(pt)


# --------------------------------------------------------------------------- 5. Skip-Wan and Skip-Cache


@pytest.fixture(scope="module")
def skip_wan():
    cfg = tiny_config(num_layers=6, num_skips=2)
    return randomize(WanModel(cfg).eval(), seed=3)


def test_skip_wan_pairing_and_fusion(skip_wan):
    model = skip_wan
    L, S = 6, 2
    assert model.stack.pairs() == [(1, 4), (0, 5)]
    outs, ins = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: ins.__setitem__(i, args[0]))
        block.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
    with torch.no_grad():
        model(**make_inputs(model.config, n=1))
    for receiver in (4, 5):
        j, source = receiver - (L - S), L - 1 - receiver
        cat = torch.cat([outs[receiver - 1], outs[source]], dim=-1)
        norm = model.skip_norms[j]
        expected = model.skip_linears[j].linear(torch.nn.functional.layer_norm(cat, cat.shape[-1:], norm.weight, norm.bias, 1e-6))
        assert torch.allclose(ins[receiver], expected, atol=1e-6)  # the fusion replaces the hidden state
    for i in (1, 2, 3):
        assert torch.equal(ins[i], outs[i - 1])
    for h in list(model.blocks):  # leave the shared fixture clean
        h._forward_hooks.clear()
        h._forward_pre_hooks.clear()


def tiny_request(cfg, **kw) -> Request:
    g = torch.Generator().manual_seed(3)
    text = {"prompt_embeds": torch.randn(1, 5, cfg.text_dim, generator=g)}
    return Request("wan", **{**dict(text=text, frames=2, size=4, steps=8, guidance=3.0), **kw})


def test_skip_cache_on_skip_wan(skip_wan):
    model = skip_wan
    req = tiny_request(model.config)
    calls = {"n": 0}
    handles = [b.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for b in model.blocks]
    try:
        plain = generate(model, req)
        assert calls["n"] == 8 * 6  # 8 steps, one batched (guided) call each, 6 blocks
        assert torch.equal(generate(model, req).sample, plain.sample)  # deterministic
        calls["n"] = 0
        same = generate(model, req, SkipCacheConfig(interval=1))
        assert torch.equal(same.sample, plain.sample) and calls["n"] == 48  # n = 1 is the uncached model, bit for bit
        calls["n"] = 0
        config = SkipCacheConfig(interval=2, start=1000, end=0, depth=1)
        cached = generate(model, req, config)
    finally:
        for h in handles:
            h.remove()
    stats = cached.stats
    assert (stats.full_steps, stats.cached_steps) == (4, 4)
    assert calls["n"] == 4 * 6 + 4 * 2  # a cached step runs 2k = 2 units
    assert torch.isfinite(cached.sample).all() and not torch.equal(cached.sample, plain.sample)
    timesteps = make_sampler("wan", None, 8).timesteps
    assert stats.schedule == simulate(config, timesteps, 6, 2).schedule
    assert cached.speedup_bound == pytest.approx(1 / (0.5 + 0.5 * 2 / 6))


def test_vanilla_wan_caches_the_middle_residual(paired):
    """A released Wan has no long skips: cached steps run the first and last k blocks and add the middle's
    residual of the last full step; n = 1 is the plain model."""
    cfg, _, ours = paired
    request = tiny_request(cfg, steps=4)
    plain = generate(ours, request, None).sample
    assert torch.equal(generate(ours, request, SkipCacheConfig(interval=1, reuse="residual")).sample, plain)
    cached = generate(ours, request, SkipCacheConfig(interval=2, start=1000, end=0, reuse="residual"))
    assert cached.stats.schedule == ["F", "C", "F", "C"] and torch.isfinite(cached.sample).all()
    assert not torch.equal(cached.sample, plain)


def test_half_precision_close_to_fp32(skip_wan):
    model = WanModel(skip_wan.config).eval()
    model.load_state_dict(skip_wan.state_dict())
    inp = make_inputs(model.config, n=1)
    with torch.no_grad():
        ref = model(**inp)
        half = model.to(torch.bfloat16)(**inp)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert_close(half.float(), ref, rtol=3e-2)


# --------------------------------------------------------------------------- 6. flow matching


def test_shifted_schedule_and_comfyui_simple_scheduler():
    s = make_sampler("wan", "euler", 10, shift=5.0)
    assert isinstance(s, FlowEulerSampler) and len(s) == 10 and s.sigmas[-1] == 0.0
    for k, t in enumerate(s.timesteps):
        u = 1 - k / 10
        assert t == pytest.approx(1000 * 5 * u / (1 + 4 * u))
    # ComfyUI's `simple` scheduler on ModelSamplingDiscreteFlow: sigma of a 1000-entry table, every 1000/N-th from the end
    table = [8.0 * (i / 1000) / (1 + 7.0 * (i / 1000)) for i in range(1, 1001)]
    simple = [table[-(1 + int(x * 1000 / 20))] for x in range(20)] + [0.0]
    assert flow_sigmas(20, 8.0) == pytest.approx(simple, abs=1e-12)
    assert make_sampler("wan").timesteps[0] == 1000.0 and len(make_sampler("wan")) == 50
    with pytest.raises(ValueError, match="its sampler is 'euler', not 'ddim'"):
        make_sampler("wan", "ddim")
    with pytest.raises(ValueError, match="flow shift applies to Wan"):
        make_sampler("dit", "ddim", shift=3.0)


def test_euler_follows_a_straight_path_exactly():
    """v = noise - x0 on the path x = (1 - sigma) x0 + sigma noise: Euler lands on x0, whatever the shift."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64)
    seen = []

    sampler = make_sampler("wan", "euler", 7, shift=3.0)

    def denoise(x, t):
        seen.append(float(t[0]))  # the model gets t as float32
        return (x - x0) / sampler.sigmas[len(seen) - 1]  # the velocity of the straight path through x

    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = sampler.sample(denoise, noise)
    assert torch.allclose(out, x0, atol=1e-10)
    assert seen == pytest.approx(sampler.timesteps, rel=1e-6) and seen[0] == 1000.0


# --------------------------------------------------------------------------- 7. the commands


@pytest.fixture(scope="module")
def saved(tmp_path_factory, skip_wan):
    root = tmp_path_factory.mktemp("wan")
    path = root / "skip-wan-tiny.safetensors"
    save_safetensors(skip_wan.state_dict(), path, "wan", skip_wan.config)
    emb = root / "prompt.safetensors"
    g = torch.Generator().manual_seed(5)
    save_file({"prompt_embeds": torch.randn(1, 6, skip_wan.config.text_dim, generator=g),
               "prompt_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}, str(emb))
    return root, path, emb


def test_cli_info(saved, capsys):
    _, path, _ = saved
    assert cli_main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["variant"], info["long_skips"], info["layout"]) == ("wan", "skip", 2, "original")
    assert info["config"]["patch_size"] == [1, 2, 2] and info["config"]["num_heads"] == 4
    assert cli_main(["info", str(path)]) == 0
    assert "Wan 2.1 / 2.2 text-to-video" in capsys.readouterr().out


def test_cli_sample_with_skip_cache_and_masked_text(saved, capsys):
    root, path, emb = saved
    out = root / "clip.mp4"
    args = ["sample", str(path), "--text-embeddings", str(emb), "--frames", "2", "--size", "4", "--steps", "6",
            "--guidance", "5", "--shift", "8", "--device", "cpu", "-o", str(out)]
    assert cli_main([*args, "--cache-interval", "2", "--cache-start", "1000", "--cache-end", "0"]) == 0
    printed = capsys.readouterr().out
    assert "no --vae was given" in printed and "Skip-Cache n=2 1000->0 k=1: 3 full, 3 cached of 6 steps" in printed
    latents = load_file(str(root / "clip.latents.safetensors"))["latents"]
    assert latents.shape == (1, 4, 2, 4, 4)
    model, _ = load_model(path)
    text = load_file(str(emb))
    req = Request("wan", text=text, frames=2, size=4, steps=6, guidance=5.0, shift=8.0)
    cached = generate(model, req, SkipCacheConfig(interval=2, start=1000, end=0, depth=1))
    assert torch.equal(cached.sample, latents)  # the command is generate() with these settings
    masked = dict(text, prompt_embeds=text["prompt_embeds"] * text["prompt_attention_mask"][..., None])
    del masked["prompt_attention_mask"]
    assert torch.equal(generate(model, Request(**{**req.__dict__, "text": masked})).sample, generate(model, req).sample)
    assert cli_main(["sample", str(path), "--text-embeddings", str(emb), "--sampler", "ddpm", "--device", "cpu"]) == 2
    assert "its sampler is 'euler', not 'ddpm'" in capsys.readouterr().err


def test_cli_bench_json(saved, capsys):
    _, path, emb = saved
    assert cli_main(["bench", str(path), "--text-embeddings", str(emb), "--frames", "2", "--size", "4", "--steps", "6",
                     "--intervals", "2", "--cache-start", "1000", "--cache-end", "0", "--repeats", "1", "--device", "cpu",
                     "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["setting"].split()[0] for r in rows] == ["uncached", "n=2"]
    assert (rows[1]["full"], rows[1]["cached"]) == (3, 3) and 0 < rows[1]["psnr"] < float("inf")


def test_cli_decodes_through_a_local_wan_vae(saved, capsys):
    from skipdit_core.media import read_video

    root, path, emb = saved
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, attn_scales=[],
                                     temperal_downsample=[True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                     latents_std=[1.5, 2.0, 0.5, 1.0])
    vae.save_pretrained(root / "vae")
    out = root / "decoded.mp4"
    assert cli_main(["sample", str(path), "--text-embeddings", str(emb), "--frames", "2", "--size", "4", "--steps", "2",
                     "--vae", str(root / "vae"), "--device", "cpu", "-o", str(out)]) == 0
    assert read_video(str(out)).shape == (3, 8, 8, 3)  # 2 latent frames -> 1 + 4 (causal, 2x here); 4x4 -> 8x8


# --------------------------------------------------------------------------- 8. ComfyUI core's WanModel


def test_parity_with_comfyui_core_wanmodel(tmp_path):
    """The file loads into ComfyUI's own WanModel with the config ComfyUI's model detection reads from it (head dim
    128, text_dim 4096, freq_dim 256 are what it assumes), and both models agree: one timestep per sample, and
    one per latent frame (ComfyUI's Wan 2.2 TI2V form)."""
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH is not set")
    cfg = WanConfig(dim=256, ffn_dim=512, num_layers=2, num_heads=2, in_channels=4, out_channels=4, text_len=16)
    torch.manual_seed(0)
    model = randomize(WanModel(cfg).eval(), seed=4)
    path = tmp_path / "wan2.1_t2v_test.safetensors"
    save_file(model.state_dict(), str(path))  # as ComfyUI's repackaged files: the original layout, no metadata
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(2, 4, 3, 4, 6, generator=g), "context": torch.randn(2, 16, 4096, generator=g),
              "t_sample": torch.tensor([17.0, 803.0]), "t_frame": torch.tensor([[0.0, 17.0, 17.0], [0.0, 803.0, 803.0]])}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, os.path.join(os.path.dirname(__file__), "comfyui_wan.py"), comfy_path, str(path),
                           str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    detected = json.loads(done.stdout.strip().splitlines()[-1])
    assert (detected["dim"], detected["num_heads"], detected["num_layers"], detected["model_type"]) == (256, 2, 2, "t2v")
    loaded, _ = load_model(path, overrides={"text_len": 16})
    assert loaded.config == cfg
    out = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        for name in ("sample", "frame"):
            ours = loaded(inputs["x"], inputs[f"t_{name}"], inputs["context"])
            assert_close(ours, out[f"out_{name}"], rtol=1e-5)


def test_identify_family_and_config_round_trip(paired):
    cfg, _, ours = paired
    sd = ours.state_dict()
    assert identify_family(sd) == "wan"
    inferred = config_from_state_dict(sd, num_heads=4)
    assert dataclasses.replace(inferred, text_len=cfg.text_len) == cfg
    assert make_config("wan", {"num_skips": 1}, preset="tiny").num_skips == 1
    assert build_model("wan", cfg).stack.num_units == cfg.num_layers
