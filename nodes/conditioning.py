"""Conditioning for the families: class labels (DiT, Latte class-to-video) and T5 text (Latte T2V).
Hunyuan-DiT is conditioned by ComfyUI's own nodes (CLIPTextEncode with its text encoders)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from . import adapters


def label_conditioning(label: int):
    # The tensor is a placeholder so that core conditioning nodes (combine, zero-out, timestep range) can
    # handle it; our model reads only the label (BaseModel.extra_conds -> y).
    return [[torch.zeros(1, 1, 1), {adapters.LABEL_KEY: int(label)}]]


class ClassLabel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SkipDiTClassLabel",
            display_name="Skip-DiT Class Label",
            category="Skip-DiT",
            description=(
                "Class conditioning for DiT (class-to-image) and Latte (class-to-video): positive = the class, "
                "negative = the null label for classifier-free guidance. Unconditional Latte models ignore it."
            ),
            inputs=[io.Int.Input("class_label", default=0, min=0, max=100000, tooltip="0 .. the model's classes - 1 (UCF101: 0..100, ImageNet: 0..999).")],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative", tooltip="The null label (CFG's unconditional half)."),
            ],
        )

    @classmethod
    def execute(cls, class_label) -> io.NodeOutput:
        return io.NodeOutput(label_conditioning(class_label), label_conditioning(adapters.NULL_LABEL))


class LatteT2VTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SkipDiTLatteT2VTextEncode",
            display_name="Latte T2V Text Encode",
            category="Skip-DiT",
            description=(
                "Encodes a prompt for Latte T2V with a T5-XXL text encoder loaded by Load CLIP (type: pixart), cut to "
                "the 120 tokens Latte was trained with. Use an empty prompt for the negative."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="T5-XXL (Load CLIP, type pixart)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True),
                io.Int.Input("max_tokens", default=120, min=1, max=512, tooltip="Latte T2V: 120."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, text, max_tokens) -> io.NodeOutput:
        if clip is None:
            raise ValueError("Latte T2V Text Encode needs a text encoder: Load CLIP with a T5-XXL file, type pixart")
        tokens = adapters.truncate_tokens(clip.tokenize(text), max_tokens)
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens))
