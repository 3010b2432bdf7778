"""`skipdit evaluate`: FID (images) and FVD (videos) of `sample-many` outputs against a reference set, as the
Skip-DiT paper measures them (DiT's FID for class-to-image, Latte's StyleGAN-V FVD for video).

    skipdit evaluate evals/ucf101 --reference data/ucf101 --i3d i3d_torchscript.pt          # every setting, FVD
    skipdit evaluate evals/imagenet/uncached.npz --reference VIRTUAL_imagenet256.npz --inception inception-2015-12-05.pt
    torchrun --nproc_per_node 8 -m skipdit_core evaluate evals/ucf101 --reference ... --i3d ...

The feature networks are the usual TorchScript files, read from local paths only (nothing is downloaded):

- FID, `--inception`: NVIDIA's `inception-2015-12-05.pt` (StyleGAN2-ADA, StyleGAN-V, clean-fid; a port of the
  TensorFlow FID graph). Called as `net(images, return_features=True)` on images (N, 3, H, W) uint8 in [0, 255]
  at their stored size; the file itself casts to float32, resizes to 299 x 299 (bilinear grid sample) and maps
  x -> (x - 128) / 128. Output: (N, 2048) pool features. (pytorch-fid's `pt_inception-2015-12-05-*.pth` is a
  state dict of another module, not TorchScript, and is refused with that reason.)
- FVD, `--i3d`: StyleGAN-V's `i3d_torchscript.pt` (Kinetics-400 I3D). Called as
  `net(videos, rescale=False, resize=True, return_features=True)` on videos (N, 3, T, H, W) float32 in [-1, 1]
  (u / 127.5 - 1 of the uint8 frames u), T = `frames` (16: FVD-16, the first 16 frames of every video), at their
  stored size (resize=True: the file resizes to 224 x 224). Output: (N, 400) features before the softmax.

Distances, float64: ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)). FID takes the unbiased covariance
(1 / (N - 1): torchmetrics, pytorch-fid, ADM's evaluator that DiT uses); FVD the biased one (1 / N: StyleGAN-V's
`FeatureStats.get_mean_cov`). tr (S_g S_r)^(1/2) is computed exactly, with no general matrix square root: for any
X, Y with X^T X = S_g and Y^T Y = S_r it is the sum of the singular values of X Y^T (X: the centred features
/ sqrt(N - ddof) when N <= d, else the symmetric square root of S_g by eigendecomposition).

Features are cached per set: `<set>.<fid|fvd>-<key>.npz` beside the set (or in `cache_dir`), the key a hash of the
set's identity (path, its files' names, sizes and mtimes), the network file's SHA-256 and the preprocessing; so
five settings against one reference extract the reference once. Extraction is cut into chunks of `batch_size`
items; under torchrun / accelerate launch (WORLD_SIZE > 1) process r takes chunks r, r + P, ...; each chunk is
written atomically to `.<cache>.parts/` and the main process joins them into the cache, so a killed run resumes
with the missing chunks only (the folder must be one all processes see, as sample-many's --out).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .parallel import Processes

FEATURES = {"fid": 2048, "fvd": 400}
NETWORK_OPTION = {"fid": "--inception", "fvd": "--i3d"}
EXPECTED_FILE = {
    "fid": "the TorchScript Inception-v3 of FID (inception-2015-12-05.pt of StyleGAN2-ADA / StyleGAN-V / clean-fid), "
           "called as net(uint8 images (N, 3, H, W), return_features=True) -> (N, 2048)",
    "fvd": "StyleGAN-V's TorchScript I3D (i3d_torchscript.pt), called as net(videos (N, 3, T, H, W) in [-1, 1], "
           "rescale=False, resize=True, return_features=True) -> (N, 400)",
}
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PREPROCESSING_VERSION = 1  # bump when what a feature means changes: old caches then miss


class EvaluationError(ValueError):
    """A set, network file or option that cannot be evaluated; the message names it and what was expected."""


# ----------------------------------------------------------------------------- Fréchet distance


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite (d, d) matrix, by eigendecomposition
    (eigenvalues below 0 from rounding are taken as 0). float64."""
    m = np.asarray(matrix, dtype=np.float64)
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(x: np.ndarray, y: np.ndarray) -> float:
    """tr (X^T X Y^T Y)^(1/2) for x (a, d), y (b, d): the sum of the singular values of X Y^T (a, b).
    (The non-zero eigenvalues of X^T X Y^T Y are those of (X Y^T)(X Y^T)^T.)"""
    return float(np.linalg.svd(np.asarray(x, np.float64) @ np.asarray(y, np.float64).T, compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)) of two Gaussians: mu (d,), cov (d, d)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    x, y = psd_sqrt(cov1), psd_sqrt(cov2)
    return float(np.square(mu1 - mu2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt_product(x, y))


def _mean_and_factor(features: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """mean (d,) and X with X^T X = the covariance (1 / (N - ddof)) of features (N, d): the centred features
    scaled, (N, d), when N <= d; else the covariance's symmetric square root, (d, d)."""
    f = np.asarray(features, np.float64)
    n, d = f.shape
    if n - ddof < 1:
        raise EvaluationError(f"a Fréchet distance needs at least {ddof + 1} feature vectors per set, got {n}")
    mu = f.mean(axis=0)
    centred = (f - mu) / math.sqrt(n - ddof)
    return mu, (centred if n <= d else psd_sqrt(centred.T @ centred))


def feature_frechet_distance(a: np.ndarray, b: np.ndarray, ddof: int) -> float:
    """The Fréchet distance between the Gaussians of features a (N1, d) and b (N2, d), covariances 1 / (N - ddof)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise EvaluationError(f"features of both sets must be (N, d) with one d, got {a.shape} and {b.shape}")
    mu1, x = _mean_and_factor(a, ddof)
    mu2, y = _mean_and_factor(b, ddof)
    return float(np.square(mu1 - mu2).sum() + np.square(x).sum() + np.square(y).sum() - 2 * trace_sqrt_product(x, y))


def fid(generated: np.ndarray, reference: np.ndarray) -> float:
    """FID of Inception features (N, 2048): unbiased covariances (torchmetrics, pytorch-fid, ADM's evaluator)."""
    return feature_frechet_distance(generated, reference, ddof=1)


def fvd(generated: np.ndarray, reference: np.ndarray) -> float:
    """FVD of I3D features (N, 400): biased covariances (1 / N), as StyleGAN-V's compute_fvd."""
    return feature_frechet_distance(generated, reference, ddof=0)


DISTANCES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"fid": fid, "fvd": fvd}


# ----------------------------------------------------------------------------- feature networks


@dataclass
class Network:
    """A feature network file: what it measures ("fid" / "fvd"), its path and SHA-256; loaded when first used."""

    metric: str
    path: Path
    sha256: str
    device: str = "cpu"
    module: Optional[torch.jit.ScriptModule] = None

    @classmethod
    def of(cls, metric: str, path: Optional[str], device: str) -> "Network":
        option = NETWORK_OPTION[metric]
        if not path:
            raise EvaluationError(f"{metric.upper()} needs {option} PATH: {EXPECTED_FILE[metric]}; a local file, "
                                  "nothing is downloaded")
        p = Path(path)
        if not p.is_file():
            raise EvaluationError(f"{option} {p}: no such file; expected {EXPECTED_FILE[metric]}")
        return cls(metric, p, file_sha256(p), device)

    def load(self) -> torch.jit.ScriptModule:
        if self.module is None:
            self.module = _load_torchscript(self.metric, self.path, self.device)
        return self.module


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_torchscript(metric: str, path: Path, device: str) -> torch.jit.ScriptModule:
    """torch.jit.load the file, refusing anything that is not TorchScript with the calling convention we use."""
    option, expected = NETWORK_OPTION[metric], EXPECTED_FILE[metric]
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but these files are TorchScript: no other reader
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # noqa: BLE001 - any failure of torch.jit.load means "not a TorchScript file"
        what = "not a TorchScript file"
        try:
            if isinstance(torch.load(str(path), map_location="cpu", weights_only=True), dict):
                what = "a state dict (pytorch-fid's pt_inception-2015-12-05-*.pth is one), not a TorchScript file"
        except Exception:  # noqa: BLE001
            pass
        raise EvaluationError(f"{option} {path}: {what} ({_first_sentence(e)}); expected {expected}") from None
    arguments = [a.name for a in net.forward.schema.arguments][1:]  # without self
    needed = ["return_features"] if metric == "fid" else ["rescale", "resize", "return_features"]
    missing = [a for a in needed if a not in arguments]
    if missing:
        raise EvaluationError(f"{option} {path}: its forward takes ({', '.join(arguments)}), without "
                              f"{', '.join(missing)}; expected {expected}")
    return net


def _first_sentence(error: Exception) -> str:
    """An exception's message cut to its first line and sentence (torch's carry paragraphs of advice)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0].rstrip(".")


def network_features(net: Network, batch: np.ndarray) -> np.ndarray:
    """Features (n, FEATURES[metric]) float32 of a batch of one shape: images (n, H, W, 3) uint8 for FID, videos
    (n, T, H, W, 3) uint8 for FVD, called with the conventions in the module docstring."""
    module = net.load()
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(net.device)
    with torch.inference_mode():
        try:
            if net.metric == "fid":
                out = module(x.permute(0, 3, 1, 2).contiguous(), return_features=True)
            else:
                videos = x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
                out = module(videos.contiguous(), rescale=False, resize=True, return_features=True)
        except Exception as e:  # noqa: BLE001 - the file's own code failed on the documented call
            raise EvaluationError(f"{NETWORK_OPTION[net.metric]} {net.path}: calling it on a batch of shape "
                                  f"{tuple(batch.shape)} failed ({_first_sentence(e)}); "
                                  f"expected {EXPECTED_FILE[net.metric]}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or tuple(out.shape) != (len(batch), FEATURES[net.metric]):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EvaluationError(f"{NETWORK_OPTION[net.metric]} {net.path}: returned {found} for {len(batch)} items, "
                              f"expected ({len(batch)}, {FEATURES[net.metric]}): {EXPECTED_FILE[net.metric]}")
    return out.float().cpu().numpy()


# ----------------------------------------------------------------------------- sets of images or videos


def _npz_array(path: Path, key: str = "arr_0") -> np.ndarray:
    """Array `key` of an .npz, memory-mapped when stored uncompressed (np.savez, sample-many's), else loaded."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if f"{key}.npy" not in names:
                raise EvaluationError(f"{path}: no array {key!r} in it (found {', '.join(n[:-4] for n in names) or 'none'})")
            info = z.getinfo(f"{key}.npy")
    except zipfile.BadZipFile:
        raise EvaluationError(f"{path}: not an .npz file") from None
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path) as npz:
            return npz[key]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise EvaluationError(f"{path}: {key!r} holds Python objects, expected uint8 frames")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _as_frames(array: np.ndarray, where: str) -> np.ndarray:
    """One item as uint8 (..., H, W, 3): one channel repeated to three; anything else refused."""
    if array.dtype != np.uint8:
        raise EvaluationError(f"{where}: {array.dtype} values, expected uint8 frames (a latent model sampled without "
                              "--vae writes latents: decode them first)")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise EvaluationError(f"{where}: an item of shape {array.shape}, expected (H, W, 3) images or (F, H, W, 3) videos")
    return array


def _listing_hash(root: Path, files: Sequence[Path]) -> str:
    """SHA-256 of the files' relative names, sizes and mtimes: a set's identity without reading it."""
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class SampleSet:
    """Images or videos to measure, items 0..count-1 in a fixed order. `read(i)` gives item i as uint8 (H, W, 3) or
    the first `frames` frames (frames, H, W, 3) of a video, or None for a video shorter than that (discarded, as
    StyleGAN-V's discard_short_videos)."""

    name: str
    path: Path
    kind: str  # "images" | "videos"
    count: int

    def identity(self) -> dict:
        raise NotImplementedError

    def read(self, index: int, frames: int) -> Optional[np.ndarray]:
        raise NotImplementedError

    def cut(self, item: np.ndarray, frames: int) -> Optional[np.ndarray]:
        if self.kind == "images":
            return item
        return np.ascontiguousarray(item[:frames]) if len(item) >= frames else None


class ArraySet(SampleSet):
    """uint8 arrays: an .npz (`arr_0` (N, [F,] H, W, 3), sample-many's and DiT's reference batches) or a sample-many
    setting folder (000000.npy, ...)."""

    def __init__(self, path: Path, limit: Optional[int] = None):
        self.path, self.name = path, path.stem
        if path.is_dir():
            self.files = sorted(p for p in path.glob("*.npy") if p.stem.isdigit())
            self.array = None
            total = len(self.files)
            first = np.load(self.files[0], mmap_mode="r") if self.files else None
        else:
            self.files, self.array = [], _npz_array(path)
            total = len(self.array)
            first = self.array[0] if total else None
        if first is None:
            raise EvaluationError(f"{path}: no samples in it")
        self.count = min(total, limit) if limit else total
        self.kind = "images" if _as_frames(np.asarray(first), str(path)).ndim == 3 else "videos"

    def identity(self) -> dict:
        p = self.path.resolve()
        if self.array is not None:
            st = p.stat()
            return {"type": "npz", "path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "count": self.count}
        return {"type": "npy-folder", "path": str(p), "files": _listing_hash(p, self.files[:self.count]), "count": self.count}

    def read(self, index: int, frames: int) -> Optional[np.ndarray]:
        item = np.load(self.files[index]) if self.array is None else np.asarray(self.array[index])
        return self.cut(_as_frames(item, f"{self.path} item {index}"), frames)


class MediaFolder(SampleSet):
    """A folder (searched recursively, sorted by relative path) of videos (PyAV) or images (Pillow)."""

    def __init__(self, path: Path, limit: Optional[int] = None):
        self.path, self.name = path, path.name
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        if videos and images:
            raise EvaluationError(f"{path}: {len(videos)} videos and {len(images)} images; a reference is one or the other")
        if not videos and not images:
            raise EvaluationError(f"{path}: no videos ({', '.join(VIDEO_EXTENSIONS)}) or images "
                                  f"({', '.join(IMAGE_EXTENSIONS)}) in it")
        self.kind = "videos" if videos else "images"
        self.files = (videos or images)[:limit] if limit else (videos or images)
        self.count = len(self.files)
        if self.kind == "images":
            _pillow(self.files[0])

    def identity(self) -> dict:
        p = self.path.resolve()
        return {"type": f"{self.kind}-folder", "path": str(p), "files": _listing_hash(p, self.files), "count": self.count}

    def read(self, index: int, frames: int) -> Optional[np.ndarray]:
        f = self.files[index]
        if self.kind == "images":
            try:
                with _pillow(f).open(f) as image:
                    return np.asarray(image.convert("RGB"))
            except OSError as e:  # PIL's UnidentifiedImageError is one
                raise EvaluationError(f"{f}: not a readable image ({_first_sentence(e)})") from None
        return read_video_start(f, frames)


def _pillow(path: Path):
    try:
        from PIL import Image
    except ImportError:
        raise EvaluationError(f"reading images ({path}) needs Pillow: pip install pillow") from None
    return Image


def read_video_start(path: Path, frames: int) -> Optional[np.ndarray]:
    """The first `frames` frames (frames, H, W, 3) uint8 RGB of a video file (PyAV), or None if it has fewer."""
    import av

    out = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                out.append(frame.to_ndarray(format="rgb24"))
                if len(out) == frames:
                    break
    except (av.error.FFmpegError, IndexError) as e:
        raise EvaluationError(f"{path}: not a readable video ({e})") from None
    return np.stack(out) if len(out) == frames else None


def open_set(path: str | Path, limit: Optional[int] = None) -> SampleSet:
    """An .npz, a sample-many setting folder (000000.npy ...) or a folder of videos / images."""
    p = Path(path)
    if not p.exists():
        raise EvaluationError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix != ".npz":
            raise EvaluationError(f"{p}: expected an .npz of uint8 arrays (arr_0) or a folder")
        return ArraySet(p, limit)
    if any(q.stem.isdigit() for q in p.glob("*.npy")):
        return ArraySet(p, limit)
    return MediaFolder(p, limit)


def sample_sets(path: str | Path) -> list[SampleSet]:
    """What `evaluate` measures: every setting of a sample-many output folder (its summary.json; each setting's
    .npz, or its folder of .npy while the .npz is not written), or the one set given (an .npz or a folder)."""
    p = Path(path)
    summary = p / "summary.json"
    if p.is_dir() and summary.is_file():
        names = [row["setting"] for row in json.loads(summary.read_text())["settings"]]
        sets = []
        for name in names:
            npz = p / f"{name}.npz"
            sets.append(open_set(npz if npz.exists() else p / name))
        return sets
    return [open_set(p)]


# ----------------------------------------------------------------------------- features, cached and sharded


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name) or "set"


def cache_key(sample_set: SampleSet, net: Network, frames: int) -> str:
    """Hash of what the features depend on: the set, the network file and the preprocessing."""
    preprocessing = {"fid": "uint8 NCHW [0, 255] at stored size; net(x, return_features=True)",
                     "fvd": f"first {frames} frames; float32 NCTHW u / 127.5 - 1; "
                            "net(x, rescale=False, resize=True, return_features=True)"}[net.metric]
    material = {"set": sample_set.identity(), "network_sha256": net.sha256, "metric": net.metric,
                "preprocessing": preprocessing, "version": PREPROCESSING_VERSION}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def cache_file(sample_set: SampleSet, net: Network, frames: int, cache_dir: Optional[str | Path]) -> tuple[Path, str]:
    """Where the set's features go (beside the set, or in cache_dir) and the full key they are stored with."""
    key = cache_key(sample_set, net, frames)
    folder = Path(cache_dir) if cache_dir else sample_set.path.resolve().parent
    return folder / f"{_safe(sample_set.name)}.{net.metric}-{key[:16]}.npz", key


def _chunks(count: int, size: int) -> list[range]:
    if size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {size}")
    return [range(s, min(count, s + size)) for s in range(0, count, size)]


def _part(parts: Path, chunk: range) -> Path:
    return parts / f"{chunk.start:09d}-{chunk.stop:09d}.npy"


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def chunk_features(sample_set: SampleSet, net: Network, chunk: range, frames: int) -> np.ndarray:
    """Features (len(chunk), D) float32 of items chunk; NaN rows for discarded (too short) videos. Items of one
    shape go through the network together."""
    out = np.full((len(chunk), FEATURES[net.metric]), np.nan, dtype=np.float32)
    groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    for row, index in enumerate(chunk):
        item = sample_set.read(index, frames)
        if item is not None:
            if (item.ndim == 3) != (net.metric == "fid"):
                raise EvaluationError(f"{sample_set.path} item {index}: shape {item.shape} in a set of {sample_set.kind}")
            groups.setdefault(item.shape, []).append((row, item))
    for members in groups.values():
        rows = [r for r, _ in members]
        out[rows] = network_features(net, np.stack([item for _, item in members]))
    return out


@dataclass
class Features:
    """A set's features (N, D) float32 (main process; None elsewhere), NaN rows for discarded items."""

    features: Optional[np.ndarray]
    cache: Path
    extracted_now: int  # items run through the network in this call, all processes
    from_partial: int  # items whose chunks a previous, unfinished run had written

    @property
    def usable(self) -> np.ndarray:
        return self.features[~np.isnan(self.features).any(axis=1)]


def set_features(sample_set: SampleSet, net: Network, frames: int, batch_size: int,
                 cache_dir: Optional[str | Path] = None, processes: Processes = Processes(),
                 progress: bool = False) -> Features:
    """The set's features from its cache, else extracted (this process: chunks rank, rank + P, ...; each chunk
    saved as it is done, chunks saved by an earlier run reused) and joined into the cache by the main process."""
    # the main process's view decides for all (a set mounted at other paths on other machines would hash apart)
    path, key = processes.gather(cache_file(sample_set, net, frames, cache_dir))[0]
    if processes.gather(path.exists())[0]:
        return Features(_read_cache(path, key, sample_set.count) if processes.main else None, path, 0, 0)
    parts = path.with_name(f".{path.stem}.parts")
    if processes.main:
        try:
            parts.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EvaluationError(f"cannot write the feature cache of {sample_set.path} in {parts.parent} ({e.strerror}): "
                                  "give --cache-dir") from None
        for stale in parts.glob(".*.tmp.npy"):
            stale.unlink()
    processes.barrier()
    chunks = _chunks(sample_set.count, batch_size)
    mine = [c for g, c in enumerate(chunks) if g % processes.world == processes.rank]
    todo = [c for c in mine if not _part(parts, c).exists()]
    if todo:
        net.load()  # a wrong file fails here, before any work
    bar = None
    if progress and processes.main and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"{sample_set.name} ({net.metric} features, main process's chunks)", unit="chunk")
    for chunk in todo:
        values = chunk_features(sample_set, net, chunk, frames)
        _write_atomically(_part(parts, chunk), lambda tmp: np.save(tmp, values))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    now = sum(len(c) for c in todo)
    counts = processes.gather({"now": now, "before": sum(len(c) for c in mine) - now})
    processes.barrier()  # every chunk is written
    features = None
    if processes.main:
        features = np.concatenate([np.load(_part(parts, c)) for c in chunks])
        _write_atomically(path, lambda tmp: np.savez(tmp, features=features, key=np.array(key)))
        shutil.rmtree(parts)
    processes.barrier()
    return Features(features, path, sum(c["now"] for c in counts), sum(c["before"] for c in counts))


def _read_cache(path: Path, key: str, count: int) -> np.ndarray:
    with np.load(path) as npz:
        if "key" not in npz or str(npz["key"]) != key or "features" not in npz or len(npz["features"]) != count:
            raise EvaluationError(f"{path}: a feature cache of another set or network (its key or length differs); "
                                  "delete it")
        return npz["features"]


# ----------------------------------------------------------------------------- the command


def evaluate(samples: str | Path, reference: str | Path, inception: Optional[str] = None, i3d: Optional[str] = None,
             frames: int = 16, batch_size: int = 8, cache_dir: Optional[str] = None,
             max_reference: Optional[int] = None, device: str = "cpu", processes: Processes = Processes(),
             progress: bool = False, log: Callable[[str], None] = print) -> Optional[dict]:
    """FID (images) or FVD (videos) of every set in `samples` (sample_sets) against `reference`; the report (main
    process; None elsewhere): metric, network, frames, the reference's items, one row per set."""
    if frames < 1:
        raise EvaluationError(f"--frames must be at least 1, got {frames}")
    ref = open_set(reference, max_reference)
    sets = sample_sets(samples)
    for s in sets:
        if s.kind != ref.kind:
            raise EvaluationError(f"{s.path} holds {s.kind}, the reference {ref.path} {ref.kind}")
    metric = "fid" if ref.kind == "images" else "fvd"
    net = Network.of(metric, inception if metric == "fid" else i3d, device)
    say = log if processes.main else (lambda line: None)
    unit = "images" if metric == "fid" else f"videos ({frames} frames)"

    def features_of(s: SampleSet, role: str) -> tuple[Features, np.ndarray]:
        f = set_features(s, net, frames, batch_size, cache_dir, processes, progress)
        usable = f.usable if processes.main else None
        how = (f"from cache {f.cache}" if f.extracted_now == 0 and f.from_partial == 0 else
               f"extracted {f.extracted_now} now" + (f", {f.from_partial} from a partial cache" if f.from_partial else "")
               + f" -> {f.cache}")
        short = s.count - len(usable) if processes.main else 0
        dropped = f"; {short} shorter than {frames} frames discarded" if short else ""
        say(f"{role} {s.path}: {s.count} {unit}, features {how}{dropped}")
        return f, usable

    ref_features, ref_usable = features_of(ref, "reference")
    rows = []
    for s in sets:
        f, usable = features_of(s, s.name)
        if processes.main:
            for what, x in ((s.path, usable), (ref.path, ref_usable)):
                if len(x) < 2:
                    short = f" (videos shorter than --frames {frames} are discarded)" if metric == "fvd" else ""
                    raise EvaluationError(f"{what}: {len(x)} usable {unit}{short}; a Fréchet distance needs at least 2")
            rows.append({"setting": s.name, "samples": str(s.path), "items": int(len(usable)),
                         metric: DISTANCES[metric](usable, ref_usable), "features": str(f.cache),
                         "extracted_now": f.extracted_now})
    if not processes.main:
        return None
    return {"metric": metric, "network": {"path": str(net.path), "sha256": net.sha256},
            "frames": frames if metric == "fvd" else None,
            "reference": {"path": str(ref.path), "items": int(len(ref_usable)), "discarded": ref.count - int(len(ref_usable)),
                          "features": str(ref_features.cache), "extracted_now": ref_features.extracted_now},
            "processes": processes.world, "results": rows}


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
