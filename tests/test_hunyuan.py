"""Hunyuan-DiT: parity with diffusers' HunyuanDiT2DModel, RoPE positions, skip pairing,
released key layout, config inference, half precision."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import assert_close, randomize
from skipdit_core.models.hunyuan import (
    HUNYUAN_PRESETS,
    HunyuanDiT,
    HunyuanDiTConfig,
    config_from_state_dict,
    from_diffusers_state_dict,
    hunyuan_rope,
    is_diffusers_layout,
    resize_crop_region,
)
from skipdit_core.models.ustack import UStack

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_2d_rotary_pos_embed  # noqa: E402


def tiny_config(style: bool = True, **kw) -> HunyuanDiTConfig:
    return HunyuanDiTConfig(**{**HUNYUAN_PRESETS["HunyuanDiT-tiny"], "use_style_cond_and_image_meta_size": style, **kw})


def diffusers_model(cfg: HunyuanDiTConfig):
    return diffusers.HunyuanDiT2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        patch_size=cfg.patch_size,
        activation_fn="gelu-approximate",
        sample_size=cfg.input_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.depth,
        mlp_ratio=cfg.mlp_ratio,
        learn_sigma=cfg.learn_sigma,
        cross_attention_dim=cfg.text_states_dim,
        cross_attention_dim_t5=cfg.text_states_dim_t5,
        pooled_projection_dim=cfg.pooled_dim,
        text_len=cfg.text_len,
        text_len_t5=cfg.text_len_t5,
        use_style_cond_and_image_meta_size=cfg.use_style_cond_and_image_meta_size,
    ).eval()


SQUARE_CROP = ((0, 0), (32, 32))  # the pipeline's crop region of any square grid on the 32x32 base grid


def diffusers_crop_region_fn():
    """diffusers' pipeline helper `get_resize_crop_region_for_grid` (its module needs `transformers`)."""
    pipeline = pytest.importorskip("diffusers.pipelines.hunyuandit.pipeline_hunyuandit", reason="needs transformers")
    return pipeline.get_resize_crop_region_for_grid


def test_crop_region_equals_diffusers_pipeline():
    fn = diffusers_crop_region_fn()
    for hw in [(8, 12), (12, 8), (48, 80), (64, 64), (7, 13)]:
        assert resize_crop_region(*hw, 32) == fn(hw, 32)


def make_inputs(cfg: HunyuanDiTConfig, n: int = 2, h: int = 16, w: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, cfg.text_len, generator=g) > 0.3).long()
    mask_t5 = (torch.rand(n, cfg.text_len_t5, generator=g) > 0.3).long()
    mask[:, 0] = mask_t5[:, 0] = 1
    mask_t5[0, -3:] = 0  # some padding at the end for sure
    return dict(
        x=torch.randn(n, cfg.in_channels, h, w, generator=g),
        t=torch.tensor([17.0, 803.0])[:n],
        encoder_hidden_states=torch.randn(n, cfg.text_len, cfg.text_states_dim, generator=g),
        text_embedding_mask=mask,
        encoder_hidden_states_t5=torch.randn(n, cfg.text_len_t5, cfg.text_states_dim_t5, generator=g),
        text_embedding_mask_t5=mask_t5,
        image_meta_size=torch.tensor([[1024.0, 1024.0, 1024.0, 1024.0, 0.0, 0.0]] * n),
        style=torch.zeros(n, dtype=torch.long),
    )


def run_diffusers(ref, cfg: HunyuanDiTConfig, inp: dict, rope) -> torch.Tensor:
    return ref(
        inp["x"],
        inp["t"],
        encoder_hidden_states=inp["encoder_hidden_states"],
        text_embedding_mask=inp["text_embedding_mask"],
        encoder_hidden_states_t5=inp["encoder_hidden_states_t5"],
        text_embedding_mask_t5=inp["text_embedding_mask_t5"],
        image_meta_size=inp["image_meta_size"] if cfg.use_style_cond_and_image_meta_size else None,
        style=inp["style"] if cfg.use_style_cond_and_image_meta_size else None,
        image_rotary_emb=rope,
        return_dict=False,
    )[0]


def paired_models(style: bool, seed: int = 0):
    cfg = tiny_config(style)
    ref = randomize(diffusers_model(cfg), seed)
    ours = HunyuanDiT(cfg).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref.state_dict()), strict=True)
    return cfg, ref, ours


# --------------------------------------------------------------------------- 1. parity


@pytest.mark.parametrize("style", [True, False], ids=["v1.1", "v1.2"])
def test_parity_with_diffusers_square(style):
    cfg, ref, ours = paired_models(style)
    inp = make_inputs(cfg)
    gh = gw = 16 // cfg.patch_size
    assert cfg.rope_base_grid == 32
    rope = get_2d_rotary_pos_embed(cfg.head_dim, SQUARE_CROP, (gh, gw), output_type="pt")
    with torch.no_grad():
        expected = run_diffusers(ref, cfg, inp, rope)
        got = ours(**inp)  # computes its own RoPE
    assert got.shape == (2, cfg.out_channels, 16, 16)
    assert_close(got, expected, rtol=1e-5)


@pytest.mark.parametrize("style", [True, False], ids=["v1.1", "v1.2"])
def test_pooler_and_global_vector_match_diffusers(style):
    """The pooled T5 vector is a small part of the output; compare it (and c) directly."""
    cfg, ref, ours = paired_models(style, seed=6)
    inp = make_inputs(cfg)
    t5 = inp["encoder_hidden_states_t5"]
    meta = inp["image_meta_size"] if style else None
    st = inp["style"] if style else None
    with torch.no_grad():
        assert_close(ours.pooler(t5), ref.time_extra_emb.pooler(t5), rtol=1e-5)
        expected = ref.time_extra_emb(inp["t"], t5, meta, st, hidden_dtype=torch.float32)
        assert_close(ours.global_vector(inp["t"], t5, meta, st), expected, rtol=1e-5)


def test_parity_non_square_with_given_rope():
    """Non-square latents: both models get the Tencent RoPE table; also checks `rope=`."""
    cfg, ref, ours = paired_models(style=True, seed=1)
    inp = make_inputs(cfg, h=12, w=20)
    rope = hunyuan_rope(cfg.head_dim, 6, 10, cfg.rope_base_grid)
    with torch.no_grad():
        expected = run_diffusers(ref, cfg, inp, rope)
        got = ours(**inp)
        got_override = ours(**inp, rope=rope)
        shuffled = ours(**inp, rope=(rope[0].flip(0), rope[1].flip(0)))
    assert_close(got, expected, rtol=1e-5)
    assert torch.equal(got, got_override)
    assert not torch.allclose(got, shuffled)  # the override is really used


# --------------------------------------------------------------------------- 2. RoPE positions


def tencent_rope_numpy(head_dim: int, h: int, w: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    """The original formula, written independently: crop region, np.linspace(endpoint=False),
    meshgrid(w, h), column half first, interleaved cos/sin."""
    if h / w > 1:
        rh, rw = base, int(round(base / h * w))
    else:
        rw, rh = base, int(round(base / w * h))
    top, left = int(round((base - rh) / 2.0)), int(round((base - rw) / 2.0))
    rows = np.linspace(top, top + rh, h, endpoint=False, dtype=np.float32)
    cols = np.linspace(left, left + rw, w, endpoint=False, dtype=np.float32)
    col_grid, row_grid = np.meshgrid(cols, rows)  # (h, w) each

    def one(dim, pos):
        freqs = 1.0 / 10000 ** (np.arange(0, dim, 2).astype(np.float32) / dim)
        ang = np.outer(pos.reshape(-1), freqs)
        return np.repeat(np.cos(ang), 2, axis=1), np.repeat(np.sin(ang), 2, axis=1)

    cw, sw = one(head_dim // 2, col_grid)
    ch, sh = one(head_dim // 2, row_grid)
    return np.concatenate([cw, ch], axis=1), np.concatenate([sw, sh], axis=1)


@pytest.mark.parametrize("hw", [(6, 10), (10, 6), (8, 12), (16, 16), (64, 64), (48, 80)])
def test_rope_matches_tencent_formula(hw):
    cfg = tiny_config()
    model = HunyuanDiT(cfg)
    h, w = hw
    cos, sin = model.image_rope(h, w)
    ref_cos, ref_sin = tencent_rope_numpy(cfg.head_dim, h, w, cfg.rope_base_grid)
    assert cos.shape == sin.shape == (h * w, cfg.head_dim) and cos.dtype == torch.float32
    np.testing.assert_allclose(cos.numpy(), ref_cos, atol=2e-5)
    np.testing.assert_allclose(sin.numpy(), ref_sin, atol=2e-5)
    assert model.image_rope(h, w) is model.image_rope(h, w)  # cached per (h, w, device)


def test_crop_region_and_positions():
    assert resize_crop_region(8, 12, 32) == ((6, 0), (27, 32))  # 21.33 -> 21 rows, round(5.5) = 6
    assert resize_crop_region(12, 8, 32) == ((0, 6), (32, 27))
    assert resize_crop_region(64, 64, 32) == ((0, 0), (32, 32))
    # 1024 px (64x64 tokens): positions 0, 0.5, ..., 31.5 on both axes, the column half first.
    # head_dim 8: each half has pairs at frequencies 1 and 1/100; the slow one reads back the position.
    _, sin = hunyuan_rope(8, 64, 64, 32)
    cols = (torch.asin(sin[:, 2]) * 100).reshape(64, 64)
    rows = (torch.asin(sin[:, 6]) * 100).reshape(64, 64)
    half_steps = torch.arange(64) * 0.5
    assert torch.allclose(cols, half_steps[None, :].expand(64, 64), atol=1e-3)
    assert torch.allclose(rows, half_steps[:, None].expand(64, 64), atol=1e-3)


def test_square_rope_equals_diffusers():
    cfg = tiny_config()
    for g in (8, 32, 64):
        assert resize_crop_region(g, g, 32) == SQUARE_CROP
        ref = get_2d_rotary_pos_embed(cfg.head_dim, SQUARE_CROP, (g, g), output_type="pt")
        ours = hunyuan_rope(cfg.head_dim, g, g, 32)
        assert torch.allclose(ours[0], ref[0], atol=1e-5) and torch.allclose(ours[1], ref[1], atol=1e-5)


# --------------------------------------------------------------------------- 3. skip pairing


def reference_pairing(depth: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The Tencent / diffusers loop: layer > depth//2 pops, layer < depth//2 - 1 pushes."""
    stack, pairs, pushers = [], [], []
    for layer in range(depth):
        if layer > depth // 2:
            pairs.append((stack.pop(), layer))
        if layer < depth // 2 - 1:
            stack.append(layer)
            pushers.append(layer)
    assert not stack
    return pushers, pairs


def test_pairing_full_config_without_building():
    cfg = HunyuanDiTConfig(**HUNYUAN_PRESETS["HunyuanDiT-v1.2"])
    assert cfg.depth == 40 and cfg.num_skips == 19
    stack = UStack(cfg.depth, cfg.num_skips)
    # reference table: layers 0-18 push, 19-20 neither, layer L >= 21 receives layer 39 - L
    assert stack.pairs() == [(39 - L, L) for L in range(21, 40)]
    assert sorted(src for src, _ in stack.pairs()) == list(range(19))
    assert [u for u in range(40) if stack.source_of(u) is None and u >= 19] == [19, 20]
    assert list(stack.receivers) == list(range(21, 40))
    pushers, pairs = reference_pairing(40)
    assert pushers == list(range(19)) and pairs == stack.pairs()
    for depth in (6, 8, 28):
        assert reference_pairing(depth)[1] == UStack(depth, HunyuanDiTConfig(depth=depth).num_skips).pairs()
    with pytest.raises(ValueError):
        HunyuanDiTConfig(depth=7).num_skips


def test_pairing_tiny_model_instrumented():
    cfg = tiny_config()
    model = randomize(HunyuanDiT(cfg).eval(), 3)
    L, S = cfg.depth, model.stack.num_skips
    assert (L, S) == (6, 2)
    ins, outs, fused = {}, {}, []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: ins.__setitem__(i, args[0]))
        block.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
    real_fuse = model.fuse

    def spy(j, hidden, skip):
        result = real_fuse(j, hidden, skip)
        fused.append((j, hidden, skip, result))
        return result

    model.fuse = spy
    with torch.no_grad():
        model(**make_inputs(cfg))
    assert [j for j, *_ in fused] == [0, 1]
    for j, hidden, skip, result in fused:
        receiver = L - S + j
        source = L - 1 - receiver
        assert torch.equal(skip, outs[source])  # receiver 4 <- block 1, receiver 5 <- block 0
        assert torch.equal(hidden, outs[receiver - 1])
        assert torch.equal(ins[receiver], result)  # the fusion replaces the hidden state
        block = model.blocks[receiver]
        cat = torch.cat([hidden, skip], -1)
        expected = block.skip_linear(torch.nn.functional.layer_norm(cat, (2 * cfg.hidden_size,), block.skip_norm.weight, block.skip_norm.bias, 1e-6))
        assert torch.allclose(result, expected, atol=1e-6)
    for i in range(1, L - S):  # non-receivers get the previous block's output unchanged
        assert torch.equal(ins[i], outs[i - 1])
    assert [i for i, b in enumerate(model.blocks) if hasattr(b, "skip_linear")] == [4, 5]


# --------------------------------------------------------------------------- 4. key layout


def released_keys(cfg: HunyuanDiTConfig) -> set[str]:
    """The key names of Tencent's pytorch_model_ema.pt, written out from the reference layout."""
    wb = lambda p: {f"{p}.weight", f"{p}.bias"}  # noqa: E731
    keys = {"text_embedding_padding", "pooler.positional_embedding"}
    for p in ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "mlp_t5.0", "mlp_t5.2",
              "pooler.k_proj", "pooler.q_proj", "pooler.v_proj", "pooler.c_proj",
              "extra_embedder.0", "extra_embedder.2", "final_layer.adaLN_modulation.1", "final_layer.linear"]:
        keys |= wb(p)
    if cfg.use_style_cond_and_image_meta_size:
        keys.add("style_embedder.weight")
    for n in range(cfg.depth):
        b = f"blocks.{n}"
        for p in ["norm1", "norm2", "norm3", "default_modulation.1", "attn1.Wqkv", "attn1.q_norm", "attn1.k_norm",
                  "attn1.out_proj", "attn2.q_proj", "attn2.kv_proj", "attn2.q_norm", "attn2.k_norm",
                  "attn2.out_proj", "mlp.fc1", "mlp.fc2"]:
            keys |= wb(f"{b}.{p}")
        if n > cfg.depth // 2:
            keys |= wb(f"{b}.skip_norm") | wb(f"{b}.skip_linear")
    return keys


@pytest.mark.parametrize("style", [True, False], ids=["v1.1", "v1.2"])
def test_released_key_layout_loads(style):
    cfg = tiny_config(style)
    model = HunyuanDiT(cfg)
    assert set(model.state_dict()) == released_keys(cfg)
    ref = diffusers_model(cfg)
    converted = from_diffusers_state_dict(ref.state_dict())
    assert set(converted) == released_keys(cfg)
    assert is_diffusers_layout(ref.state_dict()) and not is_diffusers_layout(converted)
    # a state dict carrying exactly the released names (fresh tensors) loads with nothing missing/extra
    sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    result = HunyuanDiT(cfg).load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("version", ["HunyuanDiT-v1.1", "HunyuanDiT-v1.2"])
def test_full_size_shapes_on_meta(version):
    cfg = HunyuanDiTConfig(**HUNYUAN_PRESETS[version])
    with torch.device("meta"):
        model = HunyuanDiT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == released_keys(cfg)
    style = version == "HunyuanDiT-v1.1"
    assert shapes["extra_embedder.0.weight"] == (5632, 3968 if style else 1024)
    assert shapes["extra_embedder.2.weight"] == (1408, 5632)
    assert shapes["mlp_t5.0.weight"] == (8192, 2048) and shapes["mlp_t5.2.weight"] == (1024, 8192)
    assert shapes["text_embedding_padding"] == (333, 1024)
    assert shapes["pooler.positional_embedding"] == (257, 2048)
    assert shapes["pooler.c_proj.weight"] == (1024, 2048)
    assert shapes["blocks.0.attn1.Wqkv.weight"] == (4224, 1408)
    assert shapes["blocks.0.attn1.q_norm.weight"] == (88,)
    assert shapes["blocks.0.attn2.kv_proj.weight"] == (2816, 1024)
    assert shapes["blocks.0.mlp.fc1.weight"] == (6144, 1408)
    assert shapes["blocks.21.skip_linear.weight"] == (1408, 2816) and "blocks.20.skip_linear.weight" not in shapes
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2816, 1408)
    assert shapes["final_layer.linear.weight"] == (32, 1408)
    assert ("style_embedder.weight" in shapes) == style
    inferred = config_from_state_dict(model.state_dict())
    assert int(inferred.hidden_size * inferred.mlp_ratio) == 6144
    assert dataclasses.replace(inferred, mlp_ratio=cfg.mlp_ratio) == cfg


@pytest.mark.parametrize("style", [True, False], ids=["v1.1", "v1.2"])
def test_config_from_state_dict_tiny(style):
    cfg = tiny_config(style)
    sd = HunyuanDiT(cfg).state_dict()
    inferred = config_from_state_dict(sd)
    assert dataclasses.replace(inferred, input_size=cfg.input_size) == cfg
    odd = tiny_config(style, mlp_ratio=4.3637, hidden_size=96, num_heads=4, learn_sigma=False, depth=8)
    inferred = config_from_state_dict(HunyuanDiT(odd).state_dict())
    assert inferred.mlp_hidden == odd.mlp_hidden and inferred.depth == 8 and inferred.num_heads == 4
    assert not inferred.learn_sigma and inferred.out_channels == 4


def test_from_diffusers_swaps_final_modulation_and_norms():
    cfg = tiny_config()
    ref = randomize(diffusers_model(cfg), 5)
    sd = ref.state_dict()
    conv = from_diffusers_state_dict(sd)
    D = cfg.hidden_size
    assert torch.equal(conv["final_layer.adaLN_modulation.1.weight"][:D], sd["norm_out.linear.weight"][D:])
    assert torch.equal(conv["final_layer.adaLN_modulation.1.bias"][D:], sd["norm_out.linear.bias"][:D])
    assert torch.equal(conv["blocks.2.norm3.weight"], sd["blocks.2.norm2.weight"])  # before cross-attn
    assert torch.equal(conv["blocks.2.norm2.weight"], sd["blocks.2.norm3.weight"])  # before the MLP
    assert torch.equal(conv["blocks.2.attn2.kv_proj.weight"][:D], sd["blocks.2.attn2.to_k.weight"])
    assert torch.equal(conv["blocks.2.attn1.Wqkv.bias"][D:2 * D], sd["blocks.2.attn1.to_k.bias"])


# --------------------------------------------------------------------------- 5. half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    cfg, _, model = paired_models(style=True, seed=2)
    inp = make_inputs(cfg)
    with torch.no_grad():
        ref = model(**inp)
        half = model.to(dtype)(**inp)
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    assert_close(half.float(), ref, rtol=3e-2)


def test_layer_norms_run_in_fp32(monkeypatch):
    cfg, _, model = paired_models(style=False, seed=4)
    model = model.to(torch.bfloat16)
    seen = []
    real = torch.nn.functional.layer_norm

    def spy(x, shape, *args, **kwargs):
        seen.append((tuple(shape), x.dtype))
        return real(x, shape, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", spy)
    with torch.no_grad():
        model(**make_inputs(cfg))
    skip_norms = [dt for shape, dt in seen if shape == (2 * cfg.hidden_size,)]
    assert len(skip_norms) == model.stack.num_skips
    assert all(dt == torch.float32 for _, dt in seen)
