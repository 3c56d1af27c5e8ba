"""Tiny HunyuanVideo relatives: FramePack image-to-video and the HunyuanVideo 1.5 modular pipeline.

FramePack (``HunyuanVideoFramepackPipeline``) keeps HunyuanVideo's double/single-stream blocks and
adds the history embedder (``clean_x_embedder``, Conv3d at 1x/2x/4x) and the SigLIP image projection;
it generates the video in sections of ``latent_window_size`` latent frames, each section a full
denoising loop (the scheduler's timesteps are set again per section, so ``t`` restarts at 1000).
The case runs two sections of two steps. Its latent output is a list of per-section tensors, so
the case decodes (``output_type="pt"``) with the tiny HunyuanVideo VAE. A 1-layer SigLIP vision
tower encodes the image (the pipeline has no image-embedding argument).

``HunyuanVideo15ModularPipeline`` is the modular form of HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``).
Its text-encoder block always encodes prompts, so the case runs the core denoise blocks
(``HunyuanVideo15CoreDenoiseStep``: inputs, set_timesteps, prepare_latents, denoise) with prompt
embeddings and returns ``output="latents"``. CFG goes through the ``ClassifierFreeGuidance`` guider:
two separate batch-1 transformer calls per step; the guider keeps the loop's ``t``
(``guider.set_state(step=i, ..., timestep=t)``). T2V feeds 729 zero SigLIP tokens (masked out).
The i2v case runs ``HunyuanVideo15Image2VideoCoreDenoiseStep`` with given ``image_latents`` and a
``use_meanflow=True`` transformer, which also receives ``timestep_r`` (the next loop timestep). Its
SigLIP ``image_embeds`` cannot be passed: the T2V latents step before it outputs zeros under that
name, so the core i2v blocks ignore the input (diffusers 0.42.1).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 16  # Llama (FramePack) / Qwen2.5-VL (1.5) hidden size stand-in
_POOLED_DIM = 8  # CLIP-L pooled size stand-in (FramePack)
_IMAGE_DIM = 8  # SigLIP hidden size stand-in (1152)
_BYT5_DIM = 8  # ByT5 hidden size stand-in (1472, HunyuanVideo 1.5)
# The core denoise blocks have no VAE; without one the pipeline assumes the 1.5 VAE: 32 channels, 16x spatial.
_HV15_LATENT = 32
_FRAMEPACK_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
)
_HV15_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


def _hunyuan_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )


def _framepack_transformer():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=_TEXT_DIM, pooled_projection_dim=_POOLED_DIM, rope_axes_dim=(2, 4, 4),
        has_image_proj=True, image_proj_dim=_IMAGE_DIM, has_clean_x_embedder=True,
    )


def _siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(hidden_size=_IMAGE_DIM, intermediate_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=32, patch_size=8))


def _build_framepack(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
    from transformers import SiglipImageProcessor  # without torchvision, transformers 5 falls back to PIL

    return finish(HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, transformer=seeded(seed, _framepack_transformer),
        vae=seeded(seed, _hunyuan_vae), scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0),
        text_encoder_2=None, tokenizer_2=None, image_encoder=seeded(seed, _siglip),
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    ))


def _framepack_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    return dict(
        image=torch.rand(1, 3, 16, 16, generator=g),
        prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        prompt_attention_mask=torch.ones(1, TEXT_LEN, dtype=torch.long, device=like.device),
        pooled_prompt_embeds=randn(g, 1, _POOLED_DIM, like=like),
        # 2-latent-frame windows (5 frames); 9 frames -> 2 sections, each its own 2-step loop.
        height=16, width=16, num_frames=9, latent_window_size=2, num_inference_steps=2, output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    )


def _hv15_transformer(meanflow: bool = False):
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=_HV15_LATENT * 2 + 1, out_channels=_HV15_LATENT, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=_TEXT_DIM,
        text_embed_2_dim=_BYT5_DIM, image_embed_dim=_IMAGE_DIM, rope_axes_dim=(2, 2, 4), target_size=32,
        task_type="i2v" if meanflow else "t2v", use_meanflow=meanflow,
    )


def _build_hv15(seed: int, i2v: bool = False) -> Any:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines.hunyuan_video1_5 import modular_blocks_hunyuan_video1_5 as blocks

    core = blocks.HunyuanVideo15Image2VideoCoreDenoiseStep if i2v else blocks.HunyuanVideo15CoreDenoiseStep
    pipe = core().init_pipeline()
    pipe.update_components(
        transformer=seeded(seed, lambda: _hv15_transformer(meanflow=i2v)),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    return finish(pipe)


def _hv15_inputs(pipe: Any, seed: int, i2v: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    mask = torch.ones(1, TEXT_LEN, dtype=like.dtype, device=like.device)
    byt5_len = 4
    mask_2 = torch.ones(1, byt5_len, dtype=like.dtype, device=like.device)
    kwargs = dict(
        prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), prompt_embeds_mask=mask,
        negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), negative_prompt_embeds_mask=mask.clone(),
        prompt_embeds_2=randn(g, 1, byt5_len, _BYT5_DIM, like=like), prompt_embeds_mask_2=mask_2,
        negative_prompt_embeds_2=randn(g, 1, byt5_len, _BYT5_DIM, like=like),
        negative_prompt_embeds_mask_2=mask_2.clone(),
        height=32, width=32, num_frames=5, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
        output="latents",
    )
    if i2v:  # the VAE-encoded first frame, (B, C, 1, H, W)
        kwargs["image_latents"] = randn(g, 1, _HV15_LATENT, 1, 2, 2, like=like)
    return kwargs


CASES = [
    TinyCase(
        name="hunyuan-video-framepack", family="hunyuan-video-framepack", pipeline="HunyuanVideoFramepackPipeline",
        build=_build_framepack, inputs=_framepack_inputs, lora_targets=_FRAMEPACK_LORA_TARGETS,
    ),
    TinyCase(
        name="hunyuan-video1.5-modular", family="hunyuan-video1.5", pipeline="HunyuanVideo15ModularPipeline",
        build=_build_hv15, inputs=_hv15_inputs, lora_targets=_HV15_LORA_TARGETS,
    ),
    TinyCase(
        # I2V core blocks with a MeanFlow transformer: `timestep_r` = the next loop timestep (0 at the last step).
        name="hunyuan-video1.5-modular-i2v", family="hunyuan-video1.5", pipeline="HunyuanVideo15ModularPipeline",
        build=lambda seed: _build_hv15(seed, i2v=True), inputs=lambda pipe, seed: _hv15_inputs(pipe, seed, i2v=True),
        lora_targets=_HV15_LORA_TARGETS,
    ),
]
