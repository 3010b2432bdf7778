"""Load Skip Branches: a Skip-Wan's skip branches (`skipdit extract-branches`) on ComfyUI's own Wan.

Files come from the pack's `skipdit_branches` folder (`models/skipdit_branches/`, registered here;
`extra_model_paths.yaml` may add more under that name). The node clones the core Wan MODEL and gives the blocks
that send or receive a long skip `double_block` replace patches (`branch_patch.SkipBranchPatch`, wrapping any patch
already set on that block); the base weights, fp8 or not, and the LoRAs patched into them are untouched. Apply
Skip-Cache, connected after it, cuts the model's long skips (`UStack(L, S)`, `skip_cache_patch.cache_target`).
"""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy.ldm.wan.model import WanModel
from comfy_api.latest import io

from skipdit_core.skip_branches import BranchFileError, load_branches

from .branch_patch import BRANCHES_KEY, SkipBranchPatch, SkipBranchSet, core_wan_problem
from .cache_state import STATE_KEY

FOLDER = "skipdit_branches"


def register_branch_folder() -> None:
    """models/skipdit_branches/ (under ComfyUI's models directory, so --base-directory moves it too)."""
    path = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, path)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([path], {".safetensors"})


def branch_names() -> list[str]:
    return sorted(folder_paths.get_filename_list(FOLDER))


def apply_branches(model, path: str):
    """(a clone of the core Wan MODEL with the file's skip branches, the SkipBranchSet); ValueError (one line)
    for a model they cannot go on or a file that does not fit it."""
    dm = getattr(model.model, "diffusion_model", None)
    problem = core_wan_problem(dm, WanModel)
    if problem:
        raise ValueError(problem)
    options = model.model_options.get("transformer_options", {})
    if BRANCHES_KEY in options:
        raise ValueError("Load Skip Branches: this model already has skip branches (the node is applied twice)")
    if STATE_KEY in options:
        raise ValueError("Load Skip Branches: Apply Skip-Cache is already on this model; connect Load Skip Branches "
                         "before Apply Skip-Cache")
    in_channels = int(dm.patch_embedding.weight.shape[1])
    try:
        sd, info = load_branches(path, num_layers=len(dm.blocks), dim=int(dm.dim), in_channels=in_channels)
    except BranchFileError as e:
        raise ValueError(str(e)) from None
    branches = SkipBranchSet(sd, info)
    patched = model.clone()
    patched.model_options["transformer_options"][BRANCHES_KEY] = branches
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in branches.blocks():
        patched.set_model_patch_replace(SkipBranchPatch(branches, i, existing.get(("double_block", i))), "dit",
                                        "double_block", i)
    return patched, branches


class LoadSkipBranches(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SkipDiTLoadSkipBranches",
            display_name="Load Skip Branches",
            category="Skip-DiT",
            description=(
                "Puts a Skip-Wan's long skip branches (a file of `skipdit extract-branches`, a few percent of the "
                "model) on ComfyUI's Wan from core Load Diffusion Model: the result is the Skip-Wan. The base weights "
                "(fp8 or not) and LoRAs are untouched. Connect it before Apply Skip-Cache, which then caches across the "
                "long skips."
            ),
            inputs=[
                io.Model.Input("model", tooltip="ComfyUI's Wan 2.1 / 2.2 (core Load Diffusion Model): the base the "
                               "branches were trained on."),
                io.Combo.Input("branches", options=branch_names(),
                               tooltip="A skip-branches file in models/skipdit_branches."),
            ],
            outputs=[io.Model.Output(tooltip="The Skip-Wan; the input model is unchanged.")],
        )

    @classmethod
    def validate_inputs(cls, branches):
        if branches is not None and branches not in branch_names():
            return f"{branches!r} is not in models/{FOLDER} (put the skip-branches file there, or pick another)"
        return True

    @classmethod
    def execute(cls, model, branches) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, branches)
        patched, branch_set = apply_branches(model, path)
        logging.info(f"Load Skip Branches: {branches}: {branch_set.describe()}")
        return io.NodeOutput(patched)


register_branch_folder()
