"""Tiny ChronoEdit pipelines: image editing as a 2-latent-frame Wan 2.1 I2V video, and with temporal reasoning.

``ChronoEditTransformer3DModel`` is Wan 2.1 I2V's transformer (same module names,
``blocks.N.attn1/attn2/ffn``, image-context ``add_k_proj/add_v_proj``) whose rotary embedding
puts the two frames of an edit at temporal positions 0 and ``rope_temporal_skip_len - 1``. The
pipeline forces ``num_frames=5`` (input frame + edited frame) unless ``enable_temporal_reasoning``;
with it, the first ``num_temporal_reasoning_steps`` steps denoise all frames and the later ones
only the first and last (the latents, the condition and the UniPC history are cut mid-loop).

The VAE, the flow UniPC scheduler (the temporal-reasoning path reads UniPC's ``model_outputs``)
and the 2-layer CLIP vision tower (the pipeline encodes its image itself) are Wan 2.1's tiny ones
(``testing/wan.py``); prompts are passed as embeddings padded to the 512 tokens after which the
cross-attention finds the image tokens, so no T5 is built.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish
from .wan import _TEXT_CONTEXT, _TEXT_DIM, _clip_processor, _clip_vision, _image, _scheduler, _text, _vae21

_INNER = 24  # 2 heads x 12: the smallest head width whose rotary split (t, h, w) is even
_IMAGE_DIM = 8  # CLIP vision hidden size stand-in (1280 in the checkpoint)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2")


def _transformer():
    from diffusers import ChronoEditTransformer3DModel

    return ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=_INNER // 2, in_channels=16 + 4 + 16,
        out_channels=16, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=_IMAGE_DIM, added_kv_proj_dim=_INNER,
        rope_temporal_skip_len=8,
    )


def _build(seed: int) -> Any:
    from diffusers import ChronoEditPipeline

    return finish(ChronoEditPipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(5.0),
        image_processor=_clip_processor(), image_encoder=seeded(seed, _clip_vision),
        transformer=seeded(seed, _transformer),
    ))


def _inputs(**extra):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        return dict(
            image=_image(g, 16), prompt_embeds=_text(g, like, _TEXT_CONTEXT),
            negative_prompt_embeds=_text(g, like, _TEXT_CONTEXT), height=16, width=16, num_inference_steps=2,
            output_type="latent", generator=torch.Generator().manual_seed(seed), **extra,
        )

    return inputs


CASES = [
    TinyCase(
        name="chronoedit", family="chronoedit", pipeline="ChronoEditPipeline", build=_build, inputs=_inputs(),
        lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        # 9 frames = 3 latent frames for the first step, then frames [0, -1] only.
        name="chronoedit-temporal", family="chronoedit", pipeline="ChronoEditPipeline", build=_build,
        inputs=_inputs(num_frames=9, enable_temporal_reasoning=True, num_temporal_reasoning_steps=1),
        lora_targets=_LORA_TARGETS,
    ),
]
