"""Hunyuan-DiT text-to-image (Tencent's original layout: v1.0 / v1.1 / v1.2).

Module and parameter names follow Tencent's `hydit/modules/models.py` exactly, so the released
`t2i/model/pytorch_model_ema.pt` loads as it is: `x_embedder.proj`, `t_embedder.mlp.{0,2}`,
`mlp_t5.{0,2}`, `text_embedding_padding`, `pooler.*`, `style_embedder` (v1.0/1.1 only),
`extra_embedder.{0,2}`, `blocks.N.{norm1,norm2,norm3,default_modulation.1,attn1.*,attn2.*,
mlp.*,skip_norm,skip_linear}`, `final_layer.*`. In this layout `norm3` is the norm before the
cross-attention and `norm2` the one before the MLP (diffusers swaps the two names).

The 40 blocks form a U: layers 0..18 push their output, layers 19 and 20 neither push nor
receive, layer L >= 21 receives the output of layer 39 - L. That is `UStack(40, 19)`; the
fusion runs through the stack (and so through Skip-Cache), never inside a block.

`from_diffusers_state_dict` converts a diffusers `HunyuanDiT2DModel` state dict to this layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import attend, gather_tokens, shard_tokens
from .layers import FinalLayer, Mlp, PatchEmbed, TimestepEmbedder, fp32_layer_norm, modulate, rename_prefix, timestep_embedding, unpatchify
from .ustack import StackCut, UStack, fuse_skip


@dataclass
class HunyuanDiTConfig:
    input_size: int = 128  # latent height = width of the 1024 px training resolution (informative only)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_ratio: float = 4.3637  # int(1408 * 4.3637) = 6144
    text_states_dim: int = 1024  # CLIP-like BERT width; also the cross-attention key/value width
    text_states_dim_t5: int = 2048  # mT5-XL width
    text_len: int = 77
    text_len_t5: int = 256
    pooled_dim: int = 1024  # output of the T5 attention pool
    pooler_heads: int = 8
    learn_sigma: bool = True
    use_style_cond_and_image_meta_size: bool = True  # True for v1.0 / v1.1, False for v1.2
    norm_eps: float = 1e-6
    rope_base_image_size: int = 512  # RoPE positions are squeezed onto the grid of this pixel size
    rope_theta: float = 10000.0

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def extra_in_dim(self) -> int:
        """Width of the vector fed to `extra_embedder`: pooled T5 [+ 6 size sinusoids + style]."""
        if self.use_style_cond_and_image_meta_size:
            return self.pooled_dim + 6 * 256 + self.hidden_size
        return self.pooled_dim

    @property
    def rope_base_grid(self) -> int:
        """Side of the token grid the RoPE positions are mapped onto (32 for 512 px, patch 2)."""
        return self.rope_base_image_size // 8 // self.patch_size

    @property
    def num_skips(self) -> int:
        """Long skips: layers > depth//2 receive, layers < depth//2 - 1 push (19 for depth 40)."""
        receivers = self.depth - 1 - self.depth // 2
        pushers = max(self.depth // 2 - 1, 0)
        if receivers != pushers:
            raise ValueError(
                f"Hunyuan-DiT's skip rule needs an even depth: depth {self.depth} has {pushers} "
                f"pushing and {receivers} receiving layers"
            )
        return receivers


_DIT_G2 = dict(depth=40, hidden_size=1408, num_heads=16, patch_size=2, mlp_ratio=4.3637)

HUNYUAN_PRESETS = {
    "HunyuanDiT-v1.0": dict(_DIT_G2, use_style_cond_and_image_meta_size=True),
    "HunyuanDiT-v1.1": dict(_DIT_G2, use_style_cond_and_image_meta_size=True),
    "HunyuanDiT-v1.2": dict(_DIT_G2, use_style_cond_and_image_meta_size=False),
    "HunyuanDiT-tiny": dict(
        depth=6, hidden_size=64, num_heads=4, patch_size=2, mlp_ratio=4.0, input_size=16,
        text_states_dim=32, text_states_dim_t5=48, text_len=7, text_len_t5=9, pooled_dim=40,
    ),
}


# --------------------------------------------------------------------------- 2-D RoPE


def resize_crop_region(grid_h: int, grid_w: int, base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an (grid_h, grid_w) token grid lands when resized to fit a base x base grid and
    centred: ((top, left), (bottom, right)). The long side spans the whole base grid.

    Uses Python's round() (banker's rounding), as Tencent's and diffusers' code do.
    """
    if grid_h > grid_w:
        rh, rw = base, int(round(base / grid_h * grid_w))
    else:
        rw, rh = base, int(round(base / grid_w * grid_h))
    top = int(round((base - rh) / 2.0))
    left = int(round((base - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_positions(grid_h: int, grid_w: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column positions of the token grid: the crop region sampled without its end
    (np.linspace(start, stop, n, endpoint=False)). Returns rows (grid_h,), cols (grid_w,) float32.
    """
    (top, left), (bottom, right) = resize_crop_region(grid_h, grid_w, base)
    rows = top + (bottom - top) * torch.arange(grid_h, dtype=torch.float64) / grid_h
    cols = left + (right - left) * torch.arange(grid_w, dtype=torch.float64) / grid_w
    return rows.float(), cols.float()


def _rope_1d(dim: int, pos: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (M,) -> cos, sin (M, dim), each frequency repeated for the two members of a pair."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(pos.float(), freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def hunyuan_rope(
    head_dim: int, grid_h: int, grid_w: int, base: int = 32, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE table of Hunyuan-DiT: cos, sin (grid_h * grid_w, head_dim) float32, tokens row-major.

    The first half of the head dim encodes the column position, the second half the row.
    """
    rows, cols = rope_positions(grid_h, grid_w, base)
    row_idx, col_idx = torch.meshgrid(rows, cols, indexing="ij")
    cos_w, sin_w = _rope_1d(head_dim // 2, col_idx.reshape(-1), theta)
    cos_h, sin_h = _rope_1d(head_dim // 2, row_idx.reshape(-1), theta)
    return torch.cat([cos_w, cos_h], dim=1), torch.cat([sin_w, sin_h], dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) of x (N, H, T, hd) by the angles of cos/sin (T, hd),
    in float32, and cast back."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------- modules


class FP32SiLU(nn.Module):
    """SiLU computed in float32 (Tencent's FP32_SiLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x.float()).to(x.dtype)


class AttentionPool(nn.Module):
    """Attention pooling of the raw T5 states: the mean token, prepended and given a learned
    positional embedding like every token, is the single query. (N, L, C) -> (N, out_dim)."""

    def __init__(self, seq_len: int, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, dim) / dim**0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, c = x.shape
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        q, k, v = (self._heads(z) for z in (self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x)))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, 1, C/heads)
        return self.c_proj(out.transpose(1, 2).reshape(n, c))

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        """(N, T, C) -> (N, heads, T, C/heads)."""
        return z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


class SelfAttention(nn.Module):
    """Fused `Wqkv` ([q|k|v], head-major), LayerNorm q/k norms, RoPE on q and k, `out_proj`."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(head_dim, elementwise_affine=True, eps=eps)
        self.k_norm = nn.LayerNorm(head_dim, elementwise_affine=True, eps=eps)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (N, T, D), rope cos/sin (T, hd) -> (N, T, D)."""
        n, t, d = x.shape
        q, k, v = self.Wqkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q = apply_rope(fp32_layer_norm(q, self.q_norm), *rope)
        k = apply_rope(fp32_layer_norm(k, self.k_norm), *rope)
        x = attend(self, q, k, v)  # Ulysses when the tokens are split over processes (skipdit_core.parallel)
        return self.out_proj(x.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """`q_proj` on image tokens, fused `kv_proj` ([k|v]) on text, q/k norms, RoPE on q only."""

    def __init__(self, dim: int, text_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(text_dim, 2 * dim)
        self.q_norm = nn.LayerNorm(head_dim, elementwise_affine=True, eps=eps)
        self.k_norm = nn.LayerNorm(head_dim, elementwise_affine=True, eps=eps)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (N, T, D), text (N, S, text_dim), rope cos/sin (T, hd) -> (N, T, D). No mask."""
        n, t, d = x.shape
        hd = d // self.num_heads
        q = self.q_proj(x).reshape(n, t, self.num_heads, hd).transpose(1, 2)
        k, v = self.kv_proj(text).reshape(n, text.shape[1], 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        q = apply_rope(fp32_layer_norm(q, self.q_norm), *rope)
        k = fp32_layer_norm(k, self.k_norm)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(x.transpose(1, 2).reshape(n, t, d))


class HunyuanDiTBlock(nn.Module):
    """x + attn1(norm1(x) + shift(c)); x + attn2(norm3(x), text); x + mlp(norm2(x)).

    Blocks that receive a long skip also hold `skip_norm` / `skip_linear`, but the fusion is
    applied by the model's `UStack` before the block runs, not here.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, text_dim: int, skip: bool, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=eps)
        self.attn1 = SelfAttention(hidden_size, num_heads, eps)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.default_modulation = nn.Sequential(FP32SiLU(), nn.Linear(hidden_size, hidden_size))
        self.attn2 = CrossAttention(hidden_size, text_dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=eps)
        if skip:
            self.skip_norm = nn.LayerNorm(2 * hidden_size, elementwise_affine=True, eps=eps)
            self.skip_linear = nn.Linear(2 * hidden_size, hidden_size)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x (N, T, D), c (N, D), text (N, S, text_dim), rope cos/sin (T, hd) -> (N, T, D)."""
        shift = self.default_modulation(c).unsqueeze(1)
        x = x + self.attn1(fp32_layer_norm(x, self.norm1) + shift, rope)
        x = x + self.attn2(fp32_layer_norm(x, self.norm3), text, rope)
        x = x + self.mlp(fp32_layer_norm(x, self.norm2))
        return x


class HunyuanFinalLayer(FinalLayer):
    """The DiT final layer (same keys, (shift, scale)) with Tencent's float32 SiLU; the
    parameter-free norm is also taken in float32."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__(hidden_size, patch_size, out_channels)
        self.adaLN_modulation[0] = FP32SiLU()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(fp32_layer_norm(x, self.norm_final), shift, scale))


# --------------------------------------------------------------------------- model


class HunyuanDiT(nn.Module):
    """Hunyuan-DiT. Inputs:

    x: (N, C, H, W) latents (H, W multiples of the patch size), t: (N,) timesteps 0..999,
    encoder_hidden_states: (N, text_len, text_states_dim) CLIP-like BERT states,
    text_embedding_mask: (N, text_len) 1 = real token, 0 = padding,
    encoder_hidden_states_t5: (N, text_len_t5, text_states_dim_t5) mT5 states,
    text_embedding_mask_t5: (N, text_len_t5),
    image_meta_size: (N, 6) (original h, w, target h, w, crop top, left); v1.0/1.1 only,
    style: (N,) long, always 0; v1.0/1.1 only (defaults to zeros),
    rope: optional (cos, sin), each (H/p * W/p, head_dim), replacing the built-in RoPE,
    cut: optional `StackCut` for Skip-Cache.

    Returns (N, C_out, H, W): the v-prediction in the first C channels (the learned variance
    after it when learn_sigma).
    """

    family = "hunyuan"

    def __init__(self, config: HunyuanDiTConfig):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.mlp_t5 = nn.Sequential(
            nn.Linear(c.text_states_dim_t5, 4 * c.text_states_dim_t5),
            FP32SiLU(),
            nn.Linear(4 * c.text_states_dim_t5, c.text_states_dim),
        )
        self.text_embedding_padding = nn.Parameter(torch.randn(c.text_len + c.text_len_t5, c.text_states_dim))
        self.pooler = AttentionPool(c.text_len_t5, c.text_states_dim_t5, c.pooler_heads, c.pooled_dim)
        if c.use_style_cond_and_image_meta_size:
            self.style_embedder = nn.Embedding(1, D)
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.extra_embedder = nn.Sequential(nn.Linear(c.extra_in_dim, 4 * D), FP32SiLU(), nn.Linear(4 * D, D))
        self.blocks = nn.ModuleList(
            [
                HunyuanDiTBlock(D, c.num_heads, c.mlp_ratio, c.text_states_dim, skip=layer > c.depth // 2, eps=c.norm_eps)
                for layer in range(c.depth)
            ]
        )
        self.final_layer = HunyuanFinalLayer(D, c.patch_size, c.out_channels)
        self.stack = UStack(c.depth, c.num_skips)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._init_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def fuse(self, j: int, hidden: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Skip branch j: the fusion held by receiving block L - S + j."""
        block = self.blocks[self.stack.num_units - self.stack.num_skips + j]
        return fuse_skip(hidden, skip, block.skip_norm, block.skip_linear)

    def image_rope(self, grid_h: int, grid_w: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The built-in RoPE for a (grid_h, grid_w) token grid: cos, sin (grid_h*grid_w, hd) float32."""
        device = torch.device(device or "cpu")
        key = (grid_h, grid_w, device)
        if key not in self._rope_cache:
            c = self.config
            cos, sin = hunyuan_rope(c.head_dim, grid_h, grid_w, c.rope_base_grid, c.rope_theta)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def text_states(
        self, clip: torch.Tensor, clip_mask: torch.Tensor, t5: torch.Tensor, t5_mask: torch.Tensor
    ) -> torch.Tensor:
        """concat(clip, mlp_t5(t5)) with padded positions replaced by `text_embedding_padding`.

        clip (N, text_len, text_dim), t5 (N, text_len_t5, t5_dim), masks (N, len) -> (N, S, text_dim).
        """
        text = torch.cat([clip.to(self.dtype), self.mlp_t5(t5.to(self.dtype))], dim=1)
        mask = torch.cat([clip_mask, t5_mask], dim=-1).bool().unsqueeze(2)
        return torch.where(mask, text, self.text_embedding_padding.to(text.dtype))

    def global_vector(
        self,
        t: torch.Tensor,
        t5: torch.Tensor,
        image_meta_size: Optional[torch.Tensor] = None,
        style: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """c = t_embedder(t) + extra_embedder([pooler(t5), size sinusoids, style]) (N, D)."""
        n = t5.shape[0]
        extra = [self.pooler(t5.to(self.dtype))]
        if self.config.use_style_cond_and_image_meta_size:
            if image_meta_size is None:
                raise ValueError("Hunyuan-DiT v1.0/v1.1 needs image_meta_size (N, 6)")
            sizes = timestep_embedding(image_meta_size.reshape(-1), 256).reshape(n, 6 * 256)
            if style is None:
                style = torch.zeros(n, dtype=torch.long, device=t5.device)
            extra += [sizes.to(self.dtype), self.style_embedder(style.long())]
        return self.t_embedder(t) + self.extra_embedder(torch.cat(extra, dim=1))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embedding_mask: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor,
        text_embedding_mask_t5: torch.Tensor,
        image_meta_size: Optional[torch.Tensor] = None,
        style: Optional[torch.Tensor] = None,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cut: Optional[StackCut] = None,
    ) -> torch.Tensor:
        c = self.config
        h, w = x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tokens = self.x_embedder(x.to(self.dtype))
        text = self.text_states(encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5, text_embedding_mask_t5)
        cond = self.global_vector(t, encoder_hidden_states_t5, image_meta_size, style)
        if rope is None:
            rope = self.image_rope(h, w, x.device)
        else:
            rope = (rope[0].to(x.device, torch.float32), rope[1].to(x.device, torch.float32))
        # this process's tokens and their RoPE rows, when the tokens are split (skipdit_core.parallel)
        tokens, rope = shard_tokens(self, tokens), (shard_tokens(self, rope[0], 0), shard_tokens(self, rope[1], 0))
        tokens = self.stack.run(tokens, lambda i, z: self.blocks[i](z, cond, text, rope), self.fuse, cut)
        return unpatchify(gather_tokens(self, self.final_layer(tokens, cond)), h, w, c.patch_size, c.out_channels)

    def _init_weights(self) -> None:
        """Tencent's initialisation: xavier linears, zeroed modulations and output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.extra_embedder[0], self.extra_embedder[2], self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.default_modulation[-1].weight)
            nn.init.zeros_(block.default_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


# --------------------------------------------------------------------------- state dicts


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: Optional[int] = None) -> HunyuanDiTConfig:
    """Infer the configuration of a Tencent-layout state dict from its keys and shapes.

    `input_size` cannot be inferred (the model has no position table) and keeps its default. The
    head count is fixed by the weights (the q norm's width is the head dim); a `num_heads` that
    contradicts them is an error.
    """
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    head_dim = sd["blocks.0.attn1.q_norm.weight"].shape[0]
    if num_heads is not None and num_heads * head_dim != hidden:
        raise ValueError(
            f"num_heads={num_heads} contradicts the weights: blocks.0.attn1.q_norm.weight gives head dim {head_dim}, "
            f"so width {hidden} has {hidden // head_dim} heads"
        )
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = mlp_hidden / hidden
    if int(hidden * mlp_ratio) != mlp_hidden:  # guard against float round-down
        mlp_ratio = (mlp_hidden + 0.5) / hidden
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    padding = sd["text_embedding_padding"]
    text_len_t5 = sd["pooler.positional_embedding"].shape[0] - 1
    return HunyuanDiTConfig(
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // head_dim,
        mlp_ratio=mlp_ratio,
        text_states_dim=padding.shape[1],
        text_states_dim_t5=sd["mlp_t5.0.weight"].shape[1],
        text_len=padding.shape[0] - text_len_t5,
        text_len_t5=text_len_t5,
        pooled_dim=sd["pooler.c_proj.weight"].shape[0],
        learn_sigma=out_channels == 2 * in_channels,
        use_style_cond_and_image_meta_size="style_embedder.weight" in sd,
    )


def is_diffusers_layout(sd: dict[str, torch.Tensor]) -> bool:
    """True for a diffusers `HunyuanDiT2DModel` state dict (its `time_extra_emb.*` embedder is
    Hunyuan-only: Latte T2V and DiT in diffusers also have `pos_embed.proj` / `norm_out`)."""
    return any(k.startswith("time_extra_emb.") for k in sd)


# diffusers prefix -> Tencent prefix; the first matching prefix wins.
_TOP_RENAMES = [
    ("pos_embed.proj.", "x_embedder.proj."),
    ("text_embedder.linear_1.", "mlp_t5.0."),
    ("text_embedder.linear_2.", "mlp_t5.2."),
    ("time_extra_emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("time_extra_emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("time_extra_emb.extra_embedder.linear_1.", "extra_embedder.0."),
    ("time_extra_emb.extra_embedder.linear_2.", "extra_embedder.2."),
    ("time_extra_emb.pooler.", "pooler."),
    ("time_extra_emb.style_embedder.", "style_embedder."),
    ("text_embedding_padding", "text_embedding_padding"),
    ("proj_out.", "final_layer.linear."),
    ("norm_out.linear.", "final_layer.adaLN_modulation.1."),  # halves swapped below
]
_BLOCK_RENAMES = [
    ("norm1.linear.", "default_modulation.1."),
    ("norm1.norm.", "norm1."),
    ("norm2.", "norm3."),  # diffusers' norm2 is the norm before cross-attention
    ("norm3.", "norm2."),
    ("attn1.norm_q.", "attn1.q_norm."),
    ("attn1.norm_k.", "attn1.k_norm."),
    ("attn1.to_qkv.", "attn1.Wqkv."),  # after diffusers' fuse_qkv_projections()
    ("attn1.to_out.0.", "attn1.out_proj."),
    ("attn2.norm_q.", "attn2.q_norm."),
    ("attn2.norm_k.", "attn2.k_norm."),
    ("attn2.to_q.", "attn2.q_proj."),
    ("attn2.to_kv.", "attn2.kv_proj."),
    ("attn2.to_out.0.", "attn2.out_proj."),
    ("ff.net.0.proj.", "mlp.fc1."),
    ("ff.net.2.", "mlp.fc2."),
    ("skip_norm.", "skip_norm."),
    ("skip_linear.", "skip_linear."),
]
# split projections fused in Tencent's layout: diffusers name -> (fused name, part, number of parts)
_FUSED = {
    "attn1.to_q.": ("attn1.Wqkv.", 0, 3),
    "attn1.to_k.": ("attn1.Wqkv.", 1, 3),
    "attn1.to_v.": ("attn1.Wqkv.", 2, 3),
    "attn2.to_k.": ("attn2.kv_proj.", 0, 2),
    "attn2.to_v.": ("attn2.kv_proj.", 1, 2),
}


def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers `HunyuanDiT2DModel` state dict to Tencent's layout (this model's)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list] = {}
    for key, value in sd.items():
        m = re.match(r"(blocks\.\d+\.)(.*)", key)
        if m is None:
            new = rename_prefix(key, _TOP_RENAMES)
            if new is None:
                raise KeyError(f"unexpected key in a diffusers Hunyuan-DiT state dict: {key}")
            if key.startswith("norm_out.linear."):  # (scale, shift) -> (shift, scale)
                scale, shift = value.chunk(2, dim=0)
                value = torch.cat([shift, scale], dim=0)
            out[new] = value
            continue
        prefix, rest = m.groups()
        fused = next(((old, spec) for old, spec in _FUSED.items() if rest.startswith(old)), None)
        if fused is not None:
            old, (new_name, index, count) = fused
            parts.setdefault(prefix + new_name + rest[len(old):], [None] * count)[index] = value
            continue
        new = rename_prefix(rest, _BLOCK_RENAMES)
        if new is None:
            raise KeyError(f"unexpected key in a diffusers Hunyuan-DiT state dict: {key}")
        out[prefix + new] = value
    for key, values in parts.items():
        if any(v is None for v in values):
            raise KeyError(f"incomplete split projection for {key}")
        out[key] = torch.cat(values, dim=0)
    return out
