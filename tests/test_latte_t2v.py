"""Latte text-to-video: parity with diffusers' LatteTransformer3DModel, the Skip-DiT pairing,
the released checkpoint key layout, and half-precision inference."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange
from helpers import assert_close, randomize

from skipdit_core.models.latte_t2v import LATTE_T2V_PRESETS, LatteT2V, LatteT2VConfig, config_from_state_dict
from skipdit_core.models.ustack import StackCut, UStack

TINY = LATTE_T2V_PRESETS["Latte-T2V-tiny"]


def diffusers_latte(config: LatteT2VConfig, video_length: int):
    """diffusers' model with the Latte-1 options, at the size of `config`."""
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.num_layers,
        cross_attention_dim=config.hidden_size,
        attention_bias=True,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=config.norm_eps,
        caption_channels=config.caption_channels,
        video_length=video_length,
    ).eval()


def inputs(frames: int, height: int = 8, width: int = 8, batch: int = 2, tokens: int = 6, channels: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, generator=g)
    t = torch.tensor([10, 731][:batch])
    text = torch.randn(batch, tokens, channels, generator=g)
    mask = torch.ones(batch, tokens)
    mask[0, tokens // 2 :] = 0
    return x, t, text, mask


def tiny(**overrides) -> LatteT2V:
    return randomize(LatteT2V(LatteT2VConfig(**{**TINY, **overrides})), seed=3).eval()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "frames,height,width,sample_size",
    [(4, 8, 8, 8), (3, 8, 8, 8), (1, 8, 8, 8), (2, 12, 8, 8), (2, 8, 8, 128)],
    ids=["F=video_length", "F<video_length", "one-frame", "other-size", "interp-scale-2"],
)
def test_parity_with_diffusers(frames, height, width, sample_size):
    config = LatteT2VConfig(**{**TINY, "num_layers": 2, "video_length": 4, "sample_size": sample_size})
    ours = LatteT2V(config).eval()
    # diffusers adds its whole temp_pos_embed, so it only runs with frames == video_length; the
    # sin-cos table for `frames` rows is the first `frames` rows of ours (video_length 4).
    ref = randomize(diffusers_latte(config, video_length=frames), seed=0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, text, mask = inputs(frames, height, width)
    # diffusers' Latte does not broadcast a (B, L) mask over frames: give it the bias form
    # it documents, (B*F, 1, L), 0 = keep, -10000 = discard.
    ref_bias = ((1 - mask) * -10000.0).repeat_interleave(frames, dim=0)[:, None]
    with torch.no_grad():
        assert_close(ours(x, t, text), ref(x, t, text).sample, rtol=1e-5)
        masked = ours(x, t, text, mask)
        assert_close(masked, ref(x, t, text, encoder_attention_mask=ref_bias).sample, rtol=1e-5)
        assert_close(ours(x, t, text, mask.bool()), masked, rtol=1e-6)
    assert (masked - ours(x, t, text)).abs().max() > 1e-4  # the mask has an effect


def test_keys_match_diffusers():
    config = LatteT2VConfig(**TINY)
    ref_keys = set(diffusers_latte(config, video_length=16).state_dict())
    assert set(LatteT2V(config).state_dict()) == ref_keys


def test_too_many_frames_rejected():
    model = tiny(video_length=4)
    x, t, text, _ = inputs(5)
    with pytest.raises(ValueError, match="at most 4 frames"):
        model(x, t, text)


# --------------------------------------------------------------------------- skip variant


def test_skip_pairing_of_the_reference():
    """Latte-1-skip: pair i >= 14 fuses with branch i-14 and receives the output of pair 27-i."""
    config = LatteT2VConfig(**LATTE_T2V_PRESETS["Latte-1-skip"])
    assert config.num_skips == 14 and config.hidden_size == 1152
    with torch.device("meta"):
        model = LatteT2V(config)
    stack = model.stack
    assert (stack.num_units, stack.num_skips) == (28, 14)
    assert stack.pairs() == [(27 - i, i) for i in range(14, 28)]
    assert list(stack.receivers) == list(range(14, 28))
    assert len(model.skip_norms) == len(model.skip_linears) == 14
    assert model.skip_norms[0].weight.shape == (2304,) and model.skip_norms[0].eps == 1e-6
    assert model.skip_linears[13].linear.weight.shape == (1152, 2304)


def test_skip_fusion_by_instrumentation():
    """Each fuse call gets the previous pair's output and the output of pair L-1-i (both in the
    ((B F), T, D) layout), and its result replaces the input of spatial block i."""
    model = tiny(skip=True)
    L, S = model.config.num_layers, model.config.num_skips
    x, t, text, mask = inputs(3)
    B = x.shape[0]
    pair_out, spatial_in, fused = {}, {}, []

    def record_pair(i):
        def hook(module, args, output):
            pair_out[i] = rearrange(output, "(b t) f d -> (b f) t d", b=B)
        return hook

    def record_spatial_in(i):
        def hook(module, args):
            spatial_in[i] = args[0]
        return hook

    for i in range(L):
        model.temporal_transformer_blocks[i].register_forward_hook(record_pair(i))
        model.transformer_blocks[i].register_forward_pre_hook(record_spatial_in(i))
    original_fuse = model.fuse

    def fuse(j, hidden, skip):
        out = original_fuse(j, hidden, skip)
        fused.append((j, hidden, skip, out))
        return out

    model.fuse = fuse
    with torch.no_grad():
        model(x, t, text, mask)

    assert [j for j, *_ in fused] == list(range(S))
    for j, hidden, skip, out in fused:
        i = L - S + j
        assert torch.equal(hidden, pair_out[i - 1])
        assert torch.equal(skip, pair_out[L - 1 - i])
        assert torch.equal(spatial_in[i], out)
        assert not torch.allclose(out, hidden)  # replaced, not passed through
    # branch j really is LayerNorm(2D) then Linear(2D, D) on concat([hidden, skip])
    j, hidden, skip, out = fused[0]
    expect = model.skip_linears[j].linear(model.skip_norms[j](torch.cat([hidden, skip], dim=-1)))
    assert_close(out, expect, rtol=1e-6)


def test_skip_cache_cut_reproduces_full_run():
    """A cached run resumed from the state a full run captured, at the same inputs, is the full run."""
    model = tiny(skip=True)
    x, t, text, mask = inputs(2)
    with torch.no_grad():
        full_cut = StackCut(depth=1)
        full = model(x, t, text, mask, cut=full_cut)
        assert full_cut.captured is not None and full_cut.captured.shape == (2 * 2, 16, 64)
        cached = model(x, t, text, mask, cut=StackCut(depth=1, cached=full_cut.captured))
        assert_close(cached, full, rtol=1e-6)
        assert_close(model(x, t, text, mask), full, rtol=1e-6)


# --------------------------------------------------------------------------- checkpoints


def latte_skip_keys(config: LatteT2VConfig) -> dict[str, tuple]:
    """The keys and shapes of the released `Latte-skip.pt` layout (vanilla Latte-1 keys from
    diffusers, plus the Skip-DiT branches), for `config`."""
    D = config.hidden_size
    sd = {k: tuple(v.shape) for k, v in diffusers_latte(config, video_length=16).state_dict().items()}
    for i in range(config.num_layers // 2):
        sd[f"skip_norms.{i}.weight"] = sd[f"skip_norms.{i}.bias"] = (2 * D,)
        sd[f"skip_linears.{i}.linear.weight"] = (D, 2 * D)
        sd[f"skip_linears.{i}.linear.bias"] = (D,)
    return sd


@pytest.mark.parametrize("skip", [False, True], ids=["vanilla", "skip"])
def test_released_layout_loads_and_config_is_detected(skip):
    config = LatteT2VConfig(**{**TINY, "skip": skip})
    shapes = latte_skip_keys(config)
    if not skip:
        shapes = {k: s for k, s in shapes.items() if not k.startswith("skip_")}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}

    detected = config_from_state_dict(sd)
    # the head split and the sin-cos table sizes are not in the weights: only the defaults differ
    assert (detected.num_heads, detected.head_dim, detected.sample_size) == (1, 64, 64)
    assert config_from_state_dict(sd, head_dim=16, sample_size=8) == config

    model = LatteT2V(config_from_state_dict(sd, head_dim=16, sample_size=8))
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    if skip:
        assert torch.equal(model.skip_linears[1].linear.bias, sd["skip_linears.1.linear.bias"])
    else:
        assert not hasattr(model, "skip_norms")


def test_latte1_config_detected_from_shapes():
    config = LatteT2VConfig(**LATTE_T2V_PRESETS["Latte-1-skip"])
    with torch.device("meta"):
        sd = LatteT2V(config).state_dict()
    assert config_from_state_dict(sd) == config
    assert len(sd) == len([k for k in sd if not k.startswith("skip_")]) + 4 * 14


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("skip", [False, True], ids=["vanilla", "skip"])
def test_half_precision_close_to_fp32(dtype, rtol, skip):
    model = tiny(skip=skip)
    x, t, text, mask = inputs(3)
    with torch.no_grad():
        ref = model(x, t, text, mask)
        half = model.to(dtype)
        out = half(x, t, text, mask)
    assert out.dtype == dtype and half.dtype == dtype
    assert torch.isfinite(out).all()
    assert_close(out.float(), ref, rtol=rtol)
