"""The ComfyUI nodes of the Skip-DiT pack: thin adapters over `skipdit_core`.

Two kinds of modules live here:

- ComfyUI-free logic, importable (and tested) without ComfyUI: `adapters` (layouts, learned-variance
  channels, labels, schedules per family, checkpoint kinds, frames), `cache_state` (the per-run
  Skip-Cache bookkeeping around `skipdit_core.skip_cache.SkipCacheRun`), `branch_patch` (the block patches that
  put a Skip-Wan's skip branches on core Wan).
- Modules ComfyUI imports through the pack's entry point (`extension`), which import ComfyUI:
  `comfy_model`, `loader`, `branches`, `skip_cache_patch`, `latents`, `conditioning`.

This file imports nothing, so `import nodes.adapters` works in CI without ComfyUI.
"""
