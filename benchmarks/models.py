"""Denoisers to benchmark, built from configs with random (seeded) weights, and their call inputs.

Sizes: ``tiny`` (the tiny test configs), ``mid`` (real widths, one or two blocks: what a
2-core CPU can run), ``full`` (the released configs: SDXL, FLUX.1 [dev], FLUX.2 [klein] 4B,
Qwen-Image; for a GPU). Inputs are shaped like the stock pipeline's call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["KINDS", "SIZES", "IMAGE_PX", "TEXT_TOKENS", "CONFIGS", "build_denoiser", "CallInputs", "make_inputs",
           "lora_targets", "add_peft"]

KINDS = ("sdxl", "flux", "flux2-klein", "qwen-image")
SIZES = ("tiny", "mid", "full")
IMAGE_PX = {"tiny": 64, "mid": 128, "full": 1024}
TEXT_TOKENS = {"tiny": 16, "mid": 16, "full": 512}

_SDXL_FULL = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
_FLUX_FULL = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
_KLEIN_FULL = dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                   axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
_QWEN_FULL = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
CONFIGS = {
    ("sdxl", "full"): _SDXL_FULL,
    #: SDXL widths, one resnet + one transformer layer per level (7 transformer blocks, 70 layers).
    ("sdxl", "mid"): dict(_SDXL_FULL, sample_size=16, layers_per_block=1, transformer_layers_per_block=1),
    ("flux", "full"): _FLUX_FULL,
    #: Real inner dim, one block of each type; 16 input channels (the tiny VAE's 4 latent channels, packed).
    ("flux", "mid"): dict(_FLUX_FULL, in_channels=16, num_layers=1, num_single_layers=1),
    ("flux2-klein", "full"): _KLEIN_FULL,
    ("flux2-klein", "mid"): dict(_KLEIN_FULL, in_channels=16, num_layers=1, num_single_layers=1),
    ("qwen-image", "full"): _QWEN_FULL,
    ("qwen-image", "mid"): dict(_QWEN_FULL, in_channels=16, out_channels=4, num_layers=2),
}
_CLASSES = {"sdxl": "UNet2DConditionModel", "flux": "FluxTransformer2DModel",
            "flux2-klein": "Flux2Transformer2DModel", "qwen-image": "QwenImageTransformer2DModel"}
_TINY_CASES = {"sdxl": "sdxl", "flux": "flux", "flux2-klein": "flux2-klein", "qwen-image": "qwen-image"}


def build_denoiser(kind: str, size: str, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised denoiser of ``kind`` at ``size`` on ``device``/``dtype``, in eval mode.

    ``device="meta"`` builds the module tree without memory (for host-side measurements).
    """
    if size == "tiny":
        from tlora_diffusers.testing import tiny_case

        pipe = tiny_case(_TINY_CASES[kind]).build(seed)
        model = pipe.unet if kind == "sdxl" else pipe.transformer
        return model.to(device=device, dtype=dtype).eval()
    import diffusers

    cls = getattr(diffusers, _CLASSES[kind])
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # initialise directly in bf16 on the GPU: no fp32 copy of 12B params
        try:
            model = cls(**CONFIGS[(kind, size)])
        finally:
            torch.set_default_dtype(previous)
    return model.eval()


@dataclass
class CallInputs:
    """One denoiser call as its stock pipeline makes it, at any timestep (scheduler units)."""

    kind: str
    args: tuple
    kwargs: dict
    device: torch.device

    def at(self, t: float) -> tuple[tuple, dict]:
        if self.kind == "sdxl":  # 0-d float32 in scheduler units, 2nd positional (FACTS.md)
            return (self.args[0], torch.tensor(float(t), device=self.device)), self.kwargs
        batch = self.kwargs["hidden_states"].shape[0]
        timestep = torch.full((batch,), t / 1000.0, device=self.device)  # the flow families pass t/1000, (B,)
        return self.args, dict(self.kwargs, timestep=timestep)


def make_inputs(kind: str, size: str, model: nn.Module, seed: int = 0, batch: int = 1,
                image_tokens: int | None = None) -> CallInputs:
    """Random inputs shaped like the pipeline's call (SDXL: CFG doubles ``batch``); ``image_tokens`` overrides
    the image size for the transformer families (a square number)."""
    param = next(model.parameters())
    dev, dt = param.device, param.dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dt)

    cfg = model.config
    latent = IMAGE_PX[size] // 8
    if kind == "sdxl":
        b = 2 * batch
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[IMAGE_PX[size], IMAGE_PX[size], 0, 0, IMAGE_PX[size], IMAGE_PX[size]]] * b)
        kwargs = dict(encoder_hidden_states=randn(b, 77, cfg.cross_attention_dim),
                      added_cond_kwargs={"text_embeds": randn(b, pooled), "time_ids": time_ids.to(device=dev, dtype=dt)},
                      return_dict=False)
        return CallInputs(kind, (randn(b, cfg.in_channels, latent, latent),), kwargs, dev)
    tokens = image_tokens or (latent // 2) ** 2
    side = int(round(tokens ** 0.5))
    text = TEXT_TOKENS[size]
    kwargs: dict[str, Any] = dict(hidden_states=randn(batch, tokens, cfg.in_channels),
                                  encoder_hidden_states=randn(batch, text, cfg.joint_attention_dim), return_dict=False)
    if kind == "flux":
        kwargs.update(pooled_projections=randn(batch, cfg.pooled_projection_dim),
                      img_ids=torch.zeros(tokens, 3, device=dev, dtype=dt), txt_ids=torch.zeros(text, 3, device=dev, dtype=dt))
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), 3.5, device=dev, dtype=torch.float32)
    elif kind == "flux2-klein":
        kwargs.update(img_ids=torch.zeros(batch, tokens, 4, device=dev, dtype=torch.long),
                      txt_ids=torch.zeros(batch, text, 4, device=dev, dtype=torch.long), guidance=None)
    else:  # qwen-image
        kwargs.update(encoder_hidden_states_mask=torch.ones(batch, text, device=dev, dtype=torch.long),
                      img_shapes=[[(1, side, side)]] * batch)
    return CallInputs(kind, (), kwargs, dev)


def lora_targets(model: nn.Module) -> list[str]:
    """The model family's default targets (the trainer's), resolved to full module paths."""
    from tlora_diffusers.training import default_targets, resolve_targets

    return resolve_targets(model, default_targets(model))


def add_peft(model: nn.Module, rank: int, targets: list[str], seed: int = 0) -> int:
    """A PEFT LoRA (non-zero A and B) on ``targets``; returns the number of adapted layers."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name and not p.is_meta:
                    p.normal_(0, 0.02)
    return len(targets)
