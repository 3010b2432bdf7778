"""Fixed "prompt" embeddings of the moving-shapes classes, for the text-conditioned models trained on them.

A text-conditioned model (Latte T2V, Wan) trained on `training.data.MovingShapes(text_len=L, text_dim=D)` sees, for
class c, one FIXED tensor of shape (L, D) in place of a text encoder's states: unit-scale Gaussian noise drawn from
a torch generator seeded by `seeded_generator("caption", seed, c)` (sha256 of that tuple's repr), where `seed` is the
data's seed. It carries exactly the class, and nothing needs a text encoder. Sampling must give the model the same
tensor, so it is defined here, where every consumer (training, `skipdit` commands, benchmarks, ComfyUI tests) can
regenerate it:

    class_prompt_embeds(label, text_len, text_dim, seed)    (L, D) float32, the embedding of one class
    class_text(label, text_len, text_dim, seed)             {"prompt_embeds": (1, L, D), "prompt_attention_mask"}:
                                                            `pipeline.Request.text` for that class

Training also writes the table it used beside each checkpoint (`training.train`): `class-embeds.safetensors`
(`class_embeds` (C, L, D) float32; metadata: classes, captions, seed) and one text-embedding file per class,
`text-<class>.safetensors`, in the names `skipdit sample --text-embeddings` reads (prompt_embeds (1, L, D),
prompt_attention_mask (1, L)). `load_class_text(path, label)` reads a class from either file.

The unconditional half of guidance is all-zero states (the pipeline's default negative; ComfyUI's
ConditioningZeroOut), which is what `train.text_dropout` trains it on.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import torch

from .demo import SHAPE_CLASSES  # label i of the moving-shapes data

CLASS_EMBEDS_FILE = "class-embeds.safetensors"


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints and tags: sha256 of its repr (not Python's per-process `hash`),
    so nearby seeds give unrelated streams, identically in every process."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def class_prompt_embeds(label: int, text_len: int, text_dim: int, seed: int = 0) -> torch.Tensor:
    """The fixed embedding of class `label`: (text_len, text_dim) float32 ~ N(0, 1), seeded by (seed, label)."""
    if text_len < 1 or text_dim < 1:
        raise ValueError(f"text_len and text_dim must be >= 1, got {text_len}, {text_dim}")
    return torch.randn(int(text_len), int(text_dim), generator=seeded_generator("caption", int(seed), int(label)))


def class_prompt_table(num_classes: int, text_len: int, text_dim: int, seed: int = 0) -> torch.Tensor:
    """(num_classes, text_len, text_dim): every class's embedding."""
    return torch.stack([class_prompt_embeds(c, text_len, text_dim, seed) for c in range(num_classes)])


def caption(label: int, video: bool = True) -> str:
    """The caption a class's embedding stands for, e.g. "a circle moving"."""
    return f"a {SHAPE_CLASSES[label]} moving" if video else f"a {SHAPE_CLASSES[label]}"


def _as_text(embeds: torch.Tensor) -> dict:
    """(L, D) -> a text-embedding dict in diffusers' pipeline names, batch of one, every token real."""
    return {"prompt_embeds": embeds[None].float().contiguous(),
            "prompt_attention_mask": torch.ones(1, embeds.shape[0], dtype=torch.int64)}


def class_text(label: int, text_len: int, text_dim: int, seed: int = 0) -> dict:
    """`pipeline.Request.text` of class `label`: prompt_embeds (1, L, D) and prompt_attention_mask (1, L) of ones."""
    return _as_text(class_prompt_embeds(label, text_len, text_dim, seed))


def save_class_embeds(folder: str, table: torch.Tensor, seed: int, classes: Optional[Sequence[str]] = None,
                      video: bool = True) -> list[str]:
    """Write `table` (C, L, D) into `folder`: class-embeds.safetensors and text-<class>.safetensors per class.
    Returns the paths written."""
    from .loading import write_safetensors  # atomic, with the user's usual permissions

    classes = list(classes or SHAPE_CLASSES[:table.shape[0]])
    if len(classes) != table.shape[0]:
        raise ValueError(f"{len(classes)} class names for {table.shape[0]} embeddings")
    os.makedirs(folder, exist_ok=True)
    meta = {"classes": json.dumps(classes), "captions": json.dumps([caption(c, video) for c in range(len(classes))]),
            "seed": str(int(seed)), "generator": "skipdit_core.shape_prompts.class_prompt_embeds"}
    paths = [os.path.join(folder, CLASS_EMBEDS_FILE)]
    write_safetensors({"class_embeds": table.float().contiguous()}, paths[0], meta)
    for c, name in enumerate(classes):
        paths.append(os.path.join(folder, f"text-{name}.safetensors"))
        write_safetensors(_as_text(table[c]), paths[-1], {"class": name, "label": str(c), "caption": caption(c, video)})
    return paths


def load_class_embeds(path: str) -> tuple[torch.Tensor, dict]:
    """(table (C, L, D), {"classes", "captions", "seed"}) from a class-embeds.safetensors file (or its folder)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, CLASS_EMBEDS_FILE)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        table = f.get_tensor("class_embeds")
    info = {"classes": json.loads(meta.get("classes", "[]")), "captions": json.loads(meta.get("captions", "[]")),
            "seed": int(meta["seed"]) if "seed" in meta else None}
    return table, info


def load_class_text(path: str, label: int | str) -> dict:
    """`pipeline.Request.text` of one class from a class-embeds.safetensors file or the folder holding it (a
    checkpoint folder); `label` an index or a class name."""
    table, info = load_class_embeds(path)
    if isinstance(label, str) and not label.isdigit():
        if label not in info["classes"]:
            raise ValueError(f"unknown class {label!r}; {path} has {', '.join(info['classes'])}")
        label = info["classes"].index(label)
    label = int(label)
    if not 0 <= label < table.shape[0]:
        raise ValueError(f"class {label} out of range: {path} has 0..{table.shape[0] - 1}")
    return _as_text(table[label])


def find_class_embeds(checkpoint: str) -> Optional[str]:
    """The class-embeds.safetensors beside a checkpoint file (or in a checkpoint folder), if there is one."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    path = os.path.join(folder, CLASS_EMBEDS_FILE)
    return path if os.path.isfile(path) else None


__all__ = ["SHAPE_CLASSES", "CLASS_EMBEDS_FILE", "seeded_generator", "class_prompt_embeds", "class_prompt_table",
           "caption", "class_text", "save_class_embeds", "load_class_embeds", "load_class_text", "find_class_embeds"]
