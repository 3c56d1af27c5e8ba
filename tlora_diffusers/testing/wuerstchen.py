"""Tiny Würstchen prior pipeline (``WuerstchenPrior``, stage C: text -> image embeddings).

The prior keeps the real module names (``blocks.N`` cycling ``ResBlock`` / ``TimestepBlock`` /
``AttnBlock``: ``attention.to_q/...``, ``kv_mapper.1``, ``channelwise.0/4``) at depth 1. Its
"timestep" is the continuous ratio ``r`` in ``[0, 1]`` (1 = pure noise): the
``DDPMWuerstchenScheduler`` sets ``timesteps = linspace(1, 0, steps + 1)`` and the loop runs over
all but the last. The pipeline is deprecated in diffusers but still exported. Prompts are passed as
CLIP embeddings with negatives (CFG at the default guidance 8, one doubled batch ordered
``[cond, uncond]``); a tiny CLIP text tower is still built because ``encode_prompt`` reads
``text_encoder.dtype``. 128x128 pixels give a 3x3 prior latent (``resolution_multiple=42.67``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import CLIP_MAX_LENGTH, clip_text_model, clip_tokenizer, finish, randn

_TEXT_DIM = 16  # CLIP-G hidden size stand-in (1280 in the checkpoint)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "kv_mapper.1", "channelwise.0", "channelwise.4")


def _prior():
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    return WuerstchenPrior(c_in=4, c=16, c_cond=_TEXT_DIM, c_r=8, depth=1, nhead=2, dropout=0.1)


def _build(seed: int) -> Any:
    from diffusers import DDPMWuerstchenScheduler, WuerstchenPriorPipeline

    return finish(WuerstchenPriorPipeline(
        tokenizer=clip_tokenizer(), text_encoder=seeded(seed, lambda: clip_text_model(_TEXT_DIM, projection_dim=None)),
        prior=seeded(seed, _prior), scheduler=DDPMWuerstchenScheduler(),
    ))


def _inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = next(pipe.prior.parameters())
    return dict(
        prompt_embeds=randn(g, 1, CLIP_MAX_LENGTH, _TEXT_DIM, like=like),
        negative_prompt_embeds=randn(g, 1, CLIP_MAX_LENGTH, _TEXT_DIM, like=like),
        height=128, width=128, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(seed),
    )


CASES = [
    TinyCase("wuerstchen-prior", "wuerstchen", "WuerstchenPriorPipeline", _build, _inputs, _LORA_TARGETS, ("prior",)),
]
