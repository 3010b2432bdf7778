"""Wan 2.1 / 2.2 text-to-video (Wan-AI's original layout), with optional Skip-DiT long skips (a Skip-Wan).

Module and parameter names follow Wan-AI's `wan/modules/model.py`, so the released files and ComfyUI's
repackaged `split_files/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors` load as they are:
`patch_embedding` (Conv3d), `text_embedding.{0,2}`, `time_embedding.{0,2}`, `time_projection.1`,
`blocks.N.{norm1, self_attn.{q,k,v,o,norm_q,norm_k}, norm3, cross_attn.{q,k,v,o,norm_q,norm_k}, norm2,
ffn.{0,2}, modulation}`, `head.{head, modulation}`. In this layout `norm3` is the (affine) norm before the
cross-attention and `norm2` the one before the feed-forward (diffusers swaps the two names).

Each block is one unit of the U-stack (`UStack(num_layers, num_skips)`); a Skip-Wan (num_skips S > 0) adds the
pack's fusion branches `skip_norms.j` / `skip_linears.j.linear` (`SkipBranchesMixin`), run by the stack, so
Skip-Cache cuts a Wan exactly as the other families. The released Wan models have no long skips (S = 0).

Timesteps are sigma * 1000 of the flow-matching process (`skipdit_core.flow`), one per sample, or one per latent
frame / per token (Wan 2.2 TI2V 5B conditions its first latent frame on an image by giving it t = 0). The
image-conditioned variants (I2V, FLF2V, VACE, Fun control / camera, S2V, HuMo, Animate, ...) are refused by
`check_variant` with the variant named.

`from_diffusers_state_dict` maps a diffusers `WanTransformer3DModel` state dict onto this layout.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .hunyuan import apply_rope
from .layers import fp32_layer_norm, rename_prefix
from .ustack import SkipBranchesMixin, StackCut, UStack

# The head dim of every released Wan (the weights do not store the head split: q/k RMSNorms span all heads).
WAN_HEAD_DIM = 128


@dataclass
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30
    num_heads: int = 12
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096  # umT5-XXL states
    freq_dim: int = 256  # width of the timestep sinusoid
    patch_size: tuple = (1, 2, 2)  # (frames, height, width)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True  # affine LayerNorm `norm3` before the cross-attention
    num_skips: int = 0  # Skip-Wan long skips (0: the released models)
    skip_fusion: str = "replace"  # "replace" (the paper's) | "residual" (ustack.SKIP_FUSIONS)
    text_len: int = 512  # text states are zero-padded to this many tokens, as Wan's model does
    rope_theta: float = 10000.0

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)  # a list after a JSON round trip
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (frames, height, width), got {self.patch_size}")
        if self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(f"width {self.dim} does not split into {self.num_heads} heads")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} (width {self.dim} / {self.num_heads} heads) must be even and >= 6 "
                             "for Wan's 3-D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of a head rotated by the frame, row and column positions (Wan: 44, 42, 42 of 128)."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw


# Sizes from the released files (ComfyUI's model detection reads the same shapes); head dim 128 throughout.
WAN_PRESETS = {
    "1.3B": dict(dim=1536, ffn_dim=8960, num_layers=30, num_heads=12),  # Wan 2.1 T2V 1.3B
    "14B": dict(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40),  # Wan 2.1 T2V 14B, each Wan 2.2 A14B expert
    # Wan 2.2 TI2V 5B (48-channel latents of the Wan 2.2 VAE); its sizes are unverified against a file here:
    # the loader reads every size from the weights' shapes anyway.
    "5B": dict(dim=3072, ffn_dim=14336, num_layers=30, num_heads=24, in_channels=48, out_channels=48),
    "tiny": dict(dim=64, ffn_dim=128, num_layers=4, num_heads=4, in_channels=4, out_channels=4, text_dim=32,
                 freq_dim=32, text_len=8),
}


# --------------------------------------------------------------------------- embeddings


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep sinusoid, laid out [cos | sin] and computed in float64 as its `sinusoidal_embedding_1d`.

    t: (M,) timesteps -> (M, dim) float32.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(t.double(), freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def wan_rope(head_dim: int, frames: int, rows: int, cols: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D RoPE table of Wan: cos, sin (frames * rows * cols, head_dim) float32, tokens frame-major then row-major.

    The head dim is split per axis, (hd - 4 (hd // 6), 2 (hd // 6), 2 (hd // 6)) channels for the frame, row and
    column positions; each part is a 1-D RoPE of its own width (frequencies theta^(-2i / part)). Angles are taken in
    float64, as Wan's `rope_params`; each frequency is repeated for the two members of its interleaved pair.
    """
    hw = 2 * (head_dim // 6)

    def axis(width: int, n: int) -> torch.Tensor:
        freqs = 1.0 / theta ** (torch.arange(0, width, 2, dtype=torch.float64) / width)
        return torch.outer(torch.arange(n, dtype=torch.float64), freqs)  # (n, width / 2)

    f, h, w = axis(head_dim - 2 * hw, frames), axis(hw, rows), axis(hw, cols)
    angles = torch.cat([
        f[:, None, None].expand(frames, rows, cols, -1),
        h[None, :, None].expand(frames, rows, cols, -1),
        w[None, None, :].expand(frames, rows, cols, -1),
    ], dim=-1).reshape(frames * rows * cols, head_dim // 2)
    return angles.cos().float().repeat_interleave(2, dim=1), angles.sin().float().repeat_interleave(2, dim=1)


def _linear32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear` in float32 whatever the weights' dtype: Wan runs its time embedding and modulation under
    float32 autocast, and half-precision modulation visibly degrades the video."""
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


# --------------------------------------------------------------------------- modulation in groups of tokens


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, T, D) -> (N, G, T / G, D): tokens in G equal groups (one per sample, latent frame or token)."""
    return x.unflatten(1, (groups, x.shape[1] // groups))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in float32; x (N, T, D), shift/scale (N, G, D) one row per group of tokens."""
    g = _grouped(x.float(), shift.shape[1])
    return (g * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate, added in float32 and cast back to x's dtype; gate (N, G, D)."""
    out = _grouped(x.float(), gate.shape[1]) + _grouped(y.float(), gate.shape[1]) * gate.unsqueeze(2)
    return out.flatten(1, 2).to(x.dtype)


# --------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the whole width (all heads together), normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class WanSelfAttention(nn.Module):
    """q, k, v, o projections; RMSNorm on q and k (before the head split); 3-D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, heads, T, D / heads)."""
        return z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _out(self, z: torch.Tensor) -> torch.Tensor:
        """(N, heads, T, hd) -> o((N, T, D))."""
        return self.o(z.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (N, T, D), rope cos/sin (T, hd) -> (N, T, D)."""
        q = apply_rope(self._heads(self.norm_q(self.q(x))), *rope)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), *rope)
        return self._out(F.scaled_dot_product_attention(q, k, self._heads(self.v(x))))


class WanCrossAttention(WanSelfAttention):
    """Text cross-attention (Wan's T2V cross-attention): no RoPE, no mask (padding tokens are attended, as in Wan)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (N, T, D), context (N, S, D) embedded text -> (N, T, D)."""
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        return self._out(F.scaled_dot_product_attention(q, k, self._heads(self.v(context))))


class WanBlock(nn.Module):
    """x + gate * self_attn(norm1(x) modulated); x + cross_attn(norm3(x), text); x + gate * ffn(norm2(x) modulated).

    `modulation` (1, 6, D) is added to the projected time embedding: (shift, scale, gate) of the self-attention,
    then of the feed-forward. Norms, modulation and residual sums run in float32.
    """

    def __init__(self, c: WanConfig):
        super().__init__()
        D = c.dim
        self.norm1 = nn.LayerNorm(D, eps=c.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(D, c.num_heads, c.qk_norm, c.eps)
        self.norm3 = nn.LayerNorm(D, eps=c.eps, elementwise_affine=True) if c.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(D, c.num_heads, c.qk_norm, c.eps)
        self.norm2 = nn.LayerNorm(D, eps=c.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(D, c.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(c.ffn_dim, D))
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (N, T, D), e0 (N, G, 6, D) float32 projected time embedding per group of tokens,
        context (N, S, D), rope cos/sin (T, hd) -> (N, T, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float().unsqueeze(1) + e0).unbind(2)
        y = self.self_attn(_modulate(fp32_layer_norm(x, self.norm1), shift1, scale1).to(x.dtype), rope)
        x = _gated_residual(x, y, gate1)
        normed = fp32_layer_norm(x, self.norm3) if isinstance(self.norm3, nn.LayerNorm) else x
        x = x + self.cross_attn(normed, context)
        y = self.ffn(_modulate(fp32_layer_norm(x, self.norm2), shift2, scale2).to(x.dtype))
        return _gated_residual(x, y, gate2)


class WanHead(nn.Module):
    """LayerNorm, (shift, scale) from `modulation` (1, 2, D) + the time embedding, Linear to pt*ph*pw*C_out."""

    def __init__(self, c: WanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.dim, eps=c.eps, elementwise_affine=False)
        self.head = nn.Linear(c.dim, math.prod(c.patch_size) * c.out_channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, c.dim) / c.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (N, T, D), e (N, G, D) float32 time embedding -> (N, T, pt*ph*pw*C_out)."""
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unbind(2)
        return self.head(_modulate(fp32_layer_norm(x, self.norm), shift, scale).to(self.head.weight.dtype))


# --------------------------------------------------------------------------- model


class WanModel(SkipBranchesMixin, nn.Module):
    """Wan 2.1 / 2.2 text-to-video. Inputs:

    x: (N, C_in, F, H, W) latents (F, H, W multiples of the patch: (1, 2, 2)),
    t: timesteps 0..1000 (sigma * 1000): (N,) or a scalar, (N, F / pt) one per latent frame (ComfyUI's form of
        Wan 2.2 TI2V), or (N, T) one per token (Wan 2.2's own form; equal within a frame in practice),
    encoder_hidden_states: (N, L, text_dim) umT5 states, padding already zero; zero-padded here to text_len tokens
        as Wan's model does (longer states are used as they are),
    cut: optional `StackCut` for Skip-Cache.

    Returns (N, C_out, F, H, W): the flow velocity (noise - x0).
    """

    family = "wan"

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = c = config
        D = c.dim
        self.patch_embedding = nn.Conv3d(c.in_channels, D, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList([WanBlock(c) for _ in range(c.num_layers)])
        self.head = WanHead(c)
        if c.num_skips:
            self.add_skip_branches(c.num_skips, D, c.skip_fusion)
        self.stack = UStack(c.num_layers, c.num_skips)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._init_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def video_rope(self, frames: int, rows: int, cols: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE of a (frames, rows, cols) token grid: cos, sin (T, hd) float32, cached per grid and device."""
        device = torch.device(device or "cpu")
        key = (frames, rows, cols, device)
        if key not in self._rope_cache:
            cos, sin = wan_rope(self.config.head_dim, frames, rows, cols, self.config.rope_theta)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def time_vectors(self, t: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """The time embedding e, (N, G, D) float32, G = 1 (one timestep per sample), latent frames or tokens."""
        t = torch.as_tensor(t, device=self.patch_embedding.weight.device)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(batch)
        tokens = math.prod(grid)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2 or t.shape[0] not in (1, batch) or t.shape[1] not in (1, grid[0], tokens):
            raise ValueError(f"Wan timesteps must be (N,), (N, latent frames = {grid[0]}) or (N, tokens = {tokens}) "
                             f"for a batch of {batch}; got {tuple(t.shape)}")
        t = t.expand(batch, t.shape[1])
        emb = self.time_embedding
        e = _linear32(emb[2], F.silu(_linear32(emb[0], sinusoid(t.flatten(), self.config.freq_dim))))
        return e.unflatten(0, t.shape)

    def pad_text(self, states: torch.Tensor) -> torch.Tensor:
        """(N, L, text_dim) -> (N, max(L, text_len), text_dim) with zero rows appended, as Wan's forward pads."""
        missing = self.config.text_len - states.shape[1]
        return F.pad(states, (0, 0, 0, missing)) if missing > 0 else states

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                cut: Optional[StackCut] = None) -> torch.Tensor:
        c = self.config
        n, _, f, h, w = x.shape
        if f % c.patch_size[0] or h % c.patch_size[1] or w % c.patch_size[2]:
            raise ValueError(f"Wan latents (frames, height, width) = {(f, h, w)} must be multiples of the patch {c.patch_size}")
        grid = (f // c.patch_size[0], h // c.patch_size[1], w // c.patch_size[2])
        tokens = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2)  # (N, T, D)
        e = self.time_vectors(t, n, grid)  # (N, G, D)
        e0 = _linear32(self.time_projection[1], F.silu(e)).unflatten(-1, (6, c.dim))  # (N, G, 6, D)
        context = self.text_embedding(self.pad_text(encoder_hidden_states).to(self.dtype))
        rope = self.video_rope(*grid, x.device)
        tokens = self.stack.run(tokens, lambda i, z: self.blocks[i](z, e0, context, rope), self.fuse, cut)
        return self.unpatchify(self.head(tokens, e), grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(N, T, pt*ph*pw*C) with features ordered (pt, ph, pw, C) -> (N, C, F, H, W)."""
        (pt, ph, pw), (f, h, w) = self.config.patch_size, grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    def _init_weights(self) -> None:
        """Wan's initialisation: xavier linears and patch embedding, N(0, 0.02) text / time embeddings, a zero
        output layer (the modulations keep their randn / sqrt(D) start)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embedding.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)


# --------------------------------------------------------------------------- state dicts


class UnsupportedWan(ValueError):
    """A Wan variant this family does not run (its message names the variant and a key that shows it)."""


COMFY_PREFIX = "model.diffusion_model."

# Keys that mark a Wan variant with inputs beyond text (either layout): (substring of a key, variant).
_VARIANT_MARKERS = [
    ("vace_", "VACE (vace_* blocks)"),
    ("control_adapter.", "Fun Camera control (control_adapter.*)"),
    ("casual_audio_encoder.", "S2V speech-to-video (casual_audio_encoder.*)"),
    ("audio_proj.", "HuMo (audio_proj.*)"),
    ("face_adapter.", "Animate (face_adapter.*)"),
    ("motion_encoder.", "Animate (motion_encoder.*)"),
    ("patch_embedding_pose.", "SCAIL (patch_embedding_pose)"),
    ("patch_embedding_mask.", "SCAIL-2 (patch_embedding_mask)"),
    ("patch_embedding_global.", "WanDancer (patch_embedding_global)"),
    ("ref_conv.", "Fun reference-image (ref_conv)"),
    ("img_emb.emb_pos", "FLF2V first-last-frame (img_emb.emb_pos)"),
    ("img_emb.", "I2V image-to-video (CLIP image embedding img_emb.*)"),
    ("condition_embedder.image_embedder.", "I2V image-to-video (condition_embedder.image_embedder.*)"),
    (".k_img.", "I2V image-to-video (cross_attn.k_img)"),
    (".add_k_proj.", "I2V image-to-video (attn2.add_k_proj)"),
]
SUPPORTED = "text-to-video Wan (2.1 T2V 1.3B / 14B, 2.2 T2V A14B experts, 2.2 TI2V 5B)"


def is_diffusers_layout(sd: dict) -> bool:
    """True for a diffusers `WanTransformer3DModel` state dict (its `condition_embedder.time_proj` and
    top-level `scale_shift_table`)."""
    return "condition_embedder.time_proj.weight" in sd and "scale_shift_table" in sd


def is_wan(sd: dict) -> bool:
    """A Wan state dict in the original layout (bare or under ComfyUI's prefix) or in diffusers' layout."""
    return "head.modulation" in sd or COMFY_PREFIX + "head.modulation" in sd or is_diffusers_layout(sd)


def check_variant(sd: dict) -> None:
    """Raise UnsupportedWan for a Wan whose extra inputs this family does not run, naming the variant."""
    for key in sd:
        for marker, variant in _VARIANT_MARKERS:
            if marker in key:
                raise UnsupportedWan(f"a Wan {variant} checkpoint (key {key}): only {SUPPORTED} loads")
    patch, head = sd.get("patch_embedding.weight"), sd.get("head.head.weight", sd.get("proj_out.weight"))
    if patch is not None and head is not None and patch.ndim == 5:
        out_channels = head.shape[0] // math.prod(patch.shape[2:])
        if patch.shape[1] != out_channels:
            raise UnsupportedWan(
                f"an image-conditioned Wan (I2V / Fun control / inpaint): patch_embedding takes {patch.shape[1]} latent "
                f"channels, the head gives {out_channels} (the extra channels carry a mask and image latents); only "
                f"{SUPPORTED} loads")


def to_original_layout(sd: dict) -> tuple[dict, str]:
    """A Wan state dict as this model names it, and a description of the layout found.

    ComfyUI-saved files carry `model.diffusion_model.`; an all-in-one checkpoint also holds the VAE and the text
    encoder, whose keys are left out (named in the description). Variants are refused (`check_variant`)."""
    layout = "original"
    if COMFY_PREFIX + "head.modulation" in sd:
        others = sorted({k.split(".", 1)[0] + "." for k in sd if not k.startswith(COMFY_PREFIX)})
        sd = {k[len(COMFY_PREFIX):]: v for k, v in sd.items() if k.startswith(COMFY_PREFIX)}
        layout = f"original, ComfyUI prefix {COMFY_PREFIX}" + (f" ({', '.join(others)} left out)" if others else "")
    check_variant(sd)
    if is_diffusers_layout(sd):
        return from_diffusers_state_dict(sd), "diffusers"
    return sd, layout


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: Optional[int] = None) -> WanConfig:
    """Infer the configuration of an original-layout state dict from its keys and shapes.

    The head count is not in the weights (the q/k norms span all heads): every released Wan has head dim 128, so a
    width that 128 divides gets width / 128 heads; any other width needs `num_heads`. `text_len` (512) is not in
    the weights either and keeps its default."""
    dim, in_channels, *patch = sd["patch_embedding.weight"].shape
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise ValueError(f"width {dim} is not a multiple of Wan's head dim {WAN_HEAD_DIM}: give num_heads "
                             "(--set num_heads=N)")
        num_heads = dim // WAN_HEAD_DIM
    num_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return WanConfig(
        dim=dim,
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
        num_layers=num_layers,
        num_heads=num_heads,
        in_channels=in_channels,
        out_channels=sd["head.head.weight"].shape[0] // math.prod(patch),
        text_dim=sd["text_embedding.0.weight"].shape[1],
        freq_dim=sd["time_embedding.0.weight"].shape[1],
        patch_size=tuple(patch),
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        num_skips=sum(1 for k in sd if re.fullmatch(r"skip_norms\.\d+\.weight", k)),
    )


# diffusers prefix -> original prefix, first match wins.
_TOP_RENAMES = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
]
_BLOCK_RENAMES = [
    ("attn1.to_q.", "self_attn.q."),
    ("attn1.to_k.", "self_attn.k."),
    ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn1.norm_q.", "self_attn.norm_q."),
    ("attn1.norm_k.", "self_attn.norm_k."),
    ("attn2.to_q.", "cross_attn.q."),
    ("attn2.to_k.", "cross_attn.k."),
    ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."),
    ("attn2.norm_q.", "cross_attn.norm_q."),
    ("attn2.norm_k.", "cross_attn.norm_k."),
    ("norm2.", "norm3."),  # diffusers' norm2 is the affine norm before the cross-attention
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
]
# projections diffusers' `fuse_projections()` concatenates: fused name -> the original names, in order
_FUSED = {"attn1.to_qkv.": ("self_attn.q.", "self_attn.k.", "self_attn.v."), "attn2.to_kv.": ("cross_attn.k.", "cross_attn.v.")}


def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a diffusers `WanTransformer3DModel` state dict onto the original layout. Keys it does not know keep their
    names, so the strict load names them as unexpected."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"(blocks\.\d+\.)(.*)", key)
        if m is None:
            out[rename_prefix(key, _TOP_RENAMES) or key] = value
            continue
        prefix, rest = m.groups()
        fused = next((f for f in _FUSED if rest.startswith(f)), None)
        if fused is not None:
            names = _FUSED[fused]
            for name, part in zip(names, value.chunk(len(names), dim=0)):
                out[prefix + name + rest[len(fused):]] = part
            continue
        out[prefix + (rename_prefix(rest, _BLOCK_RENAMES) or rest)] = value
    return out


def to_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `from_diffusers_state_dict` (unfused projections): an original-layout state dict named as
    diffusers' `WanTransformer3DModel` names it."""
    top = [(new, old) for old, new in _TOP_RENAMES]
    block = [(new, old) for old, new in _BLOCK_RENAMES]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"(blocks\.\d+\.)(.*)", key)
        if m is None:
            out[rename_prefix(key, top) or key] = value
        else:
            out[m.group(1) + (rename_prefix(m.group(2), block) or m.group(2))] = value
    return out
