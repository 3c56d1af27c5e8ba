"""Tiny Cosmos-Predict 2.5 pipelines: text-to-world and video-to-world (``Cosmos2_5_PredictBasePipeline``).

The transformer keeps the real module names (``transformer_blocks.N.attn1/attn2/ff`` with the
``norm1/2/3`` AdaLN-LoRA modulations) and the 2.5 cross-attention projection (``crossattn_proj``)
from the concatenated Qwen hidden states; the VAE is the Wan 2.1 ``AutoencoderKLWan`` at its
smallest width; the scheduler is the checkpoint's flow UniPC with Karras sigmas in ``[0.01, 200]``.
Prompts are passed as embeddings (CFG: two separate calls per step at the default
``guidance_scale=7``).

Cosmos 2.5 does not pass the scheduler's timestep to its denoiser: it passes the flow sigma
``scheduler.sigmas[i]`` (a fraction in ``[0, 1]``), one per latent frame, ``(B, 1, T, 1, 1)``;
conditioning frames (video-to-world) get ``conditional_frame_timestep=1e-4`` instead. The loop's
own ``t`` (``scheduler.timesteps``, also ``pipe._current_timestep``) is ``int64(1000 * sigma)``,
truncated, so ``1000 * raw - t`` lies in ``[0, 1)``.

Two deviations from the checkpoints, both forced by the environment and not by size:
``concat_padding_mask=False`` (the padding-mask channel is resized with torchvision, which the
tiny pipelines must not require) and a no-op safety checker module (the pipeline refuses to run
without one, and the real one needs the ``cosmos_guardrail`` package and its models).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 24  # concatenated Qwen2.5-VL hidden states stand-in (100352 in the checkpoints)
_CROSS_DIM = 16  # crossattn_proj output / cross-attention width (1024)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


class NoGuardrail(torch.nn.Module):
    """Stands in for ``cosmos_guardrail.CosmosSafetyChecker``: lets every prompt and video through."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # the pipeline asks its modules' device

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, video: Any) -> Any:
        return video


def _transformer():
    from diffusers import CosmosTransformer3DModel

    return CosmosTransformer3DModel(
        in_channels=16 + 1, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        mlp_ratio=2.0, text_embed_dim=_CROSS_DIM, adaln_lora_dim=8, max_size=(128, 240, 240), patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=False, extra_pos_embed_type=None,
        use_crossattn_projection=True, crossattn_proj_in_channels=_TEXT_DIM, encoder_hidden_states_channels=_CROSS_DIM,
    )


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _build(seed: int) -> Any:
    from diffusers import Cosmos2_5_PredictBasePipeline, UniPCMultistepScheduler

    return finish(Cosmos2_5_PredictBasePipeline(
        text_encoder=None, tokenizer=None, transformer=seeded(seed, _transformer), vae=seeded(seed, _vae),
        scheduler=UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
                                          prediction_type="flow_prediction", sigma_max=200.0, sigma_min=0.01),
        safety_checker=NoGuardrail(),
    ))


def _inputs(*, video: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        kwargs = dict(
            prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
            negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
            height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        )
        if video:
            # A preprocessed (B, 3, T, H, W) clip in [-1, 1]; its last frame conditions latent frame 0.
            kwargs.update(video=torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1, num_latent_conditional_frames=1)
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="cosmos2.5-predict", family="cosmos", pipeline="Cosmos2_5_PredictBasePipeline", build=_build,
        inputs=_inputs(video=False), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="cosmos2.5-predict-v2w", family="cosmos", pipeline="Cosmos2_5_PredictBasePipeline", build=_build,
        inputs=_inputs(video=True), lora_targets=_LORA_TARGETS,
    ),
]
