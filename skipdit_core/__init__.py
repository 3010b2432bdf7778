"""skipdit_core: Skip-DiT models (Latte, Latte T2V, DiT, Hunyuan-DiT), checkpoint loading and
Skip-Cache, in plain PyTorch. Never imports ComfyUI; the node pack in `nodes/` adapts it."""
from .loading import Checkpoint, CheckpointError, convert_to_safetensors, inspect_checkpoint, load_model
from .models import FAMILIES, StackCut, UStack, build_model, identify_family, make_config

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CheckpointError", "convert_to_safetensors", "inspect_checkpoint", "load_model",
    "FAMILIES", "StackCut", "UStack", "build_model", "identify_family", "make_config", "__version__",
]
