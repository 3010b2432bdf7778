"""The pack's ComfyExtension: the node list ComfyUI registers (V3 API)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .branches import LoadSkipBranches
from .conditioning import ClassLabel, LatteT2VTextEncode
from .latents import DecodeVideo, EmptyLatteLatent
from .loader import LoadSkipDiTModel
from .skip_cache_patch import ApplySkipCache

NODES = [LoadSkipDiTModel, LoadSkipBranches, ApplySkipCache, ClassLabel, LatteT2VTextEncode, EmptyLatteLatent, DecodeVideo]


class SkipDiTExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
