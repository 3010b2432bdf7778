"""Training datasets: synthetic moving shapes, video and image folders, and precomputed VAE latents.

Every dataset returns items in one convention, so that the training loop and a torch DataLoader with the
default collate never need to know which dataset they read:

    item["x"]      float32, model-input space. Pixels: video (F, C, H, W) (Latte's layout), image (C, H, W),
                   in [-1, 1]. Latents (LatentFolder): the same layouts with the VAE's channels and size.
    item["label"]  int64 scalar tensor, the class index; -1 when the dataset has no classes.
    item["prompt_embeds"]          optional, (L, D) float32: text-encoder states for text-to-video.
    item["prompt_attention_mask"]  optional, (L,) int64, 1 for real tokens.

Randomness (clip starts, flips, synthetic videos) comes from a torch.Generator seeded from (seed, index[, epoch]),
never from global state: an item is the same in every process and every DataLoader worker. Datasets with
per-epoch randomness have `set_epoch(epoch)`; call it before iterating over an epoch (with
`persistent_workers=True` the workers keep the copy they were started with, so leave that off).

`build_dataset(spec)` builds one from the `data:` section of a training config.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from skipdit_core.demo import SHAPE_CLASSES  # the bundled demo model's labels are these classes
from skipdit_core.shape_prompts import class_prompt_table, seeded_generator
from skipdit_core.text_encoding import VIDEO_EXTENSIONS  # the videos `skipdit encode-text --caption-dir` writes sidecars for
from skipdit_core.text_encoding import sidecar_path as _sidecar_path  # <video>.safetensors, which that command writes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# A generator seeded from a tuple of ints and tags: sha256 of its repr (not Python's per-process `hash`), so nearby
# seeds and indices give unrelated streams, identically in every process.
_generator = seeded_generator


def _check_index(i: int, n: int) -> int:
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} items")
    return int(i)


def _uint8_to_x(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    return pixels.movedim(-1, -3).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------- synthetic videos

def _hsv_to_rgb(h: float, s: float, v: float) -> torch.Tensor:
    """One HSV colour (each in [0, 1]) -> RGB (3,) in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6.0 * h) % 6.0
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


# Hues of colours="by_class" (label order of SHAPE_CLASSES): red circle, green square, blue triangle, yellow cross.
CLASS_HUES = (0.0, 1 / 3, 0.6, 1 / 6)
COLOUR_MODES = ("random", "by_class")


def class_colour(label: int) -> torch.Tensor:
    """The RGB colour (3,) in [0, 1] of class `label` under colours="by_class"."""
    return _hsv_to_rgb(CLASS_HUES[label], 0.85, 1.0)


def _shape_coverage(shape: str, centers: torch.Tensor, half: float, size: int, supersample: int = 4) -> torch.Tensor:
    """Fraction of each pixel covered by a filled shape: (F, size, size) in [0, 1].

    centers: (F, 2) shape centres (x, y) in pixel units (the frame spans [0, size)); half: half the shape's
    extent (its bounding box is 2*half wide). Each pixel is sampled on a supersample x supersample grid and
    averaged, which anti-aliases the edges so that 16x16 and 32x32 shapes stay recognisable."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample  # sub-pixel centres
    dx = coords.view(1, 1, n) - centers[:, 0].view(-1, 1, 1)
    dy = coords.view(1, n, 1) - centers[:, 1].view(-1, 1, 1)
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "triangle":  # apex up at (0, -half), base at y = +half spanning the whole box width
        inside = (dy <= half) & (2 * dx.abs() <= dy + half)
    elif shape == "cross":  # a plus sign whose arms are 0.8*half wide
        arm = 0.4 * half
        inside = ((dx.abs() <= half) & (dy.abs() <= arm)) | ((dy.abs() <= half) & (dx.abs() <= arm))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPE_CLASSES}")
    return F.avg_pool2d(inside.float()[:, None], supersample)[:, 0]


class MovingShapes(Dataset):
    """Synthetic class-labelled videos, generated on the fly: a quick stand-in for a real video dataset.

    Each video shows one filled shape of its class (SHAPE_CLASSES[:num_classes]) on a black background, in a
    random bright colour (colours="random") or in its class's colour (colours="by_class", CLASS_HUES: the class
    is then visible in every pixel of the shape, not only at its edges, which a small model learns far sooner),
    with a random size (25-40% of the frame), start position and direction, moving at
    a constant speed and bouncing off the frame edges. Item i depends only on (seed, i); label = i % num_classes,
    so the classes are balanced.

    Items: "x" (num_frames, 3, size, size) in [-1, 1], or (3, size, size) when num_frames == 1; "label".
    With text_dim > 0 also "prompt_embeds" (text_len, text_dim) and "prompt_attention_mask" (text_len,) of
    ones: a stand-in for the T5 / umT5 states of the caption `caption(label)` ("a circle moving"). It is a fixed,
    unit-scale random embedding per class (seeded by (seed, class)), so it carries exactly the class:
    `skipdit_core.shape_prompts.class_prompt_embeds(label, text_len, text_dim, seed)` regenerates it for sampling.
    """

    def __init__(self, num_frames: int = 8, size: int = 32, length: int = 10000, seed: int = 0,
                 num_classes: int = 4, text_len: int = 0, text_dim: int = 0, colours: str = "random"):
        if colours not in COLOUR_MODES:
            raise ValueError(f"colours must be one of {', '.join(COLOUR_MODES)}, got {colours!r}")
        if not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPE_CLASSES)}, got {num_classes}")
        if num_frames < 1 or size < 4 or length < 1:
            raise ValueError(f"need num_frames >= 1, size >= 4, length >= 1; got {num_frames}, {size}, {length}")
        if (text_len > 0) != (text_dim > 0):
            raise ValueError(f"text_len and text_dim go together (both > 0 for text), got {text_len}, {text_dim}")
        self.num_frames, self.size, self.length, self.seed = num_frames, size, length, seed
        self.classes = list(SHAPE_CLASSES[:num_classes])
        self.colours = colours
        self.text_len, self.text_dim = text_len, text_dim
        # One fixed embedding per class, drawn once (not per item): captions are per class.
        self.class_embeds = None
        if text_dim > 0:
            self.class_embeds = class_prompt_table(num_classes, text_len, text_dim, seed)

    def __len__(self) -> int:
        return self.length

    def caption(self, label: int) -> str:
        """The caption that `prompt_embeds` stands for, e.g. "a circle moving" (colour-less on purpose)."""
        return f"a {self.classes[label]} moving" if self.num_frames > 1 else f"a {self.classes[label]}"

    def params(self, i: int) -> dict:
        """The random draws of item i: label, shape, colour (3,) in [0, 1], half (half the shape's extent,
        pixels) and centers (F, 2) the (x, y) centre in each frame."""
        i = _check_index(i, self.length)
        g = _generator("item", self.seed, i)
        u = torch.rand(7, generator=g).tolist()  # always 7 draws, in a fixed order
        label = i % len(self.classes)
        half = (0.25 + 0.15 * u[0]) * self.size / 2
        lo, span = half, self.size - 2 * half  # the centre stays in [half, size - half]: shape fully inside
        start = torch.tensor([lo + span * u[1], lo + span * u[2]])
        angle = 2 * math.pi * u[3]
        speed = (0.75 + 0.75 * u[4]) * self.size / 32  # pixels per frame, the same look at any size
        velocity = speed * torch.tensor([math.cos(angle), math.sin(angle)])
        # Bouncing = folding the straight path into [0, span] (a triangle wave of period 2*span).
        path = torch.remainder(start - lo + velocity * torch.arange(self.num_frames).view(-1, 1), 2 * span)
        centers = lo + torch.where(path > span, 2 * span - path, path)
        if self.colours == "by_class":
            colour = class_colour(label)
        else:
            colour = _hsv_to_rgb(u[5], 0.6 + 0.4 * u[6], 1.0)  # full value: bright on black
        return {"label": label, "shape": self.classes[label], "colour": colour, "half": half, "centers": centers}

    def __getitem__(self, i: int) -> dict:
        p = self.params(i)
        coverage = _shape_coverage(p["shape"], p["centers"], p["half"], self.size)  # (F, H, W)
        x = coverage[:, None] * p["colour"].view(1, 3, 1, 1) * 2 - 1  # (F, 3, H, W); black background = -1
        item = {"x": x[0] if self.num_frames == 1 else x, "label": torch.tensor(p["label"], dtype=torch.int64)}
        if self.class_embeds is not None:
            item["prompt_embeds"] = self.class_embeds[p["label"]].clone()
            item["prompt_attention_mask"] = torch.ones(self.text_len, dtype=torch.int64)
        return item


# ---------------------------------------------------------------------------- folders of files

def _list_files(root: str, extensions: tuple, kind: str) -> list[str]:
    """Files under root (recursively) with one of the extensions, sorted; a ValueError when there are none."""
    if not os.path.isdir(root):
        raise ValueError(f"{kind} folder {root!r} does not exist or is not a folder")
    files = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in extensions and p.is_file())
    if not files:
        raise ValueError(f"no {kind} files in {root!r} (searched recursively for {', '.join(extensions)})")
    return files


def _load_text(path: str) -> dict:
    """prompt_embeds (L, D) float32 and prompt_attention_mask (L,) int64 from a sidecar .safetensors file."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "prompt_embeds" not in tensors:
        raise ValueError(f"{path}: no 'prompt_embeds' tensor (found {sorted(tensors)})")
    embeds = tensors["prompt_embeds"]
    if embeds.ndim == 3 and embeds.shape[0] == 1:  # diffusers' encode_prompt returns a batch of one
        embeds = embeds[0]
    if embeds.ndim != 2:
        raise ValueError(f"{path}: prompt_embeds should be (L, D) or (1, L, D), got {tuple(embeds.shape)}")
    mask = tensors.get("prompt_attention_mask")
    mask = torch.ones(embeds.shape[0]) if mask is None else mask.reshape(-1)
    if mask.shape[0] != embeds.shape[0]:
        raise ValueError(f"{path}: prompt_attention_mask has {mask.shape[0]} entries for {embeds.shape[0]} tokens")
    return {"prompt_embeds": embeds.float(), "prompt_attention_mask": mask.to(torch.int64)}


def _count_frames(path: str) -> int:
    """Number of video frames: the container's count when it has one (mp4, avi, gif), else the number of
    demuxed packets (mkv and webm store no count); demuxing reads the file but decodes nothing."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise RuntimeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _decode_frames(path: str, indices: list[int]) -> torch.Tensor:
    """The frames at `indices` (sorted, may repeat) as uint8 (len(indices), H, W, 3), decoding from the start
    and stopping after the last one needed. Indices past the real end (a frame count that was off) get the
    last decoded frame."""
    import av

    wanted, last = set(indices), max(indices)
    frames = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for j, frame in enumerate(container.decode(stream)):
            if j in wanted:
                frames[j] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
            if j >= last:
                break
    if not frames:
        raise RuntimeError(f"{path}: no frame could be decoded")
    end = frames[max(frames)]
    return torch.stack([frames.get(j, end) for j in indices])


def _frame_size(size) -> tuple[int, int]:
    """A clip's (height, width): `size` an int (square) or [height, width]."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise ValueError(f"size must be an int or [height, width], got {size!r}")
        return int(size[0]), int(size[1])
    if not isinstance(size, int) or isinstance(size, bool):
        raise ValueError(f"size must be an int or [height, width], got {size!r}")
    return size, size


def _resize_center_crop_video(frames: torch.Tensor, size) -> torch.Tensor:
    """(F, 3, H, W) float -> (F, 3, height, width) (`size` an int: square): scaled (bilinear, antialiased) to cover
    height x width, then centre-cropped."""
    th, tw = _frame_size(size)
    h, w = frames.shape[-2:]
    scale = max(th / h, tw / w)
    new_h, new_w = max(th, round(h * scale)), max(tw, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - th) // 2, (new_w - tw) // 2
    return frames[..., top:top + th, left:left + tw]


class VideoFolder(Dataset):
    """Video files under `root` (searched recursively for VIDEO_EXTENSIONS), decoded with PyAV into clips.

    A clip is `num_frames` frames taken every `frame_interval` frames from a start drawn per item from a
    generator seeded by (seed, i, epoch) (see set_epoch). A video shorter than the clip's span gives the frames
    0, frame_interval, ... that it has, then the last of them repeated. Frames are resized so that the shorter
    side is `size` (bilinear, antialiased) and centre-cropped; `size` [height, width] gives non-square clips (scaled
    to cover them, then centre-cropped), e.g. Wan's [480, 832].

    Items: "x" (num_frames, 3, height, width) in [-1, 1]; "label": with class_subfolders=True the index of the
    video's first-level subfolder in `.classes` (sorted names), else -1. Text: when `<video without
    extension>.safetensors` exists, its "prompt_embeds" ((1, L, D) or (L, D), as diffusers' encode_prompt gives
    them) and optional "prompt_attention_mask" are returned too. For batching, every sidecar should have the
    same L (pad to a fixed max_sequence_length) and, with require_text=True, every video must have one.
    """

    def __init__(self, root: str, num_frames: int = 16, size=256, frame_interval: int = 1,
                 class_subfolders: bool = False, require_text: bool = False, seed: int = 0):
        if num_frames < 1 or frame_interval < 1 or min(_frame_size(size)) < 1:
            raise ValueError(f"need num_frames, frame_interval, size >= 1; got {num_frames}, {frame_interval}, {size}")
        self.root, self.num_frames, self.size, self.frame_interval = root, num_frames, size, frame_interval
        self.seed, self.epoch = seed, 0
        self.files = _list_files(root, VIDEO_EXTENSIONS, "video")
        self.classes, self.labels = [], [-1] * len(self.files)
        if class_subfolders:
            parts = [Path(f).relative_to(root).parts for f in self.files]
            loose = [f for f, p in zip(self.files, parts) if len(p) < 2]
            if loose:
                raise ValueError(f"class_subfolders=True but {len(loose)} video(s) are directly in {root!r} "
                                 f"with no class subfolder, e.g. {loose[0]!r}")
            self.classes = sorted({p[0] for p in parts})
            self.labels = [self.classes.index(p[0]) for p in parts]
        if require_text:  # fail before training starts, not at the first batch that meets the file
            missing = [_sidecar_path(f) for f in self.files if not os.path.isfile(_sidecar_path(f))]
            if missing:
                raise FileNotFoundError(f"require_text=True but {len(missing)} video(s) have no text sidecar, "
                                        f"e.g. {missing[0]!r} is missing")
        self._frame_counts = {}  # per-process cache: counting may read a whole file

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Draw new clip starts: item i of epoch e uses a generator seeded by (seed, i, e)."""
        self.epoch = epoch

    def clip_indices(self, i: int, num_video_frames: int) -> list[int]:
        """Frame indices of item i's clip in a video of `num_video_frames` frames."""
        steps = [k * self.frame_interval for k in range(self.num_frames)]
        if num_video_frames > steps[-1]:
            g = _generator("clip", self.seed, i, self.epoch)
            start = int(torch.randint(0, num_video_frames - steps[-1], (1,), generator=g))
            return [start + s for s in steps]
        available = [s for s in steps if s < num_video_frames]  # too short: from the start, last one repeated
        return available + [available[-1]] * (self.num_frames - len(available))

    def __getitem__(self, i: int) -> dict:
        import av

        i = _check_index(i, len(self.files))
        path = self.files[i]
        try:
            if i not in self._frame_counts:
                self._frame_counts[i] = _count_frames(path)
            frames = _decode_frames(path, self.clip_indices(i, self._frame_counts[i]))
        except av.FFmpegError as e:
            raise RuntimeError(f"could not decode video {path!r}: {e}") from e
        x = _resize_center_crop_video(_uint8_to_x(frames), self.size).clamp(-1, 1).contiguous()
        item = {"x": x, "label": torch.tensor(self.labels[i], dtype=torch.int64)}
        sidecar = _sidecar_path(path)
        if os.path.isfile(sidecar):
            item.update(_load_text(sidecar))
        return item


def _resize_center_crop_image(image, size: int):
    """PIL image -> size x size, as ADM and DiT prepare ImageNet: halve with a box filter while the shorter
    side stays >= 2*size (cheap and alias-free), then one bicubic resize of the shorter side to `size`,
    then a centre crop."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """Images in one subfolder per class under `root` (each searched recursively for IMAGE_EXTENSIONS).

    Items: "x" (3, size, size) in [-1, 1]: RGB, resized and centre-cropped like DiT's center_crop_arr, flipped
    horizontally with probability `flip` (a generator seeded by (seed, i, epoch); see set_epoch); "label": the
    index of the image's class subfolder in `.classes` (sorted names).
    """

    def __init__(self, root: str, size: int = 256, flip: float = 0.5, seed: int = 0):
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist or is not a folder")
        self.root, self.size, self.flip, self.seed, self.epoch = root, size, flip, seed, 0
        self.classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"no class subfolders in {root!r}: expected one subfolder of images per class")
        self.files, self.labels = [], []
        for label, name in enumerate(self.classes):
            files = sorted(str(p) for p in Path(root, name).rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:  # an empty class would silently shift nothing but train on nothing: say so
                raise ValueError(f"class subfolder {os.path.join(root, name)!r} has no images "
                                 f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
            self.files += files
            self.labels += [label] * len(files)

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Draw new flips: item i of epoch e uses a generator seeded by (seed, i, e)."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        from PIL import Image, UnidentifiedImageError

        i = _check_index(i, len(self.files))
        try:
            with Image.open(self.files[i]) as image:
                image = _resize_center_crop_image(image.convert("RGB"), self.size)
        except (UnidentifiedImageError, OSError) as e:
            raise RuntimeError(f"could not read image {self.files[i]!r}: {e}") from e
        x = _uint8_to_x(torch.from_numpy(np.asarray(image).copy()))  # (H, W, 3) uint8 -> (3, H, W)
        if torch.rand(1, generator=_generator("flip", self.seed, i, self.epoch)).item() < self.flip:
            x = x.flip(-1)
        return {"x": x.contiguous(), "label": torch.tensor(self.labels[i], dtype=torch.int64)}


# ---------------------------------------------------------------------------- precomputed latents

WAN_VAE = "AutoencoderKLWan"  # diffusers' class of the Wan 2.1 / 2.2 VAE (video in, causal 3-D)


def _load_vae(vae_path: str, device, dtype):
    """A local diffusers VAE folder, or a pipeline folder with vae/: AutoencoderKL, or AutoencoderKLWan (Wan 2.1 /
    2.2) when its config.json says so."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("precompute_latents needs diffusers for the VAE: pip install diffusers") from e
    # A whole pipeline folder has the VAE in vae/; a VAE folder has it at its root.
    subfolder = "vae" if os.path.isfile(os.path.join(vae_path, "vae", "config.json")) else None
    config = os.path.join(vae_path, subfolder or "", "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"--vae {vae_path!r}: no config.json (expected a diffusers VAE folder, or a pipeline folder "
                         "with vae/config.json)")
    with open(config) as f:
        class_name = json.load(f).get("_class_name", "AutoencoderKL")
    if class_name not in ("AutoencoderKL", WAN_VAE):
        raise ValueError(f"--vae {vae_path!r}: a {class_name}; precompute_latents encodes with AutoencoderKL "
                         f"(image VAEs, frame by frame) or {WAN_VAE} (Wan 2.1 / 2.2)")
    cls = getattr(diffusers, class_name)
    vae = cls.from_pretrained(vae_path, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    return vae.to(device).eval()


def wan_latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (z_dim,) float32, of a Wan VAE's config: latents are (z - mean) / std, as WanPipeline
    normalises (it decodes z = latents * std + mean)."""
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
    if mean.shape != (vae.config.z_dim,) or std.shape != (vae.config.z_dim,):
        raise ValueError(f"the Wan VAE's latents_mean / latents_std have {mean.numel()} / {std.numel()} entries for "
                         f"z_dim {vae.config.z_dim}")
    return mean, std


def _wan_encode(vae, x: torch.Tensor, device, dtype, stats) -> torch.Tensor:
    """Videos (B, F, 3, H, W) or images (B, 3, H, W) in [-1, 1] -> normalised Wan latents (B, F', z, h, w) (an image
    is a one-frame video: F' = 1), F' = 1 + (F - 1) / temporal factor."""
    video = x if x.ndim == 5 else x[:, None]
    frames, (height, width) = video.shape[1], video.shape[-2:]
    temporal = int(getattr(vae.config, "scale_factor_temporal", None) or 4)
    spatial = int(getattr(vae.config, "scale_factor_spatial", None) or 8)
    if (frames - 1) % temporal:
        raise ValueError(f"the Wan VAE encodes 1 + {temporal} k frames (e.g. 81), the data gives {frames}: "
                         f"set num_frames to {1 + temporal * max(1, round((frames - 1) / temporal))}")
    if height % spatial or width % spatial:
        raise ValueError(f"the Wan VAE needs heights and widths that are multiples of {spatial}, the data gives "
                         f"{height} x {width}")
    posterior = vae.encode(video.transpose(1, 2).to(device, dtype)).latent_dist  # (B, 3, F, H, W) in
    z = posterior.mean.float()  # the mode, as WanPipeline's retrieve_latents(sample_mode="argmax")
    mean, std = (s.to(z.device).view(1, -1, 1, 1, 1) for s in stats)
    return ((z - mean) / std).transpose(1, 2).cpu()  # (B, F', z, h, w): the frames-first layout of the data


def _save_atomically(write, path: str) -> None:
    """write(tmp_path), then rename: a reader never sees a half-written file, even after a crash."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def precompute_latents(dataset, vae_path: str, out_dir: str, *, batch_size: int = 8, device="cpu",
                       dtype: torch.dtype = torch.float32, repeats: int = 1, shard_size: int = 1024,
                       num_workers: int = 0) -> dict:
    """Encode every item's "x" with a local diffusers VAE and write the latents to `out_dir`.

    AutoencoderKL: latents are the posterior MEAN times vae.config.scaling_factor (not a sample): deterministic,
    and the posterior's std is tiny for the SD VAE, so sampling would add noise without adding data. A video
    (F, C, H, W) is encoded frame by frame (its frames as one batch) into (F, c, h, w), an image into (c, h, w).
    AutoencoderKLWan (Wan 2.1: 16 channels, 8x spatial; Wan 2.2: 48 channels, 16x): a video (F, 3, H, W), F = 1 + 4k,
    is encoded as one causal 3-D clip into (1 + k, z, H / s, W / s), an image as a one-frame video (1, z, h, w); the
    posterior mean normalised per channel as WanPipeline does, (z - latents_mean) / latents_std (the VAE config's),
    so the latents are what a Wan model is trained on and samples (no scaling_factor).
    `repeats` encodes the dataset that many times, calling dataset.set_epoch(r) for repeat r when it has one
    (new random crops or flips). batch_size counts items (a batch of videos is batch_size * F frames).

    Writes out_dir/latents-00000.safetensors, ... (shard_size items each; keys "x" (N, ...) float32,
    "label" (N,) int64, and "prompt_embeds" / "prompt_attention_mask" when the items have them) and, last,
    out_dir/info.json (count, shape, scaling_factor, vae_path, vae_class, shards, ...; a Wan VAE's latents_mean and
    latents_std), which LatentFolder reads back. Returns the info dict.
    """
    vae = _load_vae(vae_path, device, dtype)
    wan = type(vae).__name__ == WAN_VAE
    stats = wan_latent_stats(vae) if wan else None
    scaling_factor = None if wan else float(vae.config.scaling_factor)
    os.makedirs(out_dir, exist_ok=True)
    info_path = os.path.join(out_dir, "info.json")
    if os.path.exists(info_path):  # an interrupted rerun must not look complete with the old info
        os.remove(info_path)

    from safetensors.torch import save_file

    shards, pending, count, shape = [], [], 0, None

    def flush():
        name = f"latents-{len(shards):05d}.safetensors"
        tensors = {k: torch.cat([b[k] for b in pending]).contiguous() for k in pending[0]}
        _save_atomically(lambda tmp: save_file(tensors, tmp), os.path.join(out_dir, name))
        shards.append(name)
        pending.clear()

    for r in range(repeats):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(r)
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            x = batch["x"]
            if wan:
                latents = _wan_encode(vae, x, device, dtype, stats)
            else:
                frames = x.flatten(0, 1) if x.ndim == 5 else x  # videos: (B*F, C, H, W), one batch of frames
                latents = vae.encode(frames.to(device, dtype)).latent_dist.mean * scaling_factor
                latents = latents.float().cpu().reshape(*x.shape[:-3], *latents.shape[1:])
            shape = list(latents.shape[1:])
            batch = {**batch, "x": latents}
            # Split into shard-sized pieces so that shards hold exactly shard_size items.
            while len(batch["x"]):
                room = shard_size - sum(len(b["x"]) for b in pending)
                pending.append({k: v[:room] for k, v in batch.items()})
                batch = {k: v[room:] for k, v in batch.items()}
                count += len(pending[-1]["x"])
                if sum(len(b["x"]) for b in pending) == shard_size:
                    flush()
    if pending:
        flush()
    if count == 0:
        raise ValueError("precompute_latents: the dataset is empty")

    info = {"count": count, "shape": shape, "scaling_factor": scaling_factor, "vae_path": os.path.abspath(vae_path),
            "vae_class": type(vae).__name__, "shards": shards, "repeats": repeats, "dataset": type(dataset).__name__,
            "classes": list(getattr(dataset, "classes", []))}
    if wan:
        info.update(latents_mean=stats[0].tolist(), latents_std=stats[1].tolist())

    def write_info(tmp):
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)

    _save_atomically(write_info, info_path)
    return info


class LatentFolder(Dataset):
    """Latents written by precompute_latents, read item by item from the memory-mapped shards (a Wan dataset with
    512 x 4096 text states per clip does not fit in memory, let alone once per process).

    Items: "x" (F, c, h, w) for videos or (c, h, w) for images: for an AutoencoderKL already multiplied by its
    scaling factor (`.scaling_factor`; divide by it before decoding), for a Wan VAE normalised with `.latents_mean`
    / `.latents_std` (decode latents * std + mean; `.scaling_factor` None); "label"; and the prompt tensors when
    they were stored. `.classes` and `.info` come from info.json.
    """

    def __init__(self, root: str):
        from safetensors import safe_open

        info_path = os.path.join(root, "info.json")
        if not os.path.isfile(info_path):
            raise ValueError(f"{info_path!r} not found: not a precompute_latents folder, or an unfinished one")
        with open(info_path) as f:
            self.info = json.load(f)
        self.root, self.scaling_factor, self.classes = root, self.info["scaling_factor"], self.info.get("classes", [])
        self.latents_mean, self.latents_std = self.info.get("latents_mean"), self.info.get("latents_std")
        # info.json lists the shards of the finished run, so stale shards of an earlier run are ignored.
        self.paths = [os.path.join(root, name) for name in self.info["shards"]]
        sizes = []
        for path in self.paths:
            with safe_open(path, "pt") as f:
                sizes.append(f.get_slice("x").get_shape()[0])
                keys = sorted(f.keys())
            if sizes[1:] and keys != self.keys:
                raise ValueError(f"{path!r} holds {keys}, the first shard {self.keys}")
            self.keys = keys
        self.starts = np.cumsum([0] + sizes).tolist()
        if self.starts[-1] != self.info["count"]:
            raise ValueError(f"{root!r}: the shards hold {self.starts[-1]} items, info.json says {self.info['count']}")
        self._open = {}  # shard index -> safe_open handle, opened on first use in each process / worker

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open

        i = _check_index(i, len(self))
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        if shard not in self._open:
            self._open[shard] = safe_open(self.paths[shard], "pt")
        f, row = self._open[shard], i - self.starts[shard]
        return {k: f.get_slice(k)[row:row + 1][0] for k in self.keys}


# ---------------------------------------------------------------------------- config factory

DATASETS = {"moving_shapes": MovingShapes, "video_folder": VideoFolder, "image_folder": ImageFolder,
            "latents": LatentFolder}


def build_dataset(spec: dict) -> Dataset:
    """A dataset from a config's `data:` section: spec["type"] picks the class (a key of DATASETS) and the
    other keys are its constructor's keyword arguments, e.g. {"type": "moving_shapes", "num_frames": 8}."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset type {kind!r}; expected one of {', '.join(DATASETS)}")
    params = inspect.signature(DATASETS[kind]).parameters
    unknown = sorted(set(spec) - set(params))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} for dataset type {kind!r}; "
                         f"accepted: type, {', '.join(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in spec]
    if missing:
        raise ValueError(f"dataset type {kind!r} needs {', '.join(missing)}")
    return DATASETS[kind](**spec)
