"""Tiny Wan pipelines: Wan 2.1 T2V and I2V, Wan 2.2 A14B (two experts) and TI2V-5B (per-token timesteps).

The transformers keep the real module names (``blocks.N.attn1/attn2/ffn``); the VAEs are
the Wan 2.1 (16 channels, 8x spatial) and Wan 2.2 (48 channels, 16x spatial, patchified)
``AutoencoderKLWan`` at their smallest widths; the schedulers are the checkpoints' flow
UniPC. Prompts are passed as embeddings, so no T5 is built; the 2.1 I2V case builds a
2-layer CLIP vision tower because that pipeline encodes its conditioning image itself.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 16  # umT5 hidden size stand-in (4096 in the checkpoints)
_IMAGE_DIM = 8  # CLIP vision hidden size stand-in (1280 in Wan 2.1 I2V)
_INNER = 24  # 2 heads x 12: the smallest head width whose rotary split (t, h, w) is even
_TEXT_CONTEXT = 512  # the I2V cross-attention splits image tokens off at `len - 512` (hardcoded)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def _transformer(in_channels: int, out_channels: int, *, image: bool = False):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=_INNER // 2, in_channels=in_channels,
        out_channels=out_channels, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        image_dim=_IMAGE_DIM if image else None, added_kv_proj_dim=_INNER if image else None,
    )


def _vae21():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _vae22():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
        latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
    )


def _scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=flow_shift)


def _clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=_IMAGE_DIM, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8)
    return CLIPVisionModel(config)


def _clip_processor():
    from transformers import CLIPImageProcessor  # without torchvision, transformers 5 falls back to its PIL backend

    return CLIPImageProcessor(crop_size=32, size=32)


def _build_t2v(seed: int) -> Any:
    from diffusers import WanPipeline

    return finish(WanPipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(3.0),
        transformer=seeded(seed, lambda: _transformer(16, 16)),
    ))


def _build_i2v(seed: int) -> Any:
    from diffusers import WanImageToVideoPipeline

    return finish(WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(3.0),
        image_processor=_clip_processor(), image_encoder=seeded(seed, _clip_vision),
        transformer=seeded(seed, lambda: _transformer(16 + 4 + 16, 16, image=True)),  # noise + mask + image latents
    ))


def _build_a14b(seed: int) -> Any:
    from diffusers import WanPipeline

    # Two experts with different weights: `transformer` while t >= 875, `transformer_2` below.
    return finish(WanPipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(3.0),
        transformer=seeded(seed, lambda: _transformer(16, 16)),
        transformer_2=seeded(seed + 1, lambda: _transformer(16, 16)),
        boundary_ratio=0.875,
    ))


def _build_ti2v(seed: int) -> Any:
    from diffusers import WanImageToVideoPipeline

    return finish(WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae22), scheduler=_scheduler(5.0),
        image_processor=None, image_encoder=None, transformer=seeded(seed, lambda: _transformer(48, 48)),
        transformer_2=None, boundary_ratio=None, expand_timesteps=True,
    ))


def _text(g: torch.Generator, like: torch.Tensor, length: int) -> torch.Tensor:
    """Prompt embeddings as the pipeline's T5 path returns them: TEXT_LEN tokens, zero-padded to ``length``."""
    x = torch.zeros(1, length, _TEXT_DIM)
    x[:, :TEXT_LEN] = randn(g, 1, TEXT_LEN, _TEXT_DIM)
    return x.to(device=like.device, dtype=like.dtype)


def _image(g: torch.Generator, size: int):
    from PIL import Image

    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _inputs(*, steps: int = 2, size: int = 16, frames: int = 5, image: bool = False, context: int = TEXT_LEN):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        denoiser = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        like = torch.empty(0, dtype=denoiser.dtype, device=denoiser.device)
        kwargs = dict(
            prompt_embeds=_text(g, like, context), negative_prompt_embeds=_text(g, like, context),
            height=size, width=size, num_frames=frames, num_inference_steps=steps, output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        )
        if image:
            kwargs["image"] = _image(g, size)
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="wan", family="wan", pipeline="WanPipeline", build=_build_t2v, inputs=_inputs(),
        lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="wan-i2v", family="wan", pipeline="WanImageToVideoPipeline", build=_build_i2v,
        inputs=_inputs(image=True, context=_TEXT_CONTEXT),
        lora_targets=_LORA_TARGETS + ("add_k_proj", "add_v_proj"),
    ),
    TinyCase(
        name="wan2.2-a14b", family="wan", pipeline="WanPipeline", build=_build_a14b, inputs=_inputs(),
        lora_targets=_LORA_TARGETS, denoiser_attrs=("transformer", "transformer_2"),
    ),
    TinyCase(
        name="wan2.2-ti2v-5b", family="wan", pipeline="WanImageToVideoPipeline", build=_build_ti2v,
        inputs=_inputs(size=32, frames=9, image=True), lora_targets=_LORA_TARGETS, per_token=True,
    ),
]
