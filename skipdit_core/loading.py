"""Load the checkpoints people download, as they are.

`load_model(path)` reads a `.safetensors` file or a PyTorch checkpoint (`.pt/.pth/.bin/.ckpt`,
through `torch.load(weights_only=True)` only: a pickle that needs code execution is refused),
unwraps training containers (`ema` first, then `model`, `module`, `state_dict`) and `module.`
prefixes, maps the diffusers Hunyuan-DiT layout onto the Tencent one and the diffusers / ComfyUI-prefixed
Wan layouts onto Wan-AI's (refusing Wan variants with image, video or audio inputs), detects the family and
its config from the keys and shapes, sets aside the family's named optional keys (e.g. Latte
T2V's `caption_projection.y_embedding`; `models.Family.optional_keys`) and loads the rest strictly.

Every failure is a `CheckpointError` that names the file and says what is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from . import models
from .models import hunyuan, wan

CONTAINER_KEYS = ("ema", "model", "module", "state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")
META_FAMILY = "skipdit.family"
META_CONFIG = "skipdit.config"
MAX_LISTED = 5  # keys named in an error, per kind
# Weight dtypes by the names the commands and configs use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class Checkpoint:
    """A state dict as read from a file, with what was found about it."""

    path: str
    state_dict: dict
    family: str
    config: object
    container: Optional[str] = None  # e.g. "ema" when the weights came from checkpoint["ema"]
    layout: str = "original"  # or "diffusers" (mapped on read)
    set_aside: dict = field(default_factory=dict)  # the family's optional keys found in the file (unused)
    # The fusion of its long skips when the file's metadata (or the caller) says it, None when only the weights were
    # read: the keys are the same for both fusions (ustack.SKIP_FUSIONS).
    skip_fusion: Optional[str] = None

    def describe(self) -> dict:
        n_params = sum(t.numel() for t in self.state_dict.values())
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in self.state_dict.values()})
        cfg = self.config
        num_skips = getattr(cfg, "num_skips", 0)
        return {
            "file": self.path,
            "family": self.family,
            "description": models.FAMILIES[self.family].description,
            "variant": "skip" if num_skips else "vanilla",
            "long_skips": num_skips,
            "skip_fusion": getattr(cfg, "skip_fusion", "replace") if num_skips else None,
            "weights_from": self.container or "top level",
            "layout": self.layout,
            "parameters": n_params,
            "dtypes": dtypes,
            "config": asdict(cfg),
            "set_aside": {
                k: {"shape": list(t.shape), "use": models.FAMILIES[self.family].optional_keys[k][0]}
                for k, t in self.set_aside.items()
            },
        }


# --------------------------------------------------------------------------- reading files


def _sniff(path: str) -> str:
    """'safetensors', 'zip' (torch >= 1.6), 'pickle' (legacy torch) or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def safetensors_header(path: str | os.PathLike) -> Optional[dict]:
    """The JSON header of a .safetensors file (its tensor entries and "__metadata__"), read without the tensors; None
    when the file cannot be read as one (missing, too short, another format, a header over 100 MB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _read_safetensors(path: str) -> tuple[dict, dict]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise CheckpointError(path, f"truncated: the safetensors header says {header_len} bytes, the file has {size - 8}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(path, "not a valid safetensors file: its header is not JSON") from None
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_len > size:
        raise CheckpointError(
            path, f"truncated: tensors need {8 + header_len + data_len} bytes, the file has {size} (incomplete download?)"
        )
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except SafetensorError as e:
        raise CheckpointError(path, f"not a valid safetensors file ({e})") from None


def _read_torch(path: str, kind: str) -> object:
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointError(path, "truncated or corrupt PyTorch checkpoint: the zip archive has no end record (incomplete download?)")
    try:
        # argparse.Namespace (the `args` entry of DiT-style training checkpoints) only sets attributes.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            culprit = _unsafe_global(msg)
            raise CheckpointError(
                path,
                "refused: this pickle needs code execution to load"
                + (f" (it references {culprit})" if culprit else "")
                + ". Only checkpoints of tensors and plain containers are read (torch.load weights_only=True), "
                "because unpickling arbitrary code can run anything on your machine. If you trust the file, "
                "re-save its state dict as .safetensors in a separate environment.",
            ) from None
        raise CheckpointError(path, f"not a PyTorch checkpoint ({msg.splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(path, f"truncated or corrupt PyTorch checkpoint ({first})") from None


def _unsafe_global(message: str) -> Optional[str]:
    for line in message.splitlines():
        for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
            if marker in line:
                return line.split(marker, 1)[1].split()[0].rstrip(".,")
    return None


def resolve_checkpoint_path(path: str | os.PathLike) -> str:
    """The file meant by a path people type for a `training/` run: a run folder or its `checkpoints/`
    (its latest checkpoint's EMA weights), a step folder (its `ema.safetensors`), or a path through
    `checkpoints/latest`, which is a small text file naming the newest step folder (replaced atomically
    by training). Any other path is returned as it is."""
    path = str(path)
    parts = os.path.normpath(path).split(os.sep)
    if "latest" in parts[:-1] or (parts[-1] == "latest" and os.path.isfile(path) and os.path.getsize(path) < 256):
        i = parts.index("latest") if "latest" in parts[:-1] else len(parts) - 1
        pointer = os.sep.join(parts[: i + 1]) or os.sep
        if os.path.isfile(pointer) and os.path.getsize(pointer) < 256:
            with open(pointer) as f:
                step = f.read().strip()
            path = os.path.join(os.path.dirname(pointer), step, *parts[i + 1:])
    if os.path.isdir(path):
        for candidate in (os.path.join(path, "checkpoints", "latest"), os.path.join(path, "latest")):
            if os.path.isfile(candidate):
                return resolve_checkpoint_path(candidate)
        if os.path.isfile(os.path.join(path, "ema.safetensors")):
            return os.path.join(path, "ema.safetensors")
    return path


def read_state_dict(path: str | os.PathLike) -> tuple[dict, dict, Optional[str]]:
    """Read a checkpoint file (or a training run path, `resolve_checkpoint_path`) -> (state dict of
    tensors, safetensors metadata, container key)."""
    path = resolve_checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    if os.path.getsize(path) < 16:
        raise CheckpointError(path, f"not a checkpoint: the file has only {os.path.getsize(path)} bytes")
    kind = _sniff(path)
    if kind == "safetensors":
        sd, metadata = _read_safetensors(path)
        sd, container = unwrap(sd, path)
        return sd, metadata, container
    if kind == "unknown":
        raise CheckpointError(
            path, "not a checkpoint: expected a .safetensors file or a PyTorch checkpoint (.pt/.pth/.bin/.ckpt)"
        )
    obj = _read_torch(path, kind)
    sd, container = unwrap(obj, path)
    return sd, {}, container


def unwrap(obj: object, path: str) -> tuple[dict, Optional[str]]:
    """Find the state dict in a training container and strip wrapper prefixes."""
    container = []
    while isinstance(obj, dict) and not _is_state_dict(obj):
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            found = ", ".join(map(str, list(obj)[:8]))
            raise CheckpointError(path, f"no model weights found: a dict with keys [{found}] and none of {list(CONTAINER_KEYS)}")
        container.append(key)
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, f"no model weights found: the file holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, ".".join(container) or None


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


# --------------------------------------------------------------------------- detection and loading


def inspect_checkpoint(
    path: str | os.PathLike, family: Optional[str] = None, overrides: Optional[dict] = None
) -> Checkpoint:
    """Read a checkpoint and detect its family and config (without building the model)."""
    path = resolve_checkpoint_path(path)
    sd, metadata, container = read_state_dict(path)
    sd, layout = _original_layout(sd, path)
    family = family or metadata.get(META_FAMILY) or models.identify_family(sd)
    if family is None:
        sample = ", ".join(sorted(sd)[:MAX_LISTED])
        raise CheckpointError(
            path, f"not a Skip-DiT-capable model: no DiT, Latte, Latte T2V, Hunyuan-DiT or Wan keys found (first keys: {sample})"
        )
    if family not in models.FAMILIES:
        raise CheckpointError(path, f"unknown family {family!r}; known: {', '.join(models.FAMILIES)}")
    from_metadata = META_CONFIG in metadata and metadata.get(META_FAMILY) == family
    try:
        if from_metadata:
            base = models.FAMILIES[family].config_cls(**json.loads(metadata[META_CONFIG]))
            config = models.make_config(family, overrides, base=base)
        else:
            config = models.config_from_weights(family, sd, overrides)
    except KeyError as e:
        raise CheckpointError(path, f"does not look like a {family} checkpoint: key {e} is missing") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"cannot derive a {family} config: {e}") from None
    sd, set_aside = _set_aside_optional(sd, family, config, path)
    fusion_known = from_metadata or "skip_fusion" in (overrides or {})  # metadata older than the field: the paper's
    fusion = getattr(config, "skip_fusion", None) if fusion_known else None
    return Checkpoint(path, sd, family, config, container, layout, set_aside, fusion)


def _original_layout(sd: dict, path: str) -> tuple[dict, str]:
    """The state dict in the layout our models name (diffusers' and ComfyUI's mapped) and that layout's name."""
    if hunyuan.is_diffusers_layout(sd):
        return hunyuan.from_diffusers_state_dict(sd), "diffusers"
    if wan.is_wan(sd):
        try:
            return wan.to_original_layout(sd)
        except wan.UnsupportedWan as e:
            raise CheckpointError(path, str(e)) from None
    return sd, "original"


def _set_aside_optional(sd: dict, family: str, config, path: str) -> tuple[dict, dict]:
    """Split off the family's optional keys (each named, at its expected shape); every other key
    stays, so the strict load still refuses anything unexpected."""
    optional = models.FAMILIES[family].optional_keys
    found = {k: sd[k] for k in optional if k in sd}
    for key, tensor in found.items():
        expected = optional[key][1](config)
        shape = tuple(tensor.shape)
        if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
            want = "(" + ", ".join("any" if e is None else str(e) for e in expected) + ")"
            raise CheckpointError(path, f"shape mismatch at {key}: expected {want}, the file has {shape}")
    return {k: v for k, v in sd.items() if k not in found}, found


def load_model(
    path: str | os.PathLike,
    family: Optional[str] = None,
    overrides: Optional[dict] = None,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
):
    """Build the detected model and load the file's weights into it (strict).

    family / overrides replace what detection would decide (e.g. {"num_heads": 12}).
    Returns (model in eval mode, Checkpoint).
    """
    ckpt = inspect_checkpoint(path, family, overrides)
    model = models.build_model(ckpt.family, ckpt.config)
    load_weights(model, ckpt.state_dict, ckpt.path)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), ckpt


def load_weights(model: torch.nn.Module, sd: dict, path: str) -> None:
    """Strictly load `sd` into `model`, with errors that name keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            path,
            f"keys do not match a {type(model).__name__} ({_describe_config(model)}): "
            f"{len(missing)} missing{_few(missing)}, {len(unexpected)} unexpected{_few(unexpected)}. "
            "Is this a checkpoint of another architecture or size?",
        )
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(
                path, f"shape mismatch at {k}: the model expects {tuple(t.shape)}, the file has {tuple(sd[k].shape)}"
            )
    model.load_state_dict(sd, strict=True)


def _few(keys: list) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:MAX_LISTED])
    return f" [{shown}{', ...' if len(keys) > MAX_LISTED else ''}]"


def _describe_config(model) -> str:
    cfg = getattr(model, "config", None)
    return ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()) if cfg is not None else ""


# --------------------------------------------------------------------------- conversion


def save_safetensors(state_dict: dict, dst: str | os.PathLike, family: str, config, dtype: Optional[torch.dtype] = None) -> None:
    """Write model weights as .safetensors with the family and config in the metadata, atomically
    (a crash mid-write never leaves a half-written file under the final name)."""
    tensors = {
        k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().clone()
        for k, v in state_dict.items()
    }
    metadata = {META_FAMILY: family, META_CONFIG: json.dumps(asdict(config)), "format": "pt"}
    write_safetensors(tensors, dst, metadata)


def write_safetensors(tensors: dict, dst: str | os.PathLike, metadata: dict) -> None:
    """Write `tensors` as .safetensors at `dst` (folders made), atomically and with the user's usual permissions."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the writer creates 0600; give the file the user's usual permissions
    os.replace(tmp, dst)


def convert_to_safetensors(
    src: str | os.PathLike, dst: str | os.PathLike, dtype: Optional[torch.dtype] = None, **detect
) -> Checkpoint:
    """Write the checkpoint's model weights to `dst` as .safetensors, recording the detected
    family and config in the file's metadata (so loading it needs no detection)."""
    ckpt = inspect_checkpoint(src, **detect)
    save_safetensors({**ckpt.state_dict, **ckpt.set_aside}, dst, ckpt.family, ckpt.config, dtype)
    return ckpt
