"""Tiny Helios pipelines: ``HeliosPipeline``, ``HeliosPyramidPipeline`` (base and DMD-distilled) and
the modular ``HeliosModularPipeline``, ``HeliosPyramidModularPipeline`` and
``HeliosPyramidDistilledModularPipeline``.

Helios generates video autoregressively in chunks of ``num_latent_frames_per_chunk`` latent
frames conditioned on short/mid/long history latents; the scheduler's ``set_timesteps`` runs
again for every chunk, and the pyramid variants additionally run it once per resolution stage
(``len(pyramid_num_inference_steps_list)`` stages, smallest first), each stage drawing its
timesteps from its own slice of the 0-1000 range. The cases below generate two chunks, and the
pyramid ones three stages, so all of that shows in one call.

The transformer keeps the real module names (``blocks.N.attn1/attn2/ffn``); the VAE is the tiny
Wan 2.1 ``AutoencoderKLWan`` of :mod:`.wan` (the standard pipelines decode every chunk inside
the loop even for ``output_type="latent"``). Prompts are passed as embeddings: the standard
pipelines then skip their T5, and the modular pipelines are built from their stock blocks
without the ``text_encoder`` step (which would always run T5) and without the final ``decode``
step, returning ``latents`` (the last chunk's).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn
from .wan import _vae21

_TEXT_DIM = 16  # umT5 hidden size stand-in (4096 in the checkpoints)
_INNER = 24  # 2 heads x 12, split (4, 4, 4) by the rotary embedding
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
_CHUNK = dict(num_latent_frames_per_chunk=2, history_sizes=[4, 2, 1], num_frames=9)  # two chunks of 5 frames


def _transformer():
    from diffusers import HeliosTransformer3DModel

    return HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=_INNER // 2, in_channels=16,
        out_channels=16, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
        guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False,
    )


def _scheduler(kind: str):
    """``"base"``: one stage over the whole range (``HeliosPipeline``); ``"pyramid"``: the default
    three stages with UniPC; ``"dmd"``: three stages with the distilled DMD update."""
    from diffusers import HeliosDMDScheduler, HeliosScheduler

    if kind == "base":
        return HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True)
    if kind == "pyramid":
        return HeliosScheduler(stages=3, stage_range=[0, 1 / 3, 2 / 3, 1], scheduler_type="unipc")
    return HeliosDMDScheduler(stages=3, stage_range=[0, 1 / 3, 2 / 3, 1], use_dynamic_shifting=True,
                              time_shift_type="linear")


def _build_standard(pipeline: str, scheduler: str, **config: Any):
    def build(seed: int) -> Any:
        import diffusers

        return finish(getattr(diffusers, pipeline)(
            tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(scheduler),
            transformer=seeded(seed, _transformer), **config,
        ))

    return build


def _finish_modular(pipe: Any) -> Any:
    """``finish`` plus the progress bars of nested loop blocks (the pipeline only reaches top-level ones)."""
    finish(pipe)

    def walk(block: Any) -> None:
        for sub in (block.sub_blocks or {}).values():
            if hasattr(sub, "set_progress_bar_config"):
                sub.set_progress_bar_config(disable=True)
            walk(sub)

    walk(pipe._blocks)
    return pipe


def _build_modular(pipeline: str, blocks: str, scheduler: str):
    def build(seed: int) -> Any:
        import diffusers
        from diffusers import modular_pipelines

        stock = copy.deepcopy(getattr(modular_pipelines, blocks)())  # nested steps are module-level instances
        for name in ("text_encoder", "decode"):  # T5 (always run) and the final VAE decode
            stock.sub_blocks.pop(name)
        pipe = getattr(diffusers, pipeline)(blocks=stock)
        pipe.update_components(
            transformer=seeded(seed, _transformer), vae=seeded(seed, _vae21), scheduler=_scheduler(scheduler),
        )
        return _finish_modular(pipe)

    return build


def _embeds(g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like)


def _inputs(*, modular: bool, size: int, pyramid: bool, **extra: Any):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        kwargs = dict(
            prompt_embeds=_embeds(g, like), negative_prompt_embeds=_embeds(g, like), height=size, width=size,
            generator=torch.Generator().manual_seed(seed), **_CHUNK, **extra,
        )
        if pyramid:
            kwargs["pyramid_num_inference_steps_list"] = [2, 2, 2]
        else:
            kwargs["num_inference_steps"] = 2
        if modular:
            kwargs["output"] = "latents"
        else:
            kwargs["output_type"] = "latent"
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="helios", family="helios", pipeline="HeliosPipeline",
        build=_build_standard("HeliosPipeline", "base"),
        inputs=_inputs(modular=False, size=16, pyramid=False), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="helios-pyramid", family="helios", pipeline="HeliosPyramidPipeline",
        build=_build_standard("HeliosPyramidPipeline", "pyramid"),
        inputs=_inputs(modular=False, size=64, pyramid=True), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="helios-pyramid-distilled", family="helios", pipeline="HeliosPyramidPipeline",
        build=_build_standard("HeliosPyramidPipeline", "dmd", is_distilled=True),
        inputs=_inputs(modular=False, size=64, pyramid=True, guidance_scale=1.0, is_amplify_first_chunk=True),
        lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="helios-modular", family="helios", pipeline="HeliosModularPipeline",
        build=_build_modular("HeliosModularPipeline", "HeliosAutoBlocks", "base"),
        inputs=_inputs(modular=True, size=16, pyramid=False), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="helios-pyramid-modular", family="helios", pipeline="HeliosPyramidModularPipeline",
        build=_build_modular("HeliosPyramidModularPipeline", "HeliosPyramidAutoBlocks", "pyramid"),
        inputs=_inputs(modular=True, size=64, pyramid=True), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="helios-pyramid-distilled-modular", family="helios", pipeline="HeliosPyramidDistilledModularPipeline",
        build=_build_modular("HeliosPyramidDistilledModularPipeline", "HeliosPyramidDistilledAutoBlocks", "dmd"),
        inputs=_inputs(modular=True, size=64, pyramid=True, is_amplify_first_chunk=True), lora_targets=_LORA_TARGETS,
    ),
]
