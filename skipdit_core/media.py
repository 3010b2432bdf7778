"""Writing generated frames: .mp4 / .webm / .gif through PyAV, .png for images."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import torch

VIDEO_CODECS = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p"), ".gif": ("gif", "rgb8")}


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(F, C, H, W) in [-1, 1] -> (F, H, W, 3) uint8; one channel is repeated to grey."""
    if video.ndim != 4:
        raise ValueError(f"expected frames (F, C, H, W), got shape {tuple(video.shape)}")
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1)
    frames = ((video[:, :3].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def write_video(path: str, video: torch.Tensor, fps: int = 8) -> None:
    """Write (F, C, H, W) frames in [-1, 1] to .mp4, .webm or .gif (chosen by the extension)."""
    import av

    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_CODECS:
        raise ValueError(f"{path}: unsupported video extension {ext!r}; use one of {', '.join(VIDEO_CODECS)}")
    codec, pix_fmt = VIDEO_CODECS[ext]
    frames = to_uint8_frames(video)
    h, w = frames.shape[1:3]
    if codec != "gif" and (h % 2 or w % 2):  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "12"}  # small videos: keep them close to the generated frames
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_png(path: str, image: torch.Tensor) -> None:
    """Write one (C, H, W) image in [-1, 1] as an 8-bit RGB PNG."""
    rgb = to_uint8_frames(image[None])[0]
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def read_video(path: str) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a video file (for tests and comparisons)."""
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of two tensors in a range of width `data_range`."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over frames, channels and pixels (Wang et al. 2004) as torchmetrics'
    `structural_similarity_index_measure` computes it by default, equal to it to 1e-6
    (tests/test_media.py): an 11x11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03, the frame
    reflect-padded by 5 px so every pixel has a window, variances clamped at 0. a, b: (..., H, W).
    Frames of 5 px or less (where reflect padding by 5 cannot be done) take the largest window that
    fits, with the same sigma; no standard figure exists there."""
    import torch.nn.functional as F

    x = a.double().reshape(-1, 1, *a.shape[-2:])
    y = b.double().reshape(-1, 1, *b.shape[-2:])
    pad = min(5, x.shape[-1] - 1, x.shape[-2] - 1)
    coords = torch.arange(2 * pad + 1, dtype=torch.float64) - pad
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]
    blur = lambda z: F.conv2d(F.pad(z, (pad, pad, pad, pad), mode="reflect"), window)  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy = (blur(x * x) - mx**2).clamp(min=0), (blur(y * y) - my**2).clamp(min=0)
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
