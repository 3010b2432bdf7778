"""Latte class-conditional / unconditional video (FaceForensics, SkyTimelapse, Taichi-HD, UCF101).

The original Latte layout: `blocks.N` alternate spatial (even N) and temporal (odd N) adaLN-Zero
blocks, so 28 blocks are 14 (spatial, temporal) pairs. A pair is one unit of the U-stack; the
Skip-DiT variant has depth // 4 long skips between pairs (`skip_norms.i`, `skip_linears.i.linear`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange, repeat
from torch import nn

from ..parallel import gather_tokens, shard_tokens
from .layers import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, init_dit_weights, sincos_1d, sincos_grid, unpatchify
from .dit import dit_core_fields
from .ustack import SkipBranchesMixin, StackCut, UStack


@dataclass
class LatteConfig:
    input_size: int = 32  # latent height = width the stored pos_embed was made for
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28  # blocks; pairs = depth // 2
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 16  # rows of the stored temp_embed
    num_classes: int = 0  # 0 = unconditional (FFS, Sky, Taichi); 101 for UCF101
    learn_sigma: bool = True
    skip: bool = False  # Skip-DiT: depth // 4 long skips between pairs
    skip_fusion: str = "replace"  # "replace" (the paper's) | "residual" (ustack.SKIP_FUSIONS)
    class_dropout_prob: float = 0.1
    prediction: str = "eps"  # what the output predicts: "eps" (every released Latte) or "v"

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_pairs(self) -> int:
        return self.depth // 2

    @property
    def num_skips(self) -> int:
        return self.depth // 4 if self.skip else 0


LATTE_PRESETS = {
    "Latte-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "Latte-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "Latte-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "Latte-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "Latte-XL/2-ucf101": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, num_classes=101),
    "Latte-tiny": dict(depth=8, hidden_size=128, num_heads=2, patch_size=2, input_size=8, num_frames=4, num_classes=5),
}


class Latte(SkipBranchesMixin, nn.Module):
    """x: (B, F, C, H, W) video latents (frames before channels, Latte's own layout),
    t: (B,) timesteps 0..999, y: (B,) labels or None for unconditional models.

    Returns (B, F, C_out, H, W): epsilon in the first C channels, the learned variance after.
    """

    family = "latte"
    blocks_per_unit = 2  # a unit of the stack is a (spatial, temporal) pair

    def __init__(self, config: LatteConfig):
        super().__init__()
        if config.depth % 2:
            raise ValueError(f"Latte needs an even number of blocks (spatial, temporal pairs), got {config.depth}")
        if config.prediction not in ("eps", "v"):
            raise ValueError(f"Latte prediction must be 'eps' or 'v', got {config.prediction!r}")
        self.config = c = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        if c.num_classes > 0:
            self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        grid = c.input_size // c.patch_size
        self.pos_embed = nn.Parameter(sincos_grid(c.hidden_size, grid, grid)[None], requires_grad=False)
        self.temp_embed = nn.Parameter(
            sincos_1d(c.hidden_size, torch.arange(c.num_frames))[None], requires_grad=False
        )
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        if c.skip:
            self.add_skip_branches(c.num_skips, c.hidden_size, c.skip_fusion)
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.stack = UStack(c.num_pairs, c.num_skips)
        init_dit_weights(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, cut: Optional[StackCut] = None
    ) -> torch.Tensor:
        c = self.config
        b, f = x.shape[:2]
        h, w = x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size
        tokens = self.x_embedder(rearrange(x, "b f c h w -> (b f) c h w").to(self.dtype))
        tokens = tokens + self._pos_embed(h, w).to(self.dtype)
        tokens = shard_tokens(self, tokens)  # this process's tokens, when they are split (skipdit_core.parallel)

        cond = self.t_embedder(t)
        if c.num_classes > 0:
            if y is None:
                raise ValueError("this Latte model is class-conditional: pass labels y (the null label is num_classes)")
            cond = cond + self.y_embedder(y)
        cond_spatial = repeat(cond, "b d -> (b f) d", f=f)  # one vector per frame
        cond_temporal = repeat(cond, "b d -> (b t) d", t=tokens.shape[1])  # one vector per (local) patch position
        temp_embed = self._temp_embed(f).to(self.dtype)

        def run_pair(i: int, z: torch.Tensor) -> torch.Tensor:
            z = self.blocks[2 * i](z, cond_spatial)
            z = rearrange(z, "(b f) t d -> (b t) f d", b=b)
            if i == 0:
                z = z + temp_embed
            z = self.blocks[2 * i + 1](z, cond_temporal)
            return rearrange(z, "(b t) f d -> (b f) t d", b=b)

        tokens = self.stack.run(tokens, run_pair, self.fuse, cut)
        out = unpatchify(gather_tokens(self, self.final_layer(tokens, cond_spatial)), h, w, c.patch_size, c.out_channels)
        return rearrange(out, "(b f) c h w -> b f c h w", b=b)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if self.pos_embed.shape[1] == h * w and h == w:
            return self.pos_embed
        return sincos_grid(self.config.hidden_size, h, w)[None].to(self.pos_embed.device)

    def _temp_embed(self, frames: int) -> torch.Tensor:
        if frames <= self.temp_embed.shape[1]:
            return self.temp_embed[:, :frames]
        return sincos_1d(self.config.hidden_size, torch.arange(frames))[None].to(self.temp_embed.device)


def config_from_state_dict(sd: dict, num_heads: Optional[int] = None) -> LatteConfig:
    """Detect a class-conditional / unconditional Latte config from keys and shapes."""
    fields = dit_core_fields(sd, num_heads)
    fields.setdefault("num_classes", 0)
    fields["num_frames"] = sd["temp_embed"].shape[1]
    return LatteConfig(**fields)
