"""Tiny Anima modular pipelines: text-to-image and img2img of ``AnimaModularPipeline``.

Anima is modular only: the Cosmos-Predict2 DiT (``CosmosTransformer3DModel``) plus an LLM
adapter (``text_conditioner``, ``AnimaTextConditioner``) that maps Qwen3 hidden states and
T5 token ids to the DiT's text context once, before the loop. The stock ``AnimaAutoBlocks``
are used without their ``text_encoder`` (Qwen3 + two tokenizers) and ``decode`` steps, so
the inputs are what the text encoder step would emit (Qwen3 states, their mask, T5 ids and
mask, positive and negative). CFG runs through the blocks' ``ClassifierFreeGuidance``
(scale 4) as two separate transformer calls per step. The img2img case passes
``image_latents`` (what the VAE encoder step would emit), which selects the img2img branch
(``strength`` slices the schedule). The tiny DiT sets ``concat_padding_mask=False``: the
checkpoint's padding-mask channel is resized with torchvision, which these cases must not
require. The blocks leave the scheduler config to the checkpoint; the tiny one is a
flow-matching Euler with ``shift=3``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import randn

__all__ = ["CASES", "LORA_TARGETS"]

_QWEN_DIM = 16  # Qwen3-0.6B hidden size stand-in (1024)
_TEXT_DIM = 16  # text_conditioner output = DiT text_embed_dim (1024)
_T5_VOCAB = 64  # T5 vocabulary stand-in (32128)
_QWEN_LEN, _T5_LEN = 6, 5
_LATENT = 4  # Qwen-Image VAE latent channels stand-in (16)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _transformer():
    from diffusers import CosmosTransformer3DModel

    return CosmosTransformer3DModel(
        in_channels=_LATENT, out_channels=_LATENT, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        mlp_ratio=2.0, text_embed_dim=_TEXT_DIM, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2),
        rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type=None,
    )


def _text_conditioner():
    from diffusers import AnimaTextConditioner

    return AnimaTextConditioner(
        source_dim=_QWEN_DIM, target_dim=_TEXT_DIM, model_dim=_TEXT_DIM, num_layers=1, num_attention_heads=2,
        mlp_ratio=2.0, target_vocab_size=_T5_VOCAB, min_sequence_length=8,
    )


def _finish_modular(pipe: Any) -> Any:
    """``eval()`` every module and silence the progress bars of the nested denoising loops."""
    for value in pipe.components.values():
        if isinstance(value, torch.nn.Module):
            value.eval()
    stack = [pipe._blocks]
    while stack:
        block = stack.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        stack.extend(getattr(block, "sub_blocks", {}).values())
    return pipe


def _build(seed: int) -> Any:
    from diffusers import AnimaAutoBlocks, FlowMatchEulerDiscreteScheduler

    blocks = AnimaAutoBlocks()
    for name in ("text_encoder", "decode"):
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()  # AnimaModularPipeline
    pipe.update_components(
        transformer=seeded(seed, _transformer), text_conditioner=seeded(seed + 1, _text_conditioner),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )
    return _finish_modular(pipe)


def _text(g: torch.Generator, like: torch.Tensor, prefix: str) -> dict:
    return {
        f"{prefix}qwen_prompt_embeds": randn(g, 1, _QWEN_LEN, _QWEN_DIM, like=like),
        f"{prefix}qwen_attention_mask": torch.ones(1, _QWEN_LEN, dtype=torch.long),
        f"{prefix}t5_input_ids": torch.randint(0, _T5_VOCAB, (1, _T5_LEN), generator=g),
        f"{prefix}t5_attention_mask": torch.ones(1, _T5_LEN, dtype=torch.long),
    }


def _inputs(*, img2img: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        kwargs = dict(
            **_text(g, like, ""), **_text(g, like, "negative_"), height=32, width=32, num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed), output="latents",
        )
        if img2img:  # the VAE encoder step's output: (B, C, 1, H/8, W/8)
            kwargs.update(image_latents=randn(g, 1, _LATENT, 1, 4, 4, like=like), strength=0.6, num_inference_steps=3)
        return kwargs

    return inputs


CASES = [
    TinyCase("anima", "cosmos", "AnimaModularPipeline", _build, _inputs(), LORA_TARGETS),
    TinyCase("anima-img2img", "cosmos", "AnimaModularPipeline", _build, _inputs(img2img=True), LORA_TARGETS),
]
