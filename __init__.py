"""ComfyUI entry point of the Skip-DiT node pack (V3 node API).

Drop this repository into `ComfyUI/custom_nodes/`. ComfyUI imports this file as a package and calls
`comfy_entrypoint()`; the nodes live in `nodes/` (which import ComfyUI), the models in `skipdit_core`
(plain PyTorch). Nothing here imports ComfyUI, so importing this file never fails on its own; pytest
does not import it at all (tests/pytest_rootdir.py).
"""
import importlib
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _import_skipdit_core():
    """Make `import skipdit_core` resolve to this pack's copy without leaving the pack folder on sys.path
    (its `nodes/` would shadow ComfyUI's `nodes` module)."""
    loaded = sys.modules.get("skipdit_core")
    if loaded is not None:
        where = os.path.dirname(os.path.dirname(os.path.abspath(loaded.__file__)))
        if where != _HERE:
            logging.warning("Skip-DiT: using skipdit_core from %s, not the one in %s", where, _HERE)
        return loaded
    sys.path.insert(0, _HERE)
    try:
        return importlib.import_module("skipdit_core")
    finally:
        sys.path.remove(_HERE)


async def comfy_entrypoint():
    _import_skipdit_core()
    from .nodes.extension import SkipDiTExtension

    return SkipDiTExtension()
