"""Tiny SANA-Video pipelines: text-to-video and image-to-video (per-token timesteps).

The transformer keeps the real module names (``transformer_blocks.N.attn1`` linear attention,
``attn2`` cross-attention, ``ff`` a GLU conv block with ``conv_inverted``/``conv_depth``/``conv_point``);
the VAE is the Wan 2.1 ``AutoencoderKLWan`` (16 channels, 8x spatial, 4x temporal) at its smallest
width. Text-to-video samples with flow DPM-Solver++ (integer timesteps), image-to-video with
flow-matching Euler. Prompts are passed as Gemma embeddings with their masks (``negative_prompt=None``:
its default ``""`` clashes with negative embeddings); CFG is one doubled batch (negative first).
``use_resolution_binning=False``: binning snaps to 480p/720p buckets.

Image-to-video passes one timestep per latent token, ``t * (1 - mask)`` shaped ``(2B, 1, F, H', W')``
(``H'``, ``W'`` after the 2x2 patch): the first latent frame, the encoded image, is at 0.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 16  # Gemma-2 hidden size stand-in (2304 in the checkpoints)
_INNER = 24  # 2 heads x 12: the rotary split (t, h, w) = (4, 4, 4)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point")


def _transformer():
    from diffusers import SanaVideoTransformer3DModel

    return SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=_INNER // 2, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=_INNER // 2, cross_attention_dim=_INNER,
        caption_channels=_TEXT_DIM, mlp_ratio=2.5, sample_size=30, patch_size=(1, 2, 2), rope_max_seq_len=32,
    )


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _build(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        if pipeline == "SanaVideoPipeline":
            scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=8.0, num_train_timesteps=1000)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=8.0)
        return finish(getattr(diffusers, pipeline)(
            tokenizer=None, text_encoder=None, vae=seeded(seed, _vae), transformer=seeded(seed, _transformer),
            scheduler=scheduler,
        ))

    return build


def _inputs(*, image: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        mask = torch.ones(1, TEXT_LEN, dtype=torch.long, device=like.device)
        kwargs = dict(
            prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), prompt_attention_mask=mask,
            negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
            negative_prompt_attention_mask=mask.clone(), negative_prompt=None, height=32, width=32, frames=5,
            num_inference_steps=2, use_resolution_binning=False, output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        )
        if image:
            kwargs["image"] = torch.rand(1, 3, 32, 32, generator=g)
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="sana-video", family="sana-video", pipeline="SanaVideoPipeline", build=_build("SanaVideoPipeline"),
        inputs=_inputs(image=False), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="sana-video-i2v", family="sana-video", pipeline="SanaImageToVideoPipeline",
        build=_build("SanaImageToVideoPipeline"), inputs=_inputs(image=True), lora_targets=_LORA_TARGETS,
        per_token=True,
    ),
]
