"""Captions -> text-encoder states: the `.safetensors` that `skipdit sample --text-embeddings` reads and the
per-video sidecars of training's `video_folder` (`skipdit encode-text`). Needs `transformers` (the `text` extra).

| family    | encoder (its option)                     | keys                                      | tokens |
|-----------|------------------------------------------|-------------------------------------------|--------|
| latte_t2v | T5 v1.1 XXL, 4096 (--text-encoder)        | prompt_embeds, prompt_attention_mask      | 120    |
| hunyuan   | CLIP-like BERT, 1024 (--text-encoder)     | prompt_embeds, prompt_attention_mask      | 77     |
|           | mT5-XL, 2048 (--text-encoder-2)           | prompt_embeds_2, prompt_attention_mask_2  | 256    |
| wan       | umT5-XXL, 4096 (--text-encoder)           | prompt_embeds, prompt_attention_mask      | 512    |

A caption is tokenised as diffusers' LattePipeline / HunyuanDiTPipeline do (padded to the max length,
truncated, special tokens added) and encoded with its attention mask; the states are the encoder's last hidden
state. Stored: states float32 (B, L, D), masks int64 (B, L), 1 = token, 0 = padding, whatever dtype the
encoder ran in. Latte T2V captions are lowercased and stripped first, as its pipeline does (its optional
bs4 / ftfy caption cleaning is not done). Wan captions are cleaned as diffusers' WanPipeline `prompt_clean` does
(ftfy's fix_text when ftfy is installed, HTML entities unescaped twice, runs of whitespace made one space), and the
states of the padding tokens are zeros, as its `_get_t5_prompt_embeds` gives them (it keeps the first
mask-sum states and pads with zeros); the mask is stored as well, which the Wan model does not take.

The unconditional half of guidance, `negative_*`: the encoding of the negative prompt ("" by default, as both
pipelines). Latte T2V's pipeline (mask_feature=True) cuts the prompt's and the negative's states to the
prompt's token count and passes no mask; the same here is the prompt's mask on the negative's states
(negative_prompt_attention_mask = prompt_attention_mask), which the model's cross-attention masking makes
equal. Hunyuan-DiT's negative keeps its own masks, as its pipeline passes them.

An encoder folder is a transformers folder (config.json, weights, tokenizer files: tokenizer.json preferred;
spiece.model alone needs sentencepiece and protobuf, in the `text` extra) or a diffusers pipeline folder with
text_encoder/ + tokenizer/ (and text_encoder_2/ + tokenizer_2/ for Hunyuan-DiT); a *text_encoder* folder without
tokenizer files takes the tokenizer folder beside it (tokenizer_2/ for text_encoder_2/; Hunyuan-DiT's own layout,
t2i/clip_text_encoder/ + t2i/tokenizer/ and t2i/mt5/, works too). Only local files are read.

    encoders = load_text_encoders("latte_t2v", ["t5-v1_1-xxl"], device="cuda", dtype=torch.bfloat16)
    tensors = encode_captions(["a cat on the beach"], "latte_t2v", encoders)  # prompt_embeds (1, 120, 4096), ...
"""
from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .loading import write_safetensors

# The videos --caption-dir writes sidecars for; training/data.py's VideoFolder reads the same ones.
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt")
# config.json model_type of each encoder kind: T5EncoderModel / MT5EncoderModel, UMT5EncoderModel (Wan's umT5, another
# architecture: a relative position bias per layer); any other type is a BERT-like AutoModel ("bert" kind).
ENCODER_TYPES = {"t5": ("t5", "mt5"), "umt5": ("umt5",)}
T5_TYPES = ENCODER_TYPES["t5"] + ENCODER_TYPES["umt5"]
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class TextEncodingError(ValueError):
    """Bad input to the text encoding (`skipdit` prints it as one line)."""


@dataclass(frozen=True)
class Slot:
    """One text encoder of a family and where its output goes."""

    states_key: str
    mask_key: str
    kind: str  # "t5" (T5EncoderModel / MT5EncoderModel), "umt5" (UMT5EncoderModel) or "bert" (a BERT-like AutoModel)
    max_length: int
    name: str
    option: str  # the `skipdit encode-text` option that gives its folder
    subfolder: str  # its folder inside a diffusers pipeline folder
    zero_padding: bool = False  # the states of padding tokens are zeros (Wan's pipeline), else the encoder's output

    @property
    def described(self) -> str:
        return {"t5": "a T5 model", "umt5": "a umT5 model"}.get(self.kind, "not a T5 model")

    @property
    def tokenizer_subfolder(self) -> str:
        return self.subfolder.replace("text_encoder", "tokenizer")


TEXT_FAMILIES: dict[str, tuple[Slot, ...]] = {
    "latte_t2v": (
        Slot("prompt_embeds", "prompt_attention_mask", "t5", 120, "T5 encoder (t5-v1_1-xxl)", "--text-encoder", "text_encoder"),
    ),
    "hunyuan": (
        Slot("prompt_embeds", "prompt_attention_mask", "bert", 77, "CLIP-like BERT encoder", "--text-encoder", "text_encoder"),
        Slot("prompt_embeds_2", "prompt_attention_mask_2", "t5", 256, "mT5 encoder", "--text-encoder-2", "text_encoder_2"),
    ),
    # Wan 2.1 / 2.2: umT5-XXL, 512 tokens (WanPipeline's max_sequence_length), padding states zeroed as it does
    "wan": (
        Slot("prompt_embeds", "prompt_attention_mask", "umt5", 512, "umT5-XXL encoder", "--text-encoder", "text_encoder",
             zero_padding=True),
    ),
}
# The families whose text training/ trains on (`--caption-dir` writes their video_folder sidecars).
TRAINED_FAMILIES = ("latte_t2v", "wan")


def text_slots(family: str) -> tuple[Slot, ...]:
    if family not in TEXT_FAMILIES:
        raise TextEncodingError(f"family {family!r} has no text conditioning; text families: "
                                + ", ".join(f"{f} ({' + '.join(s.name for s in slots)})" for f, slots in TEXT_FAMILIES.items()))
    return TEXT_FAMILIES[family]


def _wan_prompt_clean(text: str) -> str:
    """diffusers' WanPipeline `prompt_clean`: ftfy.fix_text when ftfy is installed (as the pipeline checks), HTML
    entities unescaped twice, whitespace runs collapsed to one space, stripped."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def prepare_caption(family: str, caption: str) -> str:
    """The text the tokenizer sees: Latte T2V's pipeline lowercases and strips (without its optional cleaning),
    Wan's cleans as its `prompt_clean`."""
    if family == "latte_t2v":
        return caption.lower().strip()
    return _wan_prompt_clean(caption) if family == "wan" else caption.strip()


# ----------------------------------------------------------------------------- loading


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def _folders(folder: str, slot: Slot) -> tuple[str, str]:
    """(model folder, tokenizer folder) of `folder`: a transformers folder, or a diffusers pipeline folder."""
    if not os.path.isdir(folder):
        raise TextEncodingError(f"{slot.option} {folder!r} does not exist or is not a folder")
    in_pipeline = os.path.join(folder, slot.subfolder)
    if os.path.isfile(os.path.join(in_pipeline, "config.json")):
        model_dir, tokenizer_dirs = in_pipeline, [os.path.join(folder, slot.tokenizer_subfolder)]
    elif os.path.isfile(os.path.join(folder, "config.json")):
        # its own tokenizer files, else, for a *text_encoder* folder, those of the tokenizer folder beside it:
        # a pipeline's text_encoder_2/ -> tokenizer_2/, Hunyuan-DiT's own t2i/clip_text_encoder/ -> t2i/tokenizer/
        model_dir, tokenizer_dirs = folder, [folder]
        name, parent = os.path.basename(os.path.normpath(folder)), os.path.dirname(os.path.abspath(folder))
        if "text_encoder" in name:
            for sibling in (name.replace("text_encoder", "tokenizer"), slot.tokenizer_subfolder):
                if os.path.join(parent, sibling) not in tokenizer_dirs:
                    tokenizer_dirs.append(os.path.join(parent, sibling))
    else:
        raise TextEncodingError(f"{slot.option} {folder!r} has no config.json: expected a transformers {slot.name} folder "
                                f"(config.json, weights, tokenizer) or a diffusers pipeline folder with {slot.subfolder}/config.json")
    for tokenizer_dir in tokenizer_dirs:
        if _has_tokenizer(tokenizer_dir):
            return model_dir, tokenizer_dir
    raise TextEncodingError(f"no tokenizer for {model_dir!r}: expected one of {', '.join(TOKENIZER_FILES)} in "
                            + " or ".join(repr(d) for d in tokenizer_dirs))


def _model_type(model_dir: str) -> str:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return str(json.load(f).get("model_type", ""))
    except (OSError, ValueError) as e:
        raise TextEncodingError(f"{path!r} is not a readable JSON config: {e}") from e


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 names it `dtype` (5.x warns on the old `torch_dtype`)."""
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    return {"dtype": dtype} if version >= (4, 56) else {"torch_dtype": dtype}


@dataclass
class TextEncoder:
    """A loaded tokenizer + encoder for one slot; call it on texts."""

    slot: Slot
    folder: str
    tokenizer: Any
    model: Any = field(repr=False)

    @torch.no_grad()
    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (states (B, max_length, D) float32, mask (B, max_length) int64), on the CPU."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        mask = tokens.attention_mask.to(device)
        states = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask)[0]
        if not torch.isfinite(states).all():
            raise TextEncodingError(f"the {self.slot.name} in {self.folder!r} gave inf / NaN states in {states.dtype} "
                                    "(T5 overflows in fp16): use --dtype bf16 or fp32")
        if self.slot.zero_padding:  # Wan's pipeline: the first mask-sum states, then zeros (padding is on the right)
            states = torch.where(mask[..., None].bool(), states, torch.zeros((), dtype=states.dtype, device=device))
        return states.float().cpu(), mask.to(torch.int64).cpu()


def _checked_folders(folder: str, slot: Slot) -> tuple[str, str, str]:
    """(model folder, tokenizer folder, model type), refused before anything loads when it is not the slot's."""
    model_dir, tokenizer_dir = _folders(folder, slot)
    model_type = _model_type(model_dir)
    expected = ENCODER_TYPES.get(slot.kind)
    if (model_type not in expected) if expected else (model_type in T5_TYPES):
        raise TextEncodingError(f"{slot.option} {folder!r}: {model_dir}/config.json is a {model_type or 'untyped'!r} model, "
                                f"expected the {slot.name} ({slot.described})")
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(model_dir)):
        raise TextEncodingError(f"{slot.option} {folder!r}: {model_dir!r} has a config.json but no weights "
                                "(*.safetensors or pytorch_model*.bin, with their index when sharded)")
    return model_dir, tokenizer_dir, model_type


def load_text_encoder(folder: str, slot: Slot, device="cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    model_dir, tokenizer_dir, model_type = _checked_folders(folder, slot)
    try:
        from transformers import AutoModel, AutoTokenizer, MT5EncoderModel, T5EncoderModel, UMT5EncoderModel
    except ImportError as e:
        raise TextEncodingError("encoding text needs transformers: pip install 'comfyui-skipdit[text]'") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the tokenizer's loading, said with its folder
        hint = ("; a tokenizer with only spiece.model needs sentencepiece and protobuf (pip install 'comfyui-skipdit[text]')"
                if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")) else "")
        raise TextEncodingError(f"could not load the tokenizer in {tokenizer_dir!r}: {e}{hint}") from e
    if tokenizer.pad_token is None:
        raise TextEncodingError(f"the tokenizer in {tokenizer_dir!r} has no padding token: states are padded to a fixed length")
    cls = {"t5": MT5EncoderModel if model_type == "mt5" else T5EncoderModel, "umt5": UMT5EncoderModel}.get(slot.kind, AutoModel)
    try:
        model = cls.from_pretrained(model_dir, local_files_only=True, **_dtype_kwarg(dtype))
    except (OSError, ValueError) as e:
        raise TextEncodingError(f"could not load the {slot.name} in {model_dir!r}: {e}") from e
    return TextEncoder(slot, model_dir, tokenizer, model.to(device).eval())


def load_text_encoders(family: str, folders: Sequence[Optional[str]], device="cpu",
                       dtype: torch.dtype = torch.float32) -> list[TextEncoder]:
    """The family's encoders from `folders` (one per slot; None for the second takes text_encoder_2/ of a
    pipeline folder given first). Every folder is checked before any encoder loads."""
    slots = text_slots(family)
    given = [f for f in folders if f is not None]
    if len(given) > len(slots) or not folders or folders[0] is None:
        raise TextEncodingError(f"{family} takes {' + '.join(f'{s.option} ({s.name})' for s in slots)}; "
                                f"got {len(given)} folder(s) {given}")
    folders = list(folders) + [None] * (len(slots) - len(folders))
    for i, (slot, folder) in enumerate(zip(slots, folders)):
        if folder is None:
            if not os.path.isfile(os.path.join(folders[0], slot.subfolder, "config.json")):
                raise TextEncodingError(f"{family} needs a second text encoder, the {slot.name}: give {slot.option} DIR, or as "
                                        f"{slots[0].option} a diffusers pipeline folder with {slot.subfolder}/ "
                                        f"({folders[0]!r} has no {slot.subfolder}/config.json)")
            folders[i] = folders[0]
        _checked_folders(folders[i], slot)
    return [load_text_encoder(folder, slot, device, dtype) for slot, folder in zip(slots, folders)]


EncodersArg = Union[Sequence[TextEncoder], Sequence[Optional[str]], str]


def _loaded(family: str, encoders: EncodersArg, device, dtype) -> list[TextEncoder]:
    """Loaded encoders, or `encoders` as folder(s) loaded on `device` in `dtype`."""
    if isinstance(encoders, str):
        encoders = [encoders]
    if not encoders or not isinstance(encoders[0], TextEncoder):
        return load_text_encoders(family, list(encoders), device, dtype)
    slots = text_slots(family)
    if tuple(e.slot for e in encoders) != slots:
        raise TextEncodingError(f"{family} takes {len(slots)} encoder(s) ({', '.join(s.name for s in slots)}), got "
                                + ", ".join(e.slot.name for e in encoders))
    return list(encoders)


# ----------------------------------------------------------------------------- encoding


def _max_lengths(slots: tuple[Slot, ...], max_lengths: Optional[Sequence[Optional[int]]]) -> list[int]:
    given = list(max_lengths or [])
    if any(n is not None for n in given[len(slots):]):
        raise TextEncodingError(f"{len(slots)} text encoder(s), so {len(slots)} max length(s); got {given}")
    out = [n if n is not None else s.max_length for s, n in zip(slots, given + [None] * len(slots))]
    if any(n < 1 for n in out):
        raise TextEncodingError(f"max lengths must be >= 1, got {out}")
    return out


def encode_captions(captions: list[str], family: str, encoders: EncodersArg, *,
                    max_lengths: Optional[Sequence[Optional[int]]] = None, negative_prompt: Optional[str] = "",
                    device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of B captions: per slot states (B, L, D) float32 and mask (B, L) int64 (L = its max length:
    the family's default, or `max_lengths`), and with a `negative_prompt` (None: none) the `negative_*` of each,
    B rows too. `encoders`: from load_text_encoders, or their folder(s), then loaded on `device` in `dtype`."""
    if not captions:
        raise TextEncodingError("no captions to encode")
    slots = text_slots(family)
    lengths = _max_lengths(slots, max_lengths)
    encoders = _loaded(family, encoders, device, dtype)
    texts = [prepare_caption(family, c) for c in captions]
    b, out = len(texts), {}
    for enc, length in zip(encoders, lengths):
        s = enc.slot
        out[s.states_key], out[s.mask_key] = enc(texts, length)
        if negative_prompt is not None:
            states, mask = enc([prepare_caption(family, negative_prompt)], length)
            out["negative_" + s.states_key] = states.repeat(b, 1, 1)
            # Latte T2V: the authors' pipeline cuts the negative to the prompt's tokens (see the module notes)
            out["negative_" + s.mask_key] = out[s.mask_key].clone() if family == "latte_t2v" else mask.repeat(b, 1)
    return out


# ----------------------------------------------------------------------------- files


def _read_text(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise TextEncodingError(f"{what} {path!r} does not exist or is not a file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextEncodingError(f"{what} {path!r} is not UTF-8 text: {e}") from e


def read_caption_lines(path: str) -> list[tuple[int, str]]:
    """(line number from 1, caption) of each non-blank line of a caption file."""
    lines = [(n, line.strip()) for n, line in enumerate(_read_text(path, "caption file").splitlines(), 1) if line.strip()]
    if not lines:
        raise TextEncodingError(f"caption file {path!r} is empty: expected one caption per line")
    return lines


def sidecar_path(video_path: str) -> str:
    """Where training's VideoFolder looks for a video's text: `<video without extension>.safetensors`."""
    return os.path.splitext(video_path)[0] + ".safetensors"


def caption_sidecars(root: str) -> list[tuple[str, str]]:
    """(caption, sidecar path) of every video under `root` (recursive), its caption read from
    `<video without extension>.txt` beside it."""
    if not os.path.isdir(root):
        raise TextEncodingError(f"caption folder {root!r} does not exist or is not a folder")
    videos = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    if not videos:
        raise TextEncodingError(f"no video files in {root!r} (searched recursively for {', '.join(VIDEO_EXTENSIONS)}); "
                                "expected videos with a <name>.txt caption beside each")
    captions = [os.path.splitext(v)[0] + ".txt" for v in videos]
    missing = [c for c in captions if not os.path.isfile(c)]
    if missing:
        raise TextEncodingError(f"{len(missing)} of {len(videos)} video(s) under {root!r} have no caption file, "
                                f"e.g. {missing[0]!r} is missing (expected <video name>.txt beside each video)")
    out = []
    for video, path in zip(videos, captions):
        caption = _read_text(path, "caption file").strip()
        if not caption:
            raise TextEncodingError(f"caption file {path!r} is empty (the caption of {video!r})")
        out.append((caption, sidecar_path(video)))
    return out


@dataclass
class OutputPlan:
    """What `skipdit encode-text` writes. Files of one caption (a batch of one: what `skipdit sample` reads,
    and training one sidecar a video), or with `batched` one file of all captions, row i caption i (what
    `skipdit sample-many` reads: sample i gets prompt i % rows). Sidecars hold the prompt only, no negative_*."""

    items: list[tuple[str, str]]  # (caption, .safetensors path)
    sidecars: bool = False
    batched: bool = False


def plan_outputs(family: str, *, prompt: Optional[str] = None, captions: Optional[str] = None,
                 caption_dir: Optional[str] = None, output: Optional[str] = None) -> OutputPlan:
    """One of: a `prompt` -> the file `output`; a `captions` file -> `output`/<line number>.safetensors per
    non-blank line (00001.safetensors for line 1), or, `output` a .safetensors path, one file of them all
    (row i: the i-th non-blank line); a `caption_dir` -> a sidecar beside every video (no output)."""
    text_slots(family)
    if sum(x is not None for x in (prompt, captions, caption_dir)) != 1:
        raise TextEncodingError("give one of a prompt, a caption file or a caption folder")
    if caption_dir is not None:
        if family not in TRAINED_FAMILIES:
            raise TextEncodingError(f"--caption-dir writes the sidecars training's video_folder reads for "
                                    f"{', '.join(TRAINED_FAMILIES)}; training/ does not train {family}: use --prompt or --captions")
        if output is not None:
            raise TextEncodingError("--caption-dir writes each sidecar beside its video: no --output")
        return OutputPlan(caption_sidecars(caption_dir), sidecars=True)
    if output is None:
        raise TextEncodingError("--output is needed: " + ("the .safetensors file to write" if prompt is not None else
                                                          "a folder (one .safetensors per caption line) or one .safetensors"))
    if prompt is not None:
        if not prompt.strip():
            raise TextEncodingError("the prompt is empty")
        if not output.endswith(".safetensors"):
            raise TextEncodingError(f"--output {output!r}: expected a .safetensors path")
        return OutputPlan([(prompt, output)])
    if output.endswith(".safetensors"):
        return OutputPlan([(c, output) for _, c in read_caption_lines(captions)], batched=True)
    if os.path.isfile(output):
        raise TextEncodingError(f"--output {output!r} is a file: with a caption file give a folder or a .safetensors path")
    lines = read_caption_lines(captions)
    width = max(5, len(str(lines[-1][0])))
    return OutputPlan([(c, os.path.join(output, f"{n:0{width}d}.safetensors")) for n, c in lines])


def write_embeddings(plan: OutputPlan, family: str, encoders: EncodersArg, *,
                     max_lengths: Optional[Sequence[Optional[int]]] = None, negative_prompt: Optional[str] = None,
                     batch_size: int = 8, device="cpu", dtype: torch.dtype = torch.float32,
                     progress: bool = True) -> dict[str, tuple]:
    """Encode the plan's captions `batch_size` at a time and write the files atomically (family, encoder
    folders, negative prompt and the caption(s) in their metadata). negative_prompt: None = "" for sampling
    files; sidecars take none. `encoders` as encode_captions takes them; the arguments are checked before
    folders load. Returns the shapes of the tensors of one file."""
    from tqdm import tqdm

    if batch_size < 1:
        raise TextEncodingError(f"the batch size must be >= 1, got {batch_size}")
    if plan.sidecars and negative_prompt is not None:
        raise TextEncodingError("training sidecars hold the prompt only: no negative prompt with --caption-dir")
    _max_lengths(text_slots(family), max_lengths)
    encoders = _loaded(family, encoders, device, dtype)
    negative = None if plan.sidecars else (negative_prompt or "")
    meta = {"format": "skipdit text embeddings", "family": family,
            **{e.slot.states_key + ".encoder": os.path.abspath(e.folder) for e in encoders}}
    if negative is not None:
        meta["negative_prompt"] = negative
    starts = range(0, len(plan.items), batch_size)
    batches = []
    for start in tqdm(starts, desc="encoding", disable=not progress or len(starts) < 2, leave=False):
        batch = plan.items[start:start + batch_size]
        tensors = encode_captions([c for c, _ in batch], family, encoders, max_lengths=max_lengths, negative_prompt=negative)
        if plan.batched:
            batches.append(tensors)
            continue
        for row, (caption, path) in enumerate(batch):
            write_safetensors({k: v[row:row + 1].clone() for k, v in tensors.items()}, path, {**meta, "caption": caption})
    if not plan.batched:
        return {k: (1, *v.shape[1:]) for k, v in tensors.items()}
    tensors = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    write_safetensors(tensors, plan.items[0][1], {**meta, "captions": json.dumps([c for c, _ in plan.items], ensure_ascii=False)})
    return {k: tuple(v.shape) for k, v in tensors.items()}
