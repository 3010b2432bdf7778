"""DiT and class-conditional Latte: parity with diffusers' DiT, and the skip pairing of the reference."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange, repeat
from helpers import assert_close, randomize

from skipdit_core.models.dit import DiT, DiTConfig
from skipdit_core.models.latte import Latte, LatteConfig
from skipdit_core.models.ustack import StackCut, UStack

TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10)
TINY_LATTE = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=8, num_heads=4, num_frames=4, num_classes=5)


def to_diffusers_dit(sd: dict, depth: int) -> dict:
    """Our (facebookresearch) DiT keys -> diffusers `DiTTransformer2DModel` keys (its conversion script's map)."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[src + f"attn.qkv.{p}"].chunk(3, dim=0)
            out[dst + f"attn1.to_q.{p}"], out[dst + f"attn1.to_k.{p}"], out[dst + f"attn1.to_v.{p}"] = q, k, v
            out[dst + f"attn1.to_out.0.{p}"] = sd[src + f"attn.proj.{p}"]
            out[dst + f"ff.net.0.proj.{p}"] = sd[src + f"mlp.fc1.{p}"]
            out[dst + f"ff.net.2.{p}"] = sd[src + f"mlp.fc2.{p}"]
            out[dst + f"norm1.linear.{p}"] = sd[src + f"adaLN_modulation.1.{p}"]
            out[dst + f"norm1.emb.timestep_embedder.linear_1.{p}"] = sd[f"t_embedder.mlp.0.{p}"]
            out[dst + f"norm1.emb.timestep_embedder.linear_2.{p}"] = sd[f"t_embedder.mlp.2.{p}"]
        out[dst + "norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    for p in ("weight", "bias"):
        out[f"proj_out_1.{p}"] = sd[f"final_layer.adaLN_modulation.1.{p}"]
        out[f"proj_out_2.{p}"] = sd[f"final_layer.linear.{p}"]
    return out


@pytest.mark.parametrize("size", [8, 12])
def test_dit_matches_diffusers(size):
    diffusers = pytest.importorskip("diffusers")
    ours = randomize(DiT(DiTConfig(**TINY_DIT))).eval()
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        sample_size=size, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,
    ).eval()
    # diffusers' DiT port differs from the released DiT in two numerics that its conversion
    # accepts: LayerNorm eps 1e-5 (set to DiT's 1e-6 above) and a timestep sinusoid with
    # downscale_freq_shift=1; the released DiT (and our model) divides the frequencies by 128, not 127.
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    missing, unexpected = ref.load_state_dict(to_diffusers_dit(ours.state_dict(), 4), strict=False)
    assert not unexpected and all("pos_embed.pos_embed" in k for k in missing), (missing, unexpected)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, size, size, generator=g)
    t = torch.tensor([0, 421, 999])
    y = torch.tensor([0, 7, 10])  # 10 = the null class
    with torch.no_grad():
        assert_close(ours(x, t, y), ref(x, t, class_labels=y).sample, rtol=1e-5)


def test_released_dit_keys_load():
    """The key set of DiT-XL-2-256x256.pt (bare state dict) and DiT-XL-2-skip.pt, for a tiny config."""
    for skip in (False, True):
        model = DiT(DiTConfig(**TINY_DIT, skip=skip))
        expected = {"x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "y_embedder.embedding_table.weight"}
        expected |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
        for b in range(4):
            for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
                expected |= {f"blocks.{b}.{name}.weight", f"blocks.{b}.{name}.bias"}
        expected |= {f"final_layer.{n}.{p}" for n in ("linear", "adaLN_modulation.1") for p in ("weight", "bias")}
        if skip:
            for i in range(2):  # depth // 2
                expected |= {f"skip_norms.{i}.weight", f"skip_norms.{i}.bias"}
                expected |= {f"skip_linears.{i}.linear.weight", f"skip_linears.{i}.linear.bias"}
        assert set(model.state_dict()) == expected


def test_released_latte_keys_load():
    """ucf101-skip.pt layout: blocks.N alternate, temp_embed, y_embedder, depth // 4 skips."""
    model = Latte(LatteConfig(**TINY_LATTE, skip=True))
    keys = set(model.state_dict())
    assert {"temp_embed", "pos_embed", "y_embedder.embedding_table.weight"} <= keys
    assert {f"skip_linears.{i}.linear.weight" for i in range(2)} <= keys
    assert "skip_norms.2.weight" not in keys
    assert model.temp_embed.shape == (1, 4, 64)
    uncond = Latte(LatteConfig(**{**TINY_LATTE, "num_classes": 0}))
    assert not any(k.startswith("y_embedder") for k in uncond.state_dict())


# ----------------------------------------------------------------------------- skip pairing


@pytest.mark.parametrize(
    "units,skips,table",
    [
        # (source -> receiver) exactly as the reference's table states it
        (28, 14, {27 - i: i for i in range(14, 28)}),  # DiT skip: block i >= 14 receives block 27-i
        (14, 7, {13 - p: p for p in range(7, 14)}),  # Latte class skip: pair p >= 7 receives pair 13-p
        (28, 14, {27 - i: i for i in range(14, 28)}),  # Latte T2V skip: pair i >= 14 receives pair 27-i
        (40, 19, {39 - L: L for L in range(21, 40)}),  # Hunyuan-DiT: layers 0-18 push, 21.. receive 39-L
    ],
)
def test_stack_pairing_matches_reference_table(units, skips, table):
    stack = UStack(units, skips)
    assert dict(stack.pairs()) == table
    # Instrumented run: every unit tags its output; fuse records what it receives.
    received = {}

    def run_unit(i, h):
        return torch.full((1,), float(i))

    def fuse(j, h, skip):
        received[units - skips + j] = int(skip.item())
        return h

    stack.run(torch.zeros(1), run_unit, fuse)
    assert received == {r: s for s, r in table.items()}
    # Hunyuan: layers 19 and 20 neither push nor receive.
    pushers = {s for s, _ in stack.pairs()}
    assert all(u not in pushers and u not in received for u in range(skips, units - skips))


def test_model_stacks_follow_their_family_rule():
    assert (DiT(DiTConfig(**{**TINY_DIT, "depth": 6}, skip=True)).stack.num_skips) == 3  # depth // 2
    latte = Latte(LatteConfig(**{**TINY_LATTE, "depth": 12}, skip=True))
    assert (latte.stack.num_units, latte.stack.num_skips) == (6, 3)  # pairs, depth // 4


def reference_dit_skip_forward(m: DiT, x, t, y):
    """The authors' loop, written out: push blocks < depth//2, pop LIFO into skip_linears[i - depth//2]; with the
    residual fusion the branch's output is added to h instead of replacing it."""
    c = m.config
    h = m.x_embedder(x) + m.pos_embed
    cond = m.t_embedder(t) + m.y_embedder(y)
    skips = []
    for i, block in enumerate(m.blocks):
        if i >= c.depth // 2:
            j = i - c.depth // 2
            branch = m.skip_linears[j].linear(m.skip_norms[j](torch.cat([h, skips.pop()], dim=-1)))
            h = h + branch if c.skip_fusion == "residual" else branch
        h = block(h, cond)
        if i < c.depth // 2:
            skips.append(h)
    out = m.final_layer(h, cond)
    p, n = c.patch_size, c.input_size // c.patch_size
    return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=n, w=n, p=p, q=p)


def reference_latte_skip_forward(m: Latte, x, t, y):
    """Latte's loop over (spatial, temporal) pairs with the Skip-DiT pair skips, written out."""
    c = m.config
    b, f = x.shape[:2]
    h = m.x_embedder(rearrange(x, "b f c h w -> (b f) c h w")) + m.pos_embed
    cond = m.t_embedder(t) + m.y_embedder(y)
    n_tok = h.shape[1]
    c_s, c_t = repeat(cond, "b d -> (b f) d", f=f), repeat(cond, "b d -> (b t) d", t=n_tok)
    skips, pairs, n_skips = [], c.depth // 2, c.depth // 4
    for p in range(pairs):
        if p >= pairs - n_skips:
            j = p - (pairs - n_skips)
            h = m.skip_linears[j].linear(m.skip_norms[j](torch.cat([h, skips.pop()], dim=-1)))
        h = m.blocks[2 * p](h, c_s)
        h = rearrange(h, "(b f) t d -> (b t) f d", b=b)
        if p == 0:
            h = h + m.temp_embed[:, :f]
        h = m.blocks[2 * p + 1](h, c_t)
        h = rearrange(h, "(b t) f d -> (b f) t d", b=b)
        if p < n_skips:
            skips.append(h)
    out = m.final_layer(h, c_s)
    n = c.input_size // c.patch_size
    out = rearrange(out, "bf (h w) (p q c) -> bf c (h p) (w q)", h=n, w=n, p=c.patch_size, q=c.patch_size)
    return rearrange(out, "(b f) c h w -> b f c h w", b=b)


@pytest.mark.parametrize("fusion", ["replace", "residual"])
def test_dit_skip_model_equals_written_out_reference(fusion, tmp_path):
    from skipdit_core.loading import load_model, save_safetensors

    m = randomize(DiT(DiTConfig(**{**TINY_DIT, "depth": 6}, skip=True, skip_fusion=fusion)), seed=3).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert_close(m(x, t, y), reference_dit_skip_forward(m, x, t, y), rtol=1e-6)
    # the fusion is not in the keys: the file's config carries it
    save_safetensors(m.state_dict(), str(tmp_path / "m.safetensors"), "dit", m.config)
    loaded, _ = load_model(str(tmp_path / "m.safetensors"))
    assert loaded.skip_fusion == fusion
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, y), m(x, t, y))
    with pytest.raises(ValueError, match="skip_fusion must be one of replace, residual, got 'add'"):
        DiT(DiTConfig(**TINY_DIT, skip=True, skip_fusion="add"))


def test_latte_skip_model_equals_written_out_reference():
    m = randomize(Latte(LatteConfig(**{**TINY_LATTE, "depth": 12}, skip=True)), seed=4).eval()
    x, t, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 5])
    with torch.no_grad():
        assert_close(m(x, t, y), reference_latte_skip_forward(m, x, t, y), rtol=1e-6)


def test_latte_frames_and_sizes():
    m = randomize(Latte(LatteConfig(**TINY_LATTE)), seed=5).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 2, 4, 8, 8), torch.tensor([10]), torch.tensor([0])).shape == (1, 2, 8, 8, 8)
        assert m(torch.randn(1, 4, 4, 12, 8), torch.tensor([10]), torch.tensor([0])).shape == (1, 4, 8, 12, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        m(torch.randn(1, 2, 4, 8, 8), torch.tensor([10]))


def test_cut_run_executes_only_the_ends():
    m = randomize(DiT(DiTConfig(**{**TINY_DIT, "depth": 8}, skip=True)), seed=6).eval()
    calls = []
    for i, block in enumerate(m.blocks):
        block.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([2])
    with torch.no_grad():
        full = m(x, t, y)
        cut = StackCut(depth=2)
        assert torch.equal(m(x, t, y, cut=cut), full)  # a capturing full run changes nothing
        assert cut.captured is not None and calls[-8:] == list(range(8))
        calls.clear()
        cached = m(x, t, y, cut=StackCut(depth=2, cached=cut.captured))
    assert calls == [0, 1, 6, 7]
    assert torch.equal(cached, full)  # same inputs: the cached deep state is exactly what a full run computes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    m = randomize(DiT(DiTConfig(**TINY_DIT, skip=True)), seed=7).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = m(x, t, y)
        half = m.to(dtype)(x, t, y)
    assert half.dtype == dtype
    assert_close(half.float(), ref, rtol=5e-2)
    assert m.skip_norms[0].weight.dtype == dtype  # stored in the model dtype, computed in fp32 by fuse_skip
