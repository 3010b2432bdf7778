"""Skip branches as an add-on: the new parameters of a Skip-Wan in a file of their own.

A Skip-Wan is a released Wan plus S long-skip fusion branches (`SkipBranchesMixin`): `skip_norms.j.{weight,bias}`
(LayerNorm over 2D) and `skip_linears.j.linear.{weight,bias}` (2D -> D), branch j serving unit L-S+j, which receives
the output of unit S-1-j. Everything else is the base model's. A *skip-branches file* holds only those 4 S tensors
(a few percent of the model: 4.76% of a Wan 2.1 1.3B with 15 skips, 6.84% of a 14B with 20) as .safetensors, with metadata:

    skipdit.format       "skipdit-skip-branches"
    skipdit.family       "wan"
    skipdit.num_layers   L, the blocks of the base model
    skipdit.num_skips    S
    skipdit.dim          D, the base model's width
    skipdit.in_channels  the base model's latent channels (16 for Wan 2.1 T2V; 36 would be an I2V model)
    skipdit.skip_fusion  "replace" (the paper's fusion; the default when absent) or "residual" (hidden + branch)
    skipdit.base         the base the Skip-Wan was trained from, when known (free text, e.g. a file name)
    skipdit.skip_model_parameters   parameters of the whole Skip-Wan, when extracted from one (for the fraction)

`extract_branches` writes one from a Skip-Wan, `load_branches` reads it back (every problem one `CheckpointError`
line naming the file, the key and the expected / found values), `attach_branches` puts it on a base `WanModel`
(the result equals the full Skip-Wan). The ComfyUI node "Load Skip Branches" puts the same file on core Wan.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import nn

from .loading import (
    CheckpointError, _read_safetensors, _sniff, inspect_checkpoint, safetensors_header, write_safetensors,
)
from .models.ustack import UStack, check_skip_fusion

FORMAT = "skipdit-skip-branches"
FAMILY = "wan"
META_FORMAT = "skipdit.format"
META_FAMILY = "skipdit.family"
META_LAYERS = "skipdit.num_layers"
META_SKIPS = "skipdit.num_skips"
META_DIM = "skipdit.dim"
META_IN_CHANNELS = "skipdit.in_channels"
META_BASE = "skipdit.base"
META_MODEL_PARAMETERS = "skipdit.skip_model_parameters"
META_FUSION = "skipdit.skip_fusion"
LAYER_NORM_EPS = 1e-6  # SkipBranchesMixin's LayerNorm

_BRANCH_KEY = re.compile(r"(skip_norms\.\d+\.(weight|bias))|(skip_linears\.\d+\.linear\.(weight|bias))")


def branch_keys(num_skips: int) -> list[str]:
    """The tensor names of S branches, in order."""
    return [k for j in range(num_skips) for k in (
        f"skip_norms.{j}.weight", f"skip_norms.{j}.bias", f"skip_linears.{j}.linear.weight", f"skip_linears.{j}.linear.bias")]


def branch_shapes(num_skips: int, dim: int) -> dict[str, tuple[int, ...]]:
    """Every branch tensor's expected shape."""
    shapes = {}
    for j in range(num_skips):
        shapes[f"skip_norms.{j}.weight"] = shapes[f"skip_norms.{j}.bias"] = (2 * dim,)
        shapes[f"skip_linears.{j}.linear.weight"] = (dim, 2 * dim)
        shapes[f"skip_linears.{j}.linear.bias"] = (dim,)
    return shapes


def branch_parameters(num_skips: int, dim: int) -> int:
    """Parameters of S branches at width D: per branch 2D + 2D (LayerNorm) + 2D^2 + D (Linear)."""
    return num_skips * (2 * dim * dim + 5 * dim)


@dataclass(frozen=True)
class BranchInfo:
    """What a skip-branches file holds, from its metadata (checked against its tensors)."""

    path: str
    num_layers: int
    num_skips: int
    dim: int
    in_channels: Optional[int] = None
    base: Optional[str] = None
    skip_model_parameters: Optional[int] = None
    dtypes: tuple = ()
    family: str = FAMILY
    fusion: str = "replace"  # ustack.SKIP_FUSIONS

    @property
    def parameters(self) -> int:
        return branch_parameters(self.num_skips, self.dim)

    @property
    def fraction(self) -> Optional[float]:
        """The branches' share of the whole Skip-Wan's parameters (None when the file does not say)."""
        return self.parameters / self.skip_model_parameters if self.skip_model_parameters else None

    def pairs(self) -> list[tuple[int, int]]:
        """(source block, receiving block) per long skip: block i feeds block L-1-i."""
        return UStack(self.num_layers, self.num_skips).pairs()

    def describe(self) -> dict:
        return {
            "file": self.path, "format": FORMAT, "family": self.family, "num_layers": self.num_layers,
            "num_skips": self.num_skips, "dim": self.dim, "in_channels": self.in_channels, "base": self.base,
            "skip_fusion": self.fusion,
            "parameters": self.parameters, "skip_model_parameters": self.skip_model_parameters,
            "fraction": self.fraction, "dtypes": list(self.dtypes),
        }

    def lines(self) -> list[str]:
        """`skipdit info`-style lines."""
        share = f" ({100 * self.fraction:.2f}% of the Skip-Wan's {self.skip_model_parameters:,})" if self.fraction else ""
        first, last = self.pairs()[-1][0], self.pairs()[0][0]
        return [
            self.path,
            f"  kind        skip branches of a Skip-Wan ({FORMAT}): attach to its base model",
            f"  base        {self.num_layers} blocks, width {self.dim}"
            + (f", {self.in_channels} latent channels" if self.in_channels else "")
            + (f"; trained from {self.base}" if self.base else ""),
            f"  skips       {self.num_skips}: blocks {first}..{last} feed blocks {self.num_layers - 1 - first}.."
            f"{self.num_layers - 1 - last}, {self.fusion} fusion",
            f"  weights     {self.parameters:,} parameters{share}, {'/'.join(self.dtypes)}",
        ]


class BranchFileError(CheckpointError):
    """A skip-branches file that cannot be read, or does not fit the model it is put on (one line, names the file)."""


# --------------------------------------------------------------------------- writing


def _skip_wan_state_dict(source) -> tuple[dict, Optional[str], Optional[int], Optional[str]]:
    """(original-layout state dict, where it came from, in_channels, skip fusion) of a Skip-Wan model, state dict or
    file. A bare state dict does not say its fusion (None)."""
    if isinstance(source, nn.Module):
        if getattr(source, "family", None) != FAMILY:
            raise ValueError(f"skip branches are extracted from a Skip-Wan, not a {type(source).__name__}")
        return source.state_dict(), None, source.config.in_channels, source.config.skip_fusion
    if isinstance(source, (str, os.PathLike)):
        ckpt = inspect_checkpoint(source)
        if ckpt.family != FAMILY:
            raise BranchFileError(ckpt.path, f"a {ckpt.family} checkpoint: skip branches are extracted from a Skip-Wan")
        return ckpt.state_dict, ckpt.path, ckpt.config.in_channels, ckpt.skip_fusion  # None: the file does not say
    from .models import wan

    sd = dict(source)
    if wan.is_wan(sd):
        sd, _ = wan.to_original_layout(sd)
    patch = sd.get("patch_embedding.weight")
    return sd, None, None if patch is None else int(patch.shape[1]), None


def _num_layers(sd: dict) -> int:
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not blocks:
        raise ValueError("not a Wan state dict: no blocks.N.* keys")
    return 1 + max(blocks)


def save_branches(branches: dict, path: Union[str, os.PathLike], num_layers: int, dim: int, *,
                  in_channels: Optional[int] = None, base: Optional[str] = None,
                  skip_model_parameters: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                  fusion: str = "replace") -> BranchInfo:
    """Write branch tensors (exactly `branch_keys(S)` at `branch_shapes(S, dim)`) as a skip-branches file."""
    check_skip_fusion(fusion)
    num_skips = sum(1 for k in branches if re.fullmatch(r"skip_norms\.\d+\.weight", k))
    _check_tensors(str(path), branches, num_skips, dim)
    UStack(num_layers, num_skips)  # 2S <= L
    tensors = {k: (branches[k].to(dtype) if dtype else branches[k]).detach().cpu().contiguous().clone()
               for k in branch_keys(num_skips)}
    metadata = {META_FORMAT: FORMAT, META_FAMILY: FAMILY, META_LAYERS: str(num_layers), META_SKIPS: str(num_skips),
                META_DIM: str(dim), META_FUSION: fusion, "format": "pt"}
    if in_channels is not None:
        metadata[META_IN_CHANNELS] = str(in_channels)
    if base:
        metadata[META_BASE] = str(base)
    if skip_model_parameters:
        metadata[META_MODEL_PARAMETERS] = str(int(skip_model_parameters))
    write_safetensors(tensors, path, metadata)
    return _info(str(path), metadata, tensors)


def extract_branches(skip_model_or_state_dict, path: Union[str, os.PathLike], *, base: Optional[str] = None,
                     dtype: Optional[torch.dtype] = None, fusion: Optional[str] = None) -> BranchInfo:
    """Write the skip branches of a Skip-Wan (our `WanModel` with num_skips > 0, its state dict in any layout the
    loader reads, or a checkpoint file) to `path`; `base` names the model it was trained from. The fusion comes from
    the model's config or the file's metadata; a state dict, or a file without our metadata, needs `fusion` when it
    is not the paper's ("replace"). Returns its info."""
    sd, source, in_channels, own_fusion = _skip_wan_state_dict(skip_model_or_state_dict)
    if fusion is not None and own_fusion is not None and fusion != own_fusion:
        raise ValueError(f"fusion={fusion!r} given, but {source or 'the model'} has skip_fusion {own_fusion!r}")
    branches = {k: v for k, v in sd.items() if _BRANCH_KEY.fullmatch(k)}
    where = source or "the given model"
    if not branches:
        raise BranchFileError(where, "has no skip branches (skip_norms.* / skip_linears.*): not a Skip-Wan")
    if "skip_linears.0.linear.weight" not in branches:
        raise BranchFileError(where, "key skip_linears.0.linear.weight is missing: the skip branches are incomplete")
    dim = int(branches["skip_linears.0.linear.weight"].shape[0])
    total = sum(t.numel() for t in sd.values())
    return save_branches(branches, path, _num_layers(sd), dim, in_channels=in_channels, base=base,
                         skip_model_parameters=total, dtype=dtype, fusion=fusion or own_fusion or "replace")


# --------------------------------------------------------------------------- reading


def _int_field(path: str, metadata: dict, key: str, required: bool = True) -> Optional[int]:
    value = metadata.get(key)
    if value is None:
        if required:
            raise BranchFileError(path, f"metadata {key} is missing (not a complete {FORMAT} file)")
        return None
    try:
        return int(value)
    except ValueError:
        raise BranchFileError(path, f"metadata {key} must be an integer, the file has {value!r}") from None


def _check_tensors(path: str, sd: dict, num_skips: int, dim: int) -> None:
    expected = branch_shapes(num_skips, dim)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise BranchFileError(path, f"key {missing[0]} is missing ({len(missing)} of the {len(expected)} tensors of "
                                    f"{num_skips} branches missing)")
    unexpected = sorted(k for k in sd if k not in expected)
    if unexpected:
        raise BranchFileError(path, f"unexpected key {unexpected[0]} ({len(unexpected)} unexpected): a {FORMAT} file "
                                    f"with {num_skips} skips holds only skip_norms.0..{num_skips - 1} and "
                                    f"skip_linears.0..{num_skips - 1}")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise BranchFileError(path, f"shape mismatch at {key}: expected {shape} (width {dim}), the file has "
                                        f"{tuple(sd[key].shape)}")
        if not sd[key].is_floating_point():
            raise BranchFileError(path, f"{key} is {sd[key].dtype}, expected floating-point weights")


def _info(path: str, metadata: dict, sd: dict) -> BranchInfo:
    fusion = metadata.get(META_FUSION, "replace")
    try:
        check_skip_fusion(fusion)
    except ValueError as e:
        raise BranchFileError(path, f"metadata {META_FUSION}: {e}") from None
    return BranchInfo(
        fusion=fusion,
        path=path, num_layers=_int_field(path, metadata, META_LAYERS), num_skips=_int_field(path, metadata, META_SKIPS),
        dim=_int_field(path, metadata, META_DIM), in_channels=_int_field(path, metadata, META_IN_CHANNELS, False),
        base=metadata.get(META_BASE), skip_model_parameters=_int_field(path, metadata, META_MODEL_PARAMETERS, False),
        dtypes=tuple(sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})),
    )


def is_branches_file(path: Union[str, os.PathLike]) -> bool:
    """True when `path` is a .safetensors file whose metadata names the skip-branches format (header read only)."""
    header = safetensors_header(path)
    return header is not None and (header.get("__metadata__") or {}).get(META_FORMAT) == FORMAT


def load_branches(path: Union[str, os.PathLike], num_layers: Optional[int] = None, dim: Optional[int] = None,
                  in_channels: Optional[int] = None) -> tuple[dict, BranchInfo]:
    """Read a skip-branches file -> (state dict of the branch tensors, BranchInfo).

    The tensors must be exactly those of the metadata's S branches at width D. With `num_layers` / `dim` /
    `in_channels` (the base model's), a file made for another base is refused. Every problem is one
    `BranchFileError` line naming the file, and the key or field with the expected and found values."""
    path = str(path)
    if not os.path.isfile(path):
        raise BranchFileError(path, "no such file")
    if os.path.getsize(path) < 16:
        raise BranchFileError(path, f"not a {FORMAT} file: it has only {os.path.getsize(path)} bytes")
    if _sniff(path) != "safetensors":
        raise BranchFileError(path, f"not a skip-branches file: not a .safetensors file (make one with `skipdit "
                                    "extract-branches SKIP_WAN -o FILE`)")
    try:
        sd, metadata = _read_safetensors(path)
    except BranchFileError:
        raise
    except CheckpointError as e:
        raise BranchFileError(path, e.problem) from None
    found = metadata.get(META_FORMAT)
    if found != FORMAT:
        what = f"its metadata {META_FORMAT} is {found!r}" if found else f"no {META_FORMAT} in its metadata"
        raise BranchFileError(path, f"not a skip-branches file ({what}, expected {FORMAT!r}; make one with "
                                    "`skipdit extract-branches SKIP_WAN -o FILE`)")
    if metadata.get(META_FAMILY, FAMILY) != FAMILY:
        raise BranchFileError(path, f"branches of a {metadata[META_FAMILY]!r} model, expected {FAMILY!r}")
    info = _info(path, metadata, sd)
    if info.num_skips < 1:
        raise BranchFileError(path, f"metadata {META_SKIPS} is {info.num_skips}: expected at least one skip")
    if 2 * info.num_skips > info.num_layers:
        raise BranchFileError(path, f"{info.num_skips} skips do not fit {info.num_layers} blocks (at most "
                                    f"{info.num_layers // 2})")
    _check_tensors(path, sd, info.num_skips, info.dim)
    check_base(info, num_layers, dim, in_channels)
    return sd, info


def check_base(info: BranchInfo, num_layers: Optional[int] = None, dim: Optional[int] = None,
               in_channels: Optional[int] = None, what: str = "the base model") -> None:
    """Refuse (one line) a base whose blocks, width or latent channels differ from those the branches were made for."""
    for want, have, made, has in (
        (info.num_layers, num_layers, f"of {info.num_layers} blocks", f"{num_layers} blocks"),
        (info.dim, dim, f"of width {info.dim}", f"width {dim}"),
        (info.in_channels, in_channels, f"with {info.in_channels} latent channels", f"{in_channels} latent channels"),
    ):
        if want is not None and have is not None and int(want) != int(have):
            raise BranchFileError(info.path, f"made for a Wan {made}, but {what} has {has}")


# --------------------------------------------------------------------------- attaching


def attach_branches(base_wan_model: nn.Module, path: Union[str, os.PathLike]):
    """Our `WanModel` with num_skips S: the base's config and tensors (shared, not copied) plus the file's branches
    (cast to the base's dtype and device). Equal to the full Skip-Wan the branches were extracted from."""
    from .models.wan import WanModel

    if not isinstance(base_wan_model, WanModel):
        raise ValueError(f"skip branches attach to a Wan (skipdit_core WanModel), not a {type(base_wan_model).__name__}")
    c = base_wan_model.config
    if c.num_skips:
        raise BranchFileError(str(path), f"the base model already has {c.num_skips} long skips (a Skip-Wan): attach "
                                         "branches to the released model they were trained from")
    branches, info = load_branches(path, num_layers=c.num_layers, dim=c.dim, in_channels=c.in_channels)
    ref = base_wan_model.patch_embedding.weight
    with torch.device("meta"):
        model = WanModel(replace(c, num_skips=info.num_skips, skip_fusion=info.fusion))
    sd = dict(base_wan_model.state_dict())
    sd.update({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in branches.items()})
    # The base's own keys are those of this config by construction; the branches were checked against it.
    model.load_state_dict(sd, strict=True, assign=True)  # the tensors themselves, not copies
    return model.train(base_wan_model.training)
