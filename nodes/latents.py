"""Video latents for Latte shapes, and video latents -> IMAGE frames (for core CreateVideo / SaveVideo)."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from . import adapters

SPACES = {"SD VAE latents (4 ch, 1/8 size)": (4, 8), "pixels (3 ch)": (3, 1)}
DECODE_CHUNK = 8  # frames per VAE call


class EmptyLatteLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SkipDiTEmptyLatteLatent",
            display_name="Empty Latte Latent",
            category="Skip-DiT",
            description=(
                "An empty video latent [batch, channels, frames, height, width] for Latte / Latte T2V: SD VAE latents "
                "at 1/8 of the pixel size, or pixels for models trained without a VAE."
            ),
            inputs=[
                io.Int.Input("width", default=256, min=8, max=8192, step=8, tooltip="Pixels."),
                io.Int.Input("height", default=256, min=8, max=8192, step=8, tooltip="Pixels."),
                io.Int.Input("length", default=16, min=1, max=1024, tooltip="Frames. Latte class-to-video: up to the model's num_frames as trained; more run with an extended temporal position table and a warning in the log. Latte T2V: at most its video_length (16), more are refused."),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Combo.Input("space", options=list(SPACES), default=next(iter(SPACES)),
                               tooltip="What the model denoises: SD VAE latents (the released Latte models) or pixels."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, width, height, length, batch_size, space) -> io.NodeOutput:
        channels, down = SPACES[space]
        latent = torch.zeros(
            [batch_size, channels, length, height // down, width // down], device=comfy.model_management.intermediate_device()
        )
        return io.NodeOutput({"samples": latent})


class DecodeVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SkipDiTDecodeVideo",
            display_name="Decode Video Latent",
            category="Skip-DiT",
            description=(
                "Video latents [B, C, T, H, W] (or images) -> IMAGE frames, every video's frames in order: through an "
                "image VAE frame by frame, or directly for pixel-space models (no VAE connected). Feed the frames to "
                "Create Video / Save Video."
            ),
            inputs=[
                io.Latent.Input("samples"),
                io.Vae.Input("vae", optional=True, tooltip="The image VAE of the model (SD VAE for Latte); leave empty for pixel-space models."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae=None) -> io.NodeOutput:
        frames = adapters.video_latent_to_frames(samples["samples"])
        if vae is None:
            return io.NodeOutput(adapters.pixels_to_images(frames))
        if getattr(vae, "latent_dim", 2) != 2:
            raise ValueError("this is a video VAE: decode its latents with ComfyUI's VAE Decode")
        bar = comfy.utils.ProgressBar(frames.shape[0])
        images = []
        for i in range(0, frames.shape[0], DECODE_CHUNK):
            comfy.model_management.throw_exception_if_processing_interrupted()
            chunk = frames[i : i + DECODE_CHUNK]
            images.append(vae.decode(chunk))
            bar.update(chunk.shape[0])
        out = torch.cat(images)
        if out.ndim == 5:  # some VAEs return [N, 1, H, W, 3]
            out = out.flatten(0, 1)
        return io.NodeOutput(out)
