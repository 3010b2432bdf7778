"""DiT class-to-image (facebookresearch/DiT layout), with or without Skip-DiT long skips."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..parallel import gather_tokens, shard_tokens
from .layers import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, init_dit_weights, sincos_grid, unpatchify
from .ustack import SkipBranchesMixin, StackCut, UStack


@dataclass
class DiTConfig:
    input_size: int = 32  # latent height = width the stored pos_embed was made for
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    skip: bool = False  # Skip-DiT: depth // 2 long skips
    skip_fusion: str = "replace"  # "replace" (the paper's) | "residual" (ustack.SKIP_FUSIONS)
    class_dropout_prob: float = 0.1

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_skips(self) -> int:
        return self.depth // 2 if self.skip else 0


DIT_PRESETS = {
    "DiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "DiT-XL/4": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=4),
    "DiT-XL/8": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=8),
    "DiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "DiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DiT-tiny": dict(depth=4, hidden_size=128, num_heads=2, patch_size=2, input_size=8, num_classes=10),
}


class DiT(SkipBranchesMixin, nn.Module):
    """x: (N, C, H, W) latents, t: (N,) timesteps 0..999, y: (N,) labels (num_classes = null).

    Returns (N, C_out, H, W): epsilon in the first C channels, the learned variance after.
    """

    family = "dit"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        grid = c.input_size // c.patch_size
        self.pos_embed = nn.Parameter(sincos_grid(c.hidden_size, grid, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        if c.skip:
            self.add_skip_branches(c.num_skips, c.hidden_size, c.skip_fusion)
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.stack = UStack(c.depth, c.num_skips)
        init_dit_weights(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cut: Optional[StackCut] = None) -> torch.Tensor:
        c = self.config
        h, w = x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size
        tokens = self.x_embedder(x.to(self.dtype)) + self._pos_embed(h, w).to(self.dtype)
        cond = self.t_embedder(t) + self.y_embedder(y)
        tokens = shard_tokens(self, tokens)  # this process's tokens, when they are split (skipdit_core.parallel)
        tokens = self.stack.run(tokens, lambda i, z: self.blocks[i](z, cond), self.fuse, cut)
        out = gather_tokens(self, self.final_layer(tokens, cond))
        return unpatchify(out, h, w, c.patch_size, c.out_channels)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if self.pos_embed.shape[1] == h * w and h == w:
            return self.pos_embed
        return sincos_grid(self.config.hidden_size, h, w)[None].to(self.pos_embed.device)


# Head counts are not stored in the weights; these are the published widths' counts.
_HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6}


def count_indexed(sd: dict, prefix: str, suffix: str) -> int:
    """Number of consecutive indices i with `{prefix}{i}{suffix}` in sd."""
    n = 0
    while f"{prefix}{n}{suffix}" in sd:
        n += 1
    return n


def pick_num_heads(hidden: int, num_heads: Optional[int], key: str) -> int:
    """The head count of a width: the user's (checked against the width), else the published
    widths' count, else one head per 64 channels (DiT's head size); `key` is the tensor the width
    was read from. Any other width is refused rather than guessed: a wrong split loads without
    complaint and gives other outputs."""
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(hidden, hidden // 64 if hidden % 64 == 0 else None)
        if num_heads is None:
            raise ValueError(f"width {hidden} ({key}) is not a multiple of 64: the head count is not in the weights, "
                             "give it (num_heads, e.g. --set num_heads=N)")
    elif not isinstance(num_heads, int) or num_heads < 1 or hidden % num_heads:
        raise ValueError(f"num_heads={num_heads!r} does not divide the width {hidden} ({key})")
    return num_heads


def dit_core_fields(sd: dict, num_heads: Optional[int] = None) -> dict:
    """Config fields shared by DiT and class-conditional Latte, read from keys and shapes
    (num_heads, not in the weights: the caller's, else `pick_num_heads`)."""
    proj = sd["x_embedder.proj.weight"]  # (D, C_in, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final_layer.linear predicts {out_channels} channels for {in_channels} input channels")
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    fields = dict(
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=count_indexed(sd, "blocks.", ".attn.qkv.weight"),
        num_heads=pick_num_heads(hidden, num_heads, "x_embedder.proj.weight"),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        learn_sigma=out_channels == 2 * in_channels,
        skip="skip_norms.0.weight" in sd,
    )
    if tokens is not None:
        fields["input_size"] = int(round(tokens**0.5)) * patch
    if "y_embedder.embedding_table.weight" in sd:
        fields["num_classes"] = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    return fields


def config_from_state_dict(sd: dict, num_heads: Optional[int] = None) -> DiTConfig:
    """Detect a DiT config (depth, width, heads, patch, channels, learn_sigma, classes, skips)."""
    return DiTConfig(**dit_core_fields(sd, num_heads))
