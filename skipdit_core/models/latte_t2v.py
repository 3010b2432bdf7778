"""Latte text-to-video (Latte-1; diffusers `LatteTransformer3DModel` layout), with or without
Skip-DiT long skips.

The model is a PixArt-alpha-style spatial stack interleaved with a temporal stack: unit i is
the pair (`transformer_blocks.i`, `temporal_transformer_blocks.i`). The spatial block attends
over the tokens of one frame and cross-attends to the projected T5 caption; the temporal block
attends over one patch position across frames. Both are modulated by adaLN-single: one
timestep MLP (`adaln_single`) gives six vectors per sample, each block adds its own learned
`scale_shift_table` to them.

Parameter names are those of diffusers' `LatteTransformer3DModel` (and of the Latte repo's
LatteT2V, whose released `Latte-skip.pt` adds `skip_norms.i` / `skip_linears.i.linear`), so
those state dicts load as they are. Norms have no affine weights and the sin-cos tables are
non-persistent, so neither has keys.

Layouts: the input is (B, C, F, H, W), channels before frames, like diffusers and ComfyUI's
video latents. Between units the hidden state is kept in the spatial layout ((B F), T, D),
T = (H/p) * (W/p); that is also the layout of the values the long skips carry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..parallel import attend, gather_tokens, shard_tokens
from .layers import PatchEmbed, sincos_1d, sincos_2d, timestep_embedding, unpatchify
from .ustack import SkipBranchesMixin, StackCut, UStack


@dataclass
class LatteT2VConfig:
    num_layers: int = 28  # (spatial, temporal) block pairs
    num_heads: int = 16
    head_dim: int = 72
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8  # epsilon (4) + learned-range variance (4)
    sample_size: int = 64  # latent height = width the 2-D sin-cos table is laid out for
    caption_channels: int = 4096  # T5 v1.1 XXL hidden size
    video_length: int = 16  # rows of the temporal sin-cos table: the most frames a call may have
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6  # block norms; the output norm always uses 1e-6, as in diffusers
    skip: bool = False  # Skip-DiT: num_layers // 2 long skips between pairs
    skip_fusion: str = "replace"  # "replace" (the paper's) | "residual" (ustack.SKIP_FUSIONS)

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_skips(self) -> int:
        return self.num_layers // 2 if self.skip else 0

    @property
    def interpolation_scale(self) -> int:
        """diffusers' PatchEmbed interpolation scale for this sample size."""
        return max(self.sample_size // 64, 1)


# Keys a released file may carry that this model does not use: key -> (why, expected shape with
# None for a free size). The loader sets them aside (strictly: only these names, at these shapes),
# `skipdit info` reports them, `skipdit convert` keeps them.
# y_embedding: the authors trained Latte T2V and Latte-skip with diffusers 0.24's CaptionProjection,
# whose buffer y_embedding (120 x caption channels) is the learned null caption that replaces a dropped
# caption in training. Sampling never reads it: the unconditional half of guidance is the T5
# encoding of the negative prompt (the authors' pipeline encodes ""), and later diffusers layouts
# (PixArtAlphaTextProjection) dropped the buffer.
OPTIONAL_KEYS = {
    "caption_projection.y_embedding": (
        "the learned null caption of training's caption dropout (diffusers 0.24 CaptionProjection); "
        "unused at inference",
        lambda c: (None, c.caption_channels),
    ),
}

LATTE_T2V_PRESETS = {
    "Latte-1": dict(num_layers=28, num_heads=16, head_dim=72, patch_size=2, sample_size=64),
    "Latte-1-skip": dict(num_layers=28, num_heads=16, head_dim=72, patch_size=2, sample_size=64, skip=True),
    "Latte-T2V-tiny": dict(num_layers=4, num_heads=4, head_dim=16, sample_size=8, caption_channels=32),
}


# --------------------------------------------------------------------------- embeddings


def latte_pos_embed(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float) -> torch.Tensor:
    """diffusers' `get_2d_sincos_pos_embed` for a (grid_h, grid_w) token grid, (grid_h * grid_w, dim) float32.

    Positions are `arange(n) / (n / base_size) / interpolation_scale` per axis, computed in
    float32 as diffusers does (so a grid other than base_size x base_size is stretched onto the
    trained range, each axis on its own). Layout as in `sincos_2d`: the first dim/2 channels
    encode the column, the last dim/2 the row; tokens are row-major.
    """
    rows = torch.arange(grid_h, dtype=torch.float32) / (grid_h / base_size) / interpolation_scale
    cols = torch.arange(grid_w, dtype=torch.float32) / (grid_w / base_size) / interpolation_scale
    return sincos_2d(dim, rows, cols)


class TimestepMLP(nn.Module):
    """256-dim [cos | sin] sinusoid (float32) -> Linear, SiLU, Linear. (N,) -> (N, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.linear_1 = nn.Linear(frequency_embedding_size, hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))


class AdaLNSingle(nn.Module):
    """adaLN-single (PixArt-alpha): timestep -> (modulation (N, 6D), embedding (N, D)).

    Keys `emb.timestep_embedder.linear_{1,2}` and `linear`.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": TimestepMLP(hidden_size)})
        self.linear = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb["timestep_embedder"](t)
        return self.linear(F.silu(emb)), emb


class CaptionProjection(nn.Module):
    """T5 states -> model width: Linear, GELU(tanh), Linear. (N, L, C_text) -> (N, L, D)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


# --------------------------------------------------------------------------- blocks


class LatteAttention(nn.Module):
    """Multi-head attention with separate `to_q`, `to_k`, `to_v` and `to_out.0` (biased).

    x: (N, T, D) queries; context: (N, L, D) keys/values (None: self-attention);
    bias: additive mask broadcastable to (N, heads, T, L), or None. Returns (N, T, D).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            rearrange(proj(src), "n t (h d) -> n h t d", h=self.num_heads)
            for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out = attend(self, q, k, v, bias)  # Ulysses for split self-attention (skipdit_core.parallel)
        return self.to_out[0](rearrange(out, "n h t d -> n t (h d)"))


class GeluProj(nn.Module):
    """Linear (`proj`) then GELU(tanh)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`net.0.proj` -> GELU(tanh) -> (dropout slot, no weights) -> `net.2`. (N, T, D) -> (N, T, D)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class LatteBlock(nn.Module):
    """adaLN-single transformer block (diffusers BasicTransformerBlock, norm_type ada_norm_single).

    x: (N, T, D); t_mod: (N, 6D) timestep modulation from `AdaLNSingle`;
    context: (N, L, D) projected caption, bias: additive mask for it (spatial blocks only).

        shift/scale/gate (msa, mlp) = scale_shift_table + t_mod
        x = x + gate_msa * attn1(norm(x) * (1 + scale_msa) + shift_msa)
        x = x + attn2(x, context)                      (no norm, no gate)
        x = x + gate_mlp * ff(norm(x) * (1 + scale_mlp) + shift_mlp)
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, cross_attention: bool):
        super().__init__()
        self.eps = eps
        self.attn1 = LatteAttention(dim, num_heads)
        self.attn2 = LatteAttention(dim, num_heads) if cross_attention else None
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        n, _, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(n, 6, d)
        ).chunk(6, dim=1)  # each (N, 1, D)
        x = x + gate_msa * self.attn1(self._norm(x) * (1 + scale_msa) + shift_msa)
        if self.attn2 is not None:
            x = x + self.attn2(x, context, bias)
        x = x + gate_mlp * self.ff(self._norm(x) * (1 + scale_mlp) + shift_mlp)
        return x


# --------------------------------------------------------------------------- model


class LatteT2V(SkipBranchesMixin, nn.Module):
    """Latte text-to-video denoiser.

    forward(x, t, encoder_hidden_states, encoder_attention_mask=None, cut=None):
        x: (B, C_in, F, H, W) latents (channels before frames), F <= video_length,
           H and W multiples of patch_size (any size: the 2-D sin-cos table is recomputed);
        t: (B,) timesteps 0..999 (a scalar is broadcast);
        encoder_hidden_states: (B, L, caption_channels) T5 states;
        encoder_attention_mask: optional (B, L), 1 / True = keep, 0 / False = discard;
        cut: optional `StackCut` for Skip-Cache.
    Returns (B, C_out, F, H, W): epsilon in the first C_in channels, the learned variance after.
    """

    family = "latte_t2v"
    blocks_per_unit = 2  # a unit of the stack is a (spatial, temporal) pair

    def __init__(self, config: LatteT2VConfig):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.pos_embed = PatchEmbed(c.patch_size, c.in_channels, D)
        self.transformer_blocks = nn.ModuleList(
            [LatteBlock(D, c.num_heads, c.mlp_ratio, c.norm_eps, cross_attention=True) for _ in range(c.num_layers)]
        )
        self.temporal_transformer_blocks = nn.ModuleList(
            [LatteBlock(D, c.num_heads, c.mlp_ratio, c.norm_eps, cross_attention=False) for _ in range(c.num_layers)]
        )
        if c.skip:
            self.add_skip_branches(c.num_skips, D, c.skip_fusion)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
        self.proj_out = nn.Linear(D, c.patch_size * c.patch_size * c.out_channels)
        self.adaln_single = AdaLNSingle(D)
        self.caption_projection = CaptionProjection(c.caption_channels, D)
        temp = sincos_1d(D, torch.arange(c.video_length))
        self.register_buffer("temp_pos_embed", temp[None], persistent=False)  # (1, video_length, D)
        self.stack = UStack(c.num_layers, c.num_skips)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.proj.weight.dtype

    def spatial_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, grid_h * grid_w, D) float32 sin-cos table, as diffusers' PatchEmbed makes it
        (base size sample_size // patch, interpolation scale max(sample_size // 64, 1))."""
        c = self.config
        base = c.sample_size // c.patch_size
        return latte_pos_embed(c.hidden_size, grid_h, grid_w, base, c.interpolation_scale)[None]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        cut: Optional[StackCut] = None,
    ) -> torch.Tensor:
        c = self.config
        B, _, frames, H, W = x.shape
        if frames > c.video_length:
            raise ValueError(f"this model takes at most {c.video_length} frames, got {frames}")
        gh, gw = H // c.patch_size, W // c.patch_size
        dtype = self.dtype

        # Tokens of each frame, ((B F), T, D); the sin-cos table is added in float32.
        h = self.pos_embed(rearrange(x.to(dtype), "b c f h w -> (b f) c h w"))
        h = (h + self.spatial_pos_embed(gh, gw).to(h.device)).to(dtype)

        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        t_mod, t_emb = self.adaln_single(t)  # (B, 6D), (B, D)
        t_spatial = t_mod.repeat_interleave(frames, dim=0)  # ((B F), 6D)
        context = self.caption_projection(encoder_hidden_states.to(dtype)).repeat_interleave(frames, dim=0)
        bias = None
        if encoder_attention_mask is not None:
            # 1 = keep -> 0, 0 = discard -> -10000 (diffusers / PixArt convention), ((B F), 1, 1, L).
            keep = encoder_attention_mask.to(device=x.device, dtype=dtype)
            bias = ((1 - keep) * -10000.0)[:, None, None, :].repeat_interleave(frames, dim=0)
        # Added before the first temporal block only, and not for a single frame (as diffusers).
        temp_pos = self.temp_pos_embed[:, :frames].to(dtype) if frames > 1 else None
        h = shard_tokens(self, h)  # this process's tokens, when they are split (skipdit_core.parallel)
        t_temporal = t_mod.repeat_interleave(h.shape[1], dim=0)  # ((B T), 6D), T this process's tokens

        def run_unit(i: int, h: torch.Tensor) -> torch.Tensor:
            """Pair i: ((B F), T, D) -> spatial block -> ((B T), F, D) -> temporal block -> ((B F), T, D)."""
            h = self.transformer_blocks[i](h, t_spatial, context, bias)
            h = rearrange(h, "(b f) t d -> (b t) f d", b=B)
            if i == 0 and temp_pos is not None:
                h = h + temp_pos
            h = self.temporal_transformer_blocks[i](h, t_temporal)
            return rearrange(h, "(b t) f d -> (b f) t d", b=B)

        h = self.stack.run(h, run_unit, self.fuse, cut)

        shift, scale = (self.scale_shift_table[None] + t_emb.repeat_interleave(frames, dim=0)[:, None]).chunk(2, dim=1)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale) + shift
        out = unpatchify(gather_tokens(self, self.proj_out(h)), gh, gw, c.patch_size, c.out_channels)  # ((B F), C_out, H, W)
        return rearrange(out, "(b f) c h w -> b c f h w", b=B)


# --------------------------------------------------------------------------- detection


def _num_indexed(sd: dict, pattern: str) -> int:
    """1 + the largest N in keys matching `pattern` (a regex with one group for N), or 0."""
    found = [int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))]
    return max(found) + 1 if found else 0


def head_split(hidden: int, num_heads: Optional[int] = None, head_dim: Optional[int] = None) -> tuple[int, int]:
    """(num_heads, head_dim) of a width: what the user gave (one, or both, checked against the width),
    else head_dim 72 when the width is a multiple of 72 (every released Latte), else 64."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{what} does not fit the width {hidden} (pos_embed.proj.weight): "
                          "num_heads x head_dim must equal it")

    for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_heads is not None and head_dim is not None:
        if num_heads * head_dim != hidden:
            raise bad(f"num_heads={num_heads} x head_dim={head_dim} = {num_heads * head_dim}")
        return num_heads, head_dim
    if num_heads is not None:
        if hidden % num_heads:
            raise bad(f"num_heads={num_heads}")
        return num_heads, hidden // num_heads
    if head_dim is None:
        head_dim = 72 if hidden % 72 == 0 else 64
        if hidden % head_dim:
            raise ValueError(f"width {hidden} (pos_embed.proj.weight) is a multiple of neither 72 nor 64: the head split "
                             "is not in the weights, give it (head_dim or num_heads, e.g. --set num_heads=N)")
    elif hidden % head_dim:
        raise bad(f"head_dim={head_dim}")
    return hidden // head_dim, head_dim


def config_from_state_dict(
    sd: dict[str, torch.Tensor],
    *,
    num_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    sample_size: int = 64,
    video_length: int = 16,
) -> LatteT2VConfig:
    """Detect a Latte T2V config (diffusers / Latte-skip.pt layout) from keys and shapes alone.

    Read from the weights: num_layers, width, patch, in/out channels, caption channels,
    mlp ratio, skip (presence of `skip_norms.0.weight`). Not in the weights, so taken from the
    arguments: the head split (`head_split`: num_heads and / or head_dim if given, else head_dim
    72 or 64), sample_size and video_length (their sin-cos tables are not stored; Latte-1 uses
    64 and 16).
    """
    proj = sd["pos_embed.proj.weight"]  # (D, C_in, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    num_heads, head_dim = head_split(hidden, num_heads, head_dim)
    num_layers = _num_indexed(sd, r"transformer_blocks\.(\d+)\.scale_shift_table")
    if _num_indexed(sd, r"temporal_transformer_blocks\.(\d+)\.scale_shift_table") != num_layers:
        raise ValueError("spatial and temporal block counts differ")
    skip = "skip_norms.0.weight" in sd
    if skip and _num_indexed(sd, r"skip_norms\.(\d+)\.weight") != num_layers // 2:
        raise ValueError(f"expected {num_layers // 2} skip branches for {num_layers} block pairs")
    return LatteT2VConfig(
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=sd["proj_out.weight"].shape[0] // (patch * patch),
        sample_size=sample_size,
        caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
        video_length=video_length,
        mlp_ratio=sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / hidden,
        skip=skip,
    )
