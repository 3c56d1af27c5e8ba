"""Tiny LTX-Video pipelines beyond text/image-to-video: ``LTXConditionPipeline`` and ``LTXI2VLongMultiPromptPipeline``.

``LTXConditionPipeline`` passes a ``(B, 1)`` float timestep ``t`` without conditions and a
per-token ``(B, seq)`` ``min(t, 1000 * (1 - conditioning_mask))`` with image conditions (a
frame-0 image is blended into the first latent frame, an image at a later frame is appended as
extra tokens). Its schedule is its own linear-quadratic one, passed to the scheduler as custom
``timesteps`` without ``mu``: the flow-matching Euler must not use dynamic shifting.
``LTXI2VLongMultiPromptPipeline`` denoises temporal windows one after another, resetting the
scheduler (``LTXEulerAncestralRFScheduler``) per window, and passes ``(B, seq, 1)`` timesteps
``t * cond_mask`` (the mask is ``1 - strength`` on the conditioning and overlap tokens, not 0).
It always encodes its prompts itself, so it gets a tiny T5 and tokenizer; it is run here with
an explicit sigma schedule (with ``num_inference_steps`` it loops over ``timesteps[:-1]``
and skips the last step).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn, t5_encoder, t5_tokenizer
from .ltx_video import _INNER, _LATENT, _LORA_TARGETS, _TEXT_DIM, _vae

__all__ = ["CASES"]

_T5_DIM = 64  # _parts.t5_encoder's d_model: the long pipeline's caption width


def _transformer(caption_channels: int = _TEXT_DIM):
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=_LATENT, out_channels=_LATENT, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=_INNER // 2, cross_attention_dim=_INNER, num_layers=2, caption_channels=caption_channels,
    )


def _build_condition(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline

    # LTX-Video 0.9.5+'s scheduler; the pipeline passes custom timesteps and no `mu`.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return finish(LTXConditionPipeline(
        scheduler=scheduler, vae=seeded(seed, _vae), text_encoder=None, tokenizer=None,
        transformer=seeded(seed, _transformer),
    ))


def _build_long(seed: int) -> Any:
    from diffusers import LTXEulerAncestralRFScheduler, LTXI2VLongMultiPromptPipeline

    return finish(LTXI2VLongMultiPromptPipeline(
        scheduler=LTXEulerAncestralRFScheduler(num_train_timesteps=1000), vae=seeded(seed, _vae),
        text_encoder=seeded(seed, t5_encoder), tokenizer=t5_tokenizer(),
        transformer=seeded(seed, lambda: _transformer(_T5_DIM)),
    ))


def _image(g: torch.Generator):
    from PIL import Image

    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())


def _condition_inputs(*, conditions: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        mask = torch.ones(1, TEXT_LEN, dtype=torch.long, device=like.device)
        kwargs = dict(
            prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), prompt_attention_mask=mask,
            negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
            negative_prompt_attention_mask=mask.clone(), height=32, width=32, num_frames=17,
            num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(seed),
        )
        if conditions:
            from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

            # Frame 0 is blended into the first latent frame (mask 1.0 there: timestep 0);
            # frame 8 is appended as one extra latent frame of tokens (mask 0.8: timestep min(t, 200)).
            kwargs["conditions"] = [LTXVideoCondition(image=_image(g), frame_index=0, strength=1.0),
                                    LTXVideoCondition(image=_image(g), frame_index=8, strength=0.8)]
        return kwargs

    return inputs


def _long_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    # 17 frames = 3 latent frames; windows of 2 latent frames overlapping by 1: (0, 2), (1, 3),
    # one prompt segment each; 64x64 (2x2 latents): the cross-window AdaIN takes a std over the
    # new window's frames, NaN for a single 1x1 frame. Window 0 carries the conditioning image (first frame and a
    # "negative index" frame); window 1 also the previous window's tail.
    return dict(
        prompt="a cat walks | a cat eats", negative_prompt="blurry", cond_image=_image(g), height=64, width=64,
        num_frames=17, temporal_tile_size=16, temporal_overlap=8, sigmas=[1.0, 0.6, 0.0], guidance_scale=3.0,
        max_sequence_length=TEXT_LEN, seed=seed, generator=torch.Generator().manual_seed(seed), output_type="latent",
    )


CASES = [
    TinyCase("ltx-condition", "ltx-video", "LTXConditionPipeline", _build_condition,
             _condition_inputs(conditions=False), _LORA_TARGETS),
    TinyCase("ltx-condition-images", "ltx-video", "LTXConditionPipeline", _build_condition,
             _condition_inputs(conditions=True), _LORA_TARGETS, per_token=True),
    TinyCase("ltx-i2v-long", "ltx-video", "LTXI2VLongMultiPromptPipeline", _build_long, _long_inputs,
             _LORA_TARGETS, per_token=True),
]
