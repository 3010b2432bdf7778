"""Our Skip-DiT models as native ComfyUI models: a model config (`supported_models_base.BASE`) per
family, a `BaseModel` subclass and a `diffusion_model` adapter, wrapped in a `ModelPatcher`, so the
stock KSampler, SamplerCustomAdvanced, schedulers, LoRA loaders and patch nodes take them as a `MODEL`.

The adapter is our skipdit_core model class with a ComfyUI-facing `forward` in front (a subclass made
per family), so the weights keep their names (`diffusion_model.blocks.0.attn.qkv.weight`): LoRA files
made for our checkpoints map onto them, and a saved model keeps the checkpoint layout.
Hunyuan-DiT is not handled here: the loader delegates it to ComfyUI's own model.
"""
from __future__ import annotations

import itertools
import logging

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base

from skipdit_core import models as core_models
from skipdit_core.loading import Checkpoint, load_weights

from . import adapters
from .cache_state import STATE_KEY, current_cut

# ----------------------------------------------------------------------------- latent formats

_SD_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]


class SDVideoLatent(comfy.latent_formats.LatentFormat):
    """Video latents of the SD VAE (sd-vae-ft-ema/mse, as Latte uses), [B, 4, T, H/8, W/8], scale 0.18215."""

    latent_channels = 4
    latent_dimensions = 3
    scale_factor = 0.18215

    def __init__(self):
        self.latent_rgb_factors = _SD_RGB


class PixelVideo(comfy.latent_formats.LatentFormat):
    """Pixel-space video [B, 3, T, H, W] in adapters.PIXEL_RANGE, [-1, 1] (models trained without a VAE):
    the identity, so the sampler's denoised x0 is in pixel values (clamped there: `model_patcher`)."""

    latent_channels = 3
    latent_dimensions = 3
    scale_factor = 1.0
    # Pixels are not downscaled: ComfyUI 0.38's empty-latent and resize paths read this (LatentFormat's
    # default is 8, comfy/latent_formats.py); 0.3.64 does not have it.
    spacial_downscale_ratio = 1

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


class PixelImage(PixelVideo):
    latent_dimensions = 2


def latent_format_for(family: str, in_channels: int) -> comfy.latent_formats.LatentFormat:
    pixels = adapters.latent_space(in_channels) == "pixels"
    if adapters.is_video(family):
        return PixelVideo() if pixels else SDVideoLatent()
    return PixelImage() if pixels else comfy.latent_formats.SD15()


# ----------------------------------------------------------------------------- model config


class SkipDiTModelConfig(comfy.supported_models_base.BASE):
    """ComfyUI's model config of one of our families: the DDPM linear schedule ("sqrt_linear" in
    ComfyUI), epsilon prediction, the family's latent format."""

    unet_extra_config = {}
    memory_usage_factor = 2.0
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    def __init__(self, family: str, in_channels: int):
        super().__init__({"disable_unet_model_creation": True, "image_model": f"skipdit_{family}", "in_channels": in_channels})
        self.family = family
        self.sampling_settings = adapters.sampling_settings(family)
        self.latent_format = latent_format_for(family, in_channels)

    def inpaint_model(self):
        return False


# ----------------------------------------------------------------------------- the adapter


class ComfyForward:
    """ComfyUI's call `(x, t, context=..., y=..., control=..., transformer_options=..., **extra)` -> our
    model's forward, with the Skip-Cache cut of the current call (set by Apply Skip-Cache's APPLY_MODEL
    wrapper in transformer_options). Mixed in front of a skipdit_core model class."""

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        # DIFFUSION_MODEL wrappers run here, as in core models' forward: core EasyCache and other caches
        # that wrap the diffusion model act on ours too.
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._comfy_forward,
            self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options),
        ).execute(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _comfy_forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, encoder_attention_mask=None, **kwargs):
        cut = current_cut(transformer_options.get(STATE_KEY))
        self._ensure_device(x.device)
        family, config = self.family, self.config
        size = x.shape[-2:]
        h = adapters.to_model_layout(family, adapters.pad_to_patch(x, config.patch_size))
        if family == "latte_t2v":
            if context is None:
                raise ValueError("Latte T2V needs text conditioning: use Latte T2V Text Encode with a T5-XXL text encoder")
            out = super().forward(h, timesteps, context, encoder_attention_mask, cut=cut)
        else:
            if family == "latte" and h.shape[1] > config.num_frames and not getattr(self, "_warned_frames", False):
                self._warned_frames = True  # once per model: the sampler calls it every step
                logging.warning(
                    f"Skip-DiT: {h.shape[1]} frames for a Latte trained on {config.num_frames}: the temporal position "
                    "table is extended beyond what it was trained on, expect lower quality"
                )
            labelled = config.num_classes > 0
            if labelled and y is None:
                raise ValueError(
                    f"this {adapters.FAMILY_LABELS[family]} model is class-conditional: condition it with Skip-DiT Class Label"
                )
            out = super().forward(h, timesteps, y if labelled else None, cut=cut)
        return adapters.to_comfy_output(family, out, config.in_channels)[..., : size[0], : size[1]]

    def _ensure_device(self, device: torch.device) -> None:
        # ModelPatcher moves leaf modules only (partial loads): tensors held by non-leaf modules (position
        # tables, LatteT2V's scale_shift_table) would stay behind. Move the whole model if anything did.
        for t in itertools.chain(self.parameters(), self.buffers()):
            if t.device != device:
                logging.debug("Skip-DiT: moving %s to %s", type(self).__name__, device)
                self.to(device)
                return


_ADAPTER_CLASSES: dict[str, type] = {}


def adapter_class(family: str) -> type:
    """`ComfyForward` in front of the family's skipdit_core model class."""
    if family not in _ADAPTER_CLASSES:
        base = core_models.FAMILIES[family].model_cls
        _ADAPTER_CLASSES[family] = type(f"Comfy{base.__name__}", (ComfyForward, base), {})
    return _ADAPTER_CLASSES[family]


# ----------------------------------------------------------------------------- BaseModel


class SkipDiTModel(comfy.model_base.BaseModel):
    """A ComfyUI BaseModel around our adapter: DDPM linear schedule, EPS prediction (V_PREDICTION for a
    model whose config says prediction "v"); the class-label and T5-text conditioning of the family reach
    the adapter through `extra_conds`."""

    def __init__(self, model_config: SkipDiTModelConfig, diffusion_model: torch.nn.Module, device=None):
        v = getattr(diffusion_model.config, "prediction", "eps") == "v"
        model_type = comfy.model_base.ModelType.V_PREDICTION if v else comfy.model_base.ModelType.EPS
        super().__init__(model_config, model_type, device=device)
        self.diffusion_model = diffusion_model
        self.family = model_config.family

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        family, config = self.family, self.diffusion_model.config
        if family in ("dit", "latte"):
            out.pop("c_crossattn", None)  # the class-label conditioning's placeholder tensor carries nothing
            label = kwargs.get(adapters.LABEL_KEY)
            if label is not None and config.num_classes > 0:
                out["y"] = comfy.conds.CONDRegular(adapters.resolve_labels(label, config.num_classes))
        elif family == "latte_t2v":
            cross_attn = kwargs.get("cross_attn")
            if cross_attn is not None:
                # As core PixArt: conditionings of different token counts run in separate batches
                # instead of being repeated to a common length.
                out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
            mask = kwargs.get("attention_mask")
            if mask is not None and cross_attn is not None and mask.shape[-1] == cross_attn.shape[1]:
                out["encoder_attention_mask"] = comfy.conds.CONDRegular(mask.reshape(mask.shape[0], -1))
        return out


WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pick_dtype(weight_dtype: str, sd: dict) -> torch.dtype:
    """The weight dtype option -> a dtype; "default" asks ComfyUI (float32 on the CPU, else by device)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    dtype = WEIGHT_DTYPES[weight_dtype]
    if dtype is not None:
        return dtype
    params = sum(t.numel() for t in sd.values())
    stored = next((t.dtype for t in sd.values() if t.is_floating_point()), None)
    return comfy.model_management.unet_dtype(
        model_params=params, supported_dtypes=SkipDiTModelConfig.supported_inference_dtypes, weight_dtype=stored
    )


def is_pixel_model(model_config: SkipDiTModelConfig) -> bool:
    return isinstance(model_config.latent_format, PixelVideo)


def model_patcher(ckpt: Checkpoint, dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around our model of `ckpt`'s family, its weights loaded strictly. Pixel-space models
    get the clamp of the guided x0 to the pixel range (adapters.clamp_denoised: why it is needed, and why
    after guidance) as a post-CFG function: in model_options, so clones (LoRA, Apply Skip-Cache, ...) keep
    it and every sampler and scheduler sees the clamped x0. Latent models are left as they are."""
    model = adapter_class(ckpt.family)(ckpt.config)
    load_weights(model, ckpt.state_dict, ckpt.path)
    model = model.to(dtype=dtype).eval()
    config = SkipDiTModelConfig(ckpt.family, ckpt.config.in_channels)
    config.set_inference_dtype(dtype, None)
    offload = comfy.model_management.unet_offload_device()
    base = SkipDiTModel(config, model, device=offload)
    base.to(offload)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(), offload_device=offload)
    if is_pixel_model(config):
        patcher.set_model_sampler_post_cfg_function(adapters.clamp_denoised)
    return patcher
