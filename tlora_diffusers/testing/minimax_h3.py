"""Tiny MiniMax-H3 modular pipeline (joint video + audio): the ``t2va`` workflow of ``MiniMaxH3ModularPipeline``.

MiniMax-H3 is modular only and guidance-distilled (no guider, one forward per step). One
transformer call denoises one *packed* sequence ``[text | audio | video]`` whose rows carry
different timesteps: the forward gets the distinct values as ``timestep`` (sorted, in
``[0, 1]``) plus a per-row ``timestep_indices``, and the loop steps two schedulers
(``scheduler`` for video, shift 12; ``audio_scheduler``, shift 3) after each call. Its
timesteps run the other way round from the flow-matching ones: ``t = 1 - sigma``, 0 is
pure noise and 1 is clean.

The stock ``MiniMaxH3Blocks`` are used without their ``text_encoder`` (Qwen3-VL) and
``decode`` steps: the prompt goes in as ``prompt_embeds`` plus ``text_token_tags``. Without
VAEs the pipeline falls back to the released geometry (24 video / 32 audio latent channels,
16x spatial compression), so the smallest canvas is 32x32 (one 2x2 patch per frame) and the
shortest video MiniMax-H3 accepts, 124 frames (5.2 s), is 37 latent frames and 2x207 audio
rows. Its scheduler counts the terminal sigma as a step, so ``num_inference_steps=3``
runs 2 denoiser calls. ``fl2va`` and ``ref2va`` need the Qwen3-VL and VAE encoders and are
not built.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, randn

__all__ = ["CASES", "LORA_TARGETS"]

_TEXT_DIM = 16  # Qwen3-VL hidden_states[50] stand-in (5120 in the checkpoint)
_TEXT_TAG = 1  # MiniMaxH3ModularPipeline.text_tag
#: Attention and SwiGLU feed-forward of the main blocks and of the text token refiner.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _transformer():
    from diffusers import MiniMaxH3Transformer3DModel

    # in_channels / audio_in_channels are the VAE-less defaults of the pipeline (24 and 32).
    return MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
        ffn_dim=64, in_channels=24, audio_in_channels=32, patch_size=(1, 2, 2), text_dim=_TEXT_DIM, freq_dim=32,
        time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2,
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
    from diffusers import MiniMaxH3Blocks, MiniMaxH3Scheduler

    blocks = MiniMaxH3Blocks()
    for name in ("text_encoder", "decode"):
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()  # MiniMaxH3ModularPipeline
    pipe.update_components(
        transformer=seeded(seed, _transformer), scheduler=MiniMaxH3Scheduler(shift=12.0),
        audio_scheduler=MiniMaxH3Scheduler(shift=3.0),
    )
    return _finish_modular(pipe)


def _inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    return dict(
        prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        text_token_tags=torch.full((TEXT_LEN,), _TEXT_TAG, dtype=torch.long),
        height=32, width=32, num_frames=124, num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed), output="latents",
    )


CASES = [
    TinyCase("minimax-h3", "minimax-h3", "MiniMaxH3ModularPipeline", _build, _inputs, LORA_TARGETS, per_token=True),
]
