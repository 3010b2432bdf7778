"""A test-only ComfyUI custom node folder: one route, GET /skipdit_probe/memory, that reports what the
soak test (tests/test_comfyui_soak.py) checks between runs. It is linked into a test server's
custom_nodes/ by `comfyui_server.make_base_dir(probe=True)`, never shipped with the pack.

The answer, after a full garbage collection:
- `skip_cache_objects`: live instances of the pack's per-run Skip-Cache classes (SkipCacheState,
  SkipCacheRun, CutForecast), by class name; between runs there must be none.
- `skip_cache_tensors`: tensors reachable from those objects (count and bytes).
- `tensors` / `tensor_bytes`: every torch tensor the garbage collector tracks (models, ComfyUI's output
  cache, ...), to see that nothing accumulates run after run.
- `output_cache_tensor_bytes`: the part of those reachable from ComfyUI's own output caches (the objects of
  `comfy_execution.caching`). ComfyUI 0.33's default "RAM pressure" cache keeps every earlier prompt's outputs
  until memory runs short, by design; the soak tells that growth from the pack's.
- `rss_bytes` / `peak_rss_bytes`: the server process's resident memory now and at its peak (VmRSS and
  VmHWM of /proc/self/status). With `?reset_peak=1` the peak is reset after reading (Linux's
  /proc/self/clear_refs "5"), so the next answer gives the peak since this one: one run's peak.
"""
from __future__ import annotations

import gc
import sys

import torch
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS: dict = {}
PER_RUN_CLASSES = ("SkipCacheState", "SkipCacheRun", "CutForecast", "_Track")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _tensors_in(obj, seen: set) -> list:
    """Tensors reachable from `obj` through attributes, dicts, lists and tuples (not through modules)."""
    out, stack = [], [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, torch.nn.Module):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, dict):
            stack += list(item.values())
        elif isinstance(item, (list, tuple)):
            stack += list(item)
        elif hasattr(item, "__dict__"):
            stack += list(vars(item).values())
    return out


@PromptServer.instance.routes.get("/skipdit_probe/memory")
async def memory(request):
    gc.collect()
    per_run: dict[str, int] = {}
    held, seen = [], set()
    tensors, tensor_bytes = 0, 0
    output_cache, cache_seen = [], set()
    for obj in gc.get_objects():
        name = type(obj).__name__
        if type(obj).__module__ == "comfy_execution.caching" and not isinstance(obj, type):
            output_cache += _tensors_in(obj, cache_seen)
        if name in PER_RUN_CLASSES and type(obj).__module__.split(".")[-1] in ("cache_state", "skip_cache"):
            per_run[name] = per_run.get(name, 0) + 1
            held += _tensors_in(obj, seen)
        elif isinstance(obj, torch.Tensor):
            tensors += 1
            tensor_bytes += obj.numel() * obj.element_size()
    answer = {
        "skip_cache_objects": per_run,
        "skip_cache_tensors": len(held),
        "skip_cache_tensor_bytes": sum(t.numel() * t.element_size() for t in held),
        "tensors": tensors,
        "tensor_bytes": tensor_bytes,
        "output_cache_tensor_bytes": sum(t.numel() * t.element_size() for t in output_cache),
        "rss_bytes": _status_bytes("VmRSS"),
        "peak_rss_bytes": _status_bytes("VmHWM"),
        "python": sys.version.split()[0],
    }
    if request.query.get("reset_peak") == "1":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return web.json_response(answer)
