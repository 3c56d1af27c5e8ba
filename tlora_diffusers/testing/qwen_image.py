"""Tiny Qwen-Image pipelines (text-to-image and Edit), run from prompt embeddings."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import finish, randn

_Z_DIM = 4  # latent channels; the transformer sees 2x2-packed latents (4 * z_dim)
_JOINT_DIM = 16  # Qwen2.5-VL hidden size stand-in
_TEXT_LEN = 8
_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)


def _transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * _Z_DIM, out_channels=_Z_DIM, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_JOINT_DIM, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )


def _vae():
    """A 16x-downsampling Qwen-Image VAE, 2 channels wide with no residual blocks.

    The Edit pipeline always resizes its input image to about 1024x1024 and encodes it; a
    narrow, deep VAE keeps that encode near 0.3 s on one thread and the image at 32x32 latents.
    """
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=2, z_dim=_Z_DIM, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=0,
        temperal_downsample=[False, True, True, False], latents_mean=[0.0] * _Z_DIM, latents_std=[1.0] * _Z_DIM,
    )


def _scheduler():
    """Qwen-Image's scheduler: exponential dynamic shift with a terminal shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )


def _build(cls_name: str, seed: int):
    import diffusers

    def make():
        parts = {"transformer": _transformer(), "vae": _vae(), "scheduler": _scheduler(),
                 "text_encoder": None, "tokenizer": None}
        if cls_name == "QwenImageEditPipeline":
            parts["processor"] = None
        return getattr(diffusers, cls_name)(**parts)

    return finish(seeded(seed, make))


def _embeds(g):
    import torch

    # True CFG needs `true_cfg_scale > 1` and negative embeddings: a second transformer call.
    return {
        "prompt_embeds": randn(g, 1, _TEXT_LEN, _JOINT_DIM),
        "prompt_embeds_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "negative_prompt_embeds": randn(g, 1, _TEXT_LEN, _JOINT_DIM),
        "negative_prompt_embeds_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "true_cfg_scale": 4.0,
    }


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {**_embeds(g), "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
            "generator": torch.Generator().manual_seed(seed)}


def _edit_inputs(pipe, seed: int) -> dict:
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    return {**_embeds(g), "image": Image.fromarray(pixels), "height": 64, "width": 64, "num_inference_steps": 2,
            "output_type": "latent", "generator": torch.Generator().manual_seed(seed)}


CASES = [
    TinyCase(
        name="qwen-image", family="qwen-image", pipeline="QwenImagePipeline",
        build=lambda seed: _build("QwenImagePipeline", seed), inputs=_inputs, lora_targets=_TARGETS,
    ),
    TinyCase(
        name="qwen-image-edit", family="qwen-image", pipeline="QwenImageEditPipeline",
        build=lambda seed: _build("QwenImageEditPipeline", seed), inputs=_edit_inputs, lora_targets=_TARGETS,
    ),
]
