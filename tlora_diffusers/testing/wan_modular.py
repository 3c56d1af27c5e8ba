"""Tiny Wan modular pipelines (``diffusers.modular_pipelines``): Wan 2.1 T2V and I2V, Wan 2.2 T2V, I2V
and VACE (two experts, ``transformer`` while ``t >= boundary_ratio * 1000``, ``transformer_2`` below,
each with its own guider), and Wan-Animate-2 (base and distilled).

Each pipeline is the stock modular pipeline class built from its stock blocks, minus the
``text_encoder`` step (it always runs T5, so prompts are passed as embeddings instead) and,
where the decode is a separate final step, minus ``decode``: the call returns ``latents``. The
models are the tiny Wan ones of :mod:`.wan`; the guiders are the blocks' defaults (CFG, so
every step runs the denoiser twice).

Wan-Animate-2 is different: it animates a reference image with a driving video in segments.
Per segment it resets the scheduler, runs one reference-extraction transformer pass
(``kv_cache_mode="extract"``, timestep argument ``timesteps[0]`` but modulated at a fixed
timestep 1 inside the model), then the denoising passes, then decodes in the loop (the next
segment conditions on the decoded tail), so its case keeps the block graph (minus T5 and the
two CLIP encode steps: the transformer's image projection is hardwired to 1280-wide ViT-H
features, passed as tensors) and returns the decoded ``videos``. Its generation attention is
flex attention with a block mask that the model compiles on first use (seconds on a CPU);
``build`` fills the model's block-mask cache for the case's geometry with an uncompiled mask.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn
from .wan import (
    _LORA_TARGETS,
    _TEXT_CONTEXT,
    _TEXT_DIM,
    _clip_processor,
    _clip_vision,
    _image,
    _scheduler,
    _text,
    _transformer,
    _vae21,
)

_INNER = 24  # 2 heads x 12
_CLIP_DIM = 1280  # Wan-Animate-2's image projection is hardwired to CLIP ViT-H's width
_CLIP_TOKENS = 4  # 257 in the checkpoints
# Wan-Animate-2 geometry: 32x32 frames (2x2 tokens), 5-frame segments, 9 driving frames -> 2 segments.
_ANIMATE = dict(size=32, segment=5, frames=9)
_ANIMATE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.0", "ffn.2")


def _vace_transformer():
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=_INNER // 2, in_channels=16,
        out_channels=16, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0], vace_in_channels=96,
    )  # vace_in_channels: inactive + reactive latents (2 x 16) + the 8x8 pixel mask folded into 64 channels


def _animate_transformer():
    from diffusers import WanAnimate2Transformer3DModel

    return WanAnimate2Transformer3DModel(
        text_len=TEXT_LEN, in_dim=16 + 4 + 16, dim=_INNER, ffn_dim=32, freq_dim=32, text_dim=_TEXT_DIM, out_dim=16,
        num_heads=2, num_layers=2, cross_attn_norm=True, use_img_emb=True,
    )


def _uncompiled_block_mask(transformer: Any, segment: int, height: int, width: int) -> None:
    """Fill ``transformer.block_masks`` for this geometry the way ``forward`` would, but without
    ``torch.compile`` (the model passes ``_compile=True`` to ``create_block_mask``)."""
    from diffusers.models.transformers import transformer_wan_animate_2 as module

    key = (segment // 4 + 1, height * width // 256)  # as computed in WanAnimate2Transformer3DModel.forward
    compiled = module.create_block_mask
    module.create_block_mask = lambda *args, **kwargs: compiled(*args, **{**kwargs, "_compile": False})
    try:
        transformer.block_masks[key] = transformer.create_mask(*key, transformer.device)
    finally:
        module.create_block_mask = compiled


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


def _modular(pipeline: str, blocks: str, *, drop: tuple[str, ...], components: dict, config: dict | None = None):
    import diffusers
    from diffusers import modular_pipelines

    stock = copy.deepcopy(getattr(modular_pipelines, blocks)())  # nested steps are module-level instances
    for path in drop:  # "step" or "step.sub_step"
        *parents, name = path.split(".")
        parent = stock
        for step in parents:
            parent = parent.sub_blocks[step]
        parent.sub_blocks.pop(name)
    pipe = getattr(diffusers, pipeline)(blocks=stock)
    pipe.update_components(**components, **(config or {}))
    return _finish_modular(pipe)


def _build_t2v(seed: int) -> Any:
    return _modular("WanModularPipeline", "WanBlocks", drop=("text_encoder", "decode"), components=dict(
        transformer=seeded(seed, lambda: _transformer(16, 16)), scheduler=_scheduler(3.0),
    ))


def _build_i2v(seed: int) -> Any:
    return _modular("WanImage2VideoModularPipeline", "WanImage2VideoAutoBlocks", drop=("text_encoder", "decode"),
                    components=dict(
        transformer=seeded(seed, lambda: _transformer(16 + 4 + 16, 16, image=True)), scheduler=_scheduler(3.0),
        vae=seeded(seed, _vae21), image_processor=_clip_processor(), image_encoder=seeded(seed, _clip_vision),
    ))


def _build_22_t2v(seed: int) -> Any:
    return _modular("Wan22ModularPipeline", "Wan22Blocks", drop=("text_encoder", "decode"), components=dict(
        transformer=seeded(seed, lambda: _transformer(16, 16)),
        transformer_2=seeded(seed + 1, lambda: _transformer(16, 16)), scheduler=_scheduler(3.0),
    ), config=dict(boundary_ratio=0.875))


def _build_22_i2v(seed: int) -> Any:
    # Wan 2.2 I2V A14B: Wan 2.1 VAE, first-frame latents + mask concatenated to the noise, no CLIP.
    return _modular("Wan22Image2VideoModularPipeline", "Wan22Image2VideoBlocks", drop=("text_encoder", "decode"),
                    components=dict(
        transformer=seeded(seed, lambda: _transformer(16 + 4 + 16, 16)),
        transformer_2=seeded(seed + 1, lambda: _transformer(16 + 4 + 16, 16)), scheduler=_scheduler(3.0),
        vae=seeded(seed, _vae21),
    ), config=dict(boundary_ratio=0.9))


def _build_22_vace(seed: int) -> Any:
    return _modular("Wan22VaceModularPipeline", "Wan22VaceBlocks", drop=("text_encoder", "decode"), components=dict(
        transformer=seeded(seed, _vace_transformer), transformer_2=seeded(seed + 1, _vace_transformer),
        scheduler=_scheduler(3.0), vae=seeded(seed, _vae21),
    ), config=dict(boundary_ratio=0.875))


def _animate_scheduler(distilled: bool):
    """The base checkpoint ships DPM-Solver++ over flow sigmas, the distilled one flow-match Euler (shift 5)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if distilled:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=5.0)


def _build_animate(distilled: bool):
    def build(seed: int) -> Any:
        transformer = seeded(seed, _animate_transformer)
        size = _ANIMATE["size"]
        _uncompiled_block_mask(transformer, _ANIMATE["segment"], size, size)
        name = "WanAnimate2DistilledModularPipeline" if distilled else "WanAnimate2ModularPipeline"
        blocks = "WanAnimate2DistilledBlocks" if distilled else "WanAnimate2Blocks"
        return _modular(name, blocks, drop=("text_encoder", "image_encoder.encode", "video_encoder.encode"),
                        components=dict(transformer=transformer, scheduler=_animate_scheduler(distilled),
                                        vae=seeded(seed, _vae21)))

    return build


def _inputs(*, size: int = 16, frames: int = 5, image: bool = False, context: int = TEXT_LEN, vace: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        kwargs = dict(
            prompt_embeds=_text(g, like, context), negative_prompt_embeds=_text(g, like, context),
            height=size, width=size, num_frames=frames, num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed), output="latents",
        )
        if image:
            kwargs["image"] = _image(g, size)
        if vace:  # a control video and a mask (white: generate) of PIL frames
            from PIL import Image

            kwargs["video"] = [_image(g, size) for _ in range(frames)]
            kwargs["mask"] = [Image.new("L", (size, size), 255)] * frames
        return kwargs

    return inputs


def _animate_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    size = _ANIMATE["size"]
    return dict(
        prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        prompt_ref_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        # CLIP ViT-H penultimate features of the reference image and of the driving video's first frame
        denoiser_input_fields=dict(encoder_hidden_states_image=randn(g, 1, _CLIP_TOKENS, _CLIP_DIM, like=like)),
        condition_clip_context=randn(g, 1, _CLIP_TOKENS, _CLIP_DIM, like=like),
        image=_image(g, size), driving_video=[_image(g, size) for _ in range(_ANIMATE["frames"])],
        height=size, width=size, segment_frame_length=_ANIMATE["segment"], prev_segment_conditioning_frames=1,
        num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="pt", output="videos",
    )


def _reference_pass(kwargs: dict):
    """The reference-extraction pass: the model replaces its timestep by 1 (transformer_wan_animate_2.py:857)."""
    return 1.0 if kwargs.get("kv_cache_mode") == "extract" else None


CASES = [
    TinyCase(
        name="wan-modular", family="wan", pipeline="WanModularPipeline", build=_build_t2v, inputs=_inputs(),
        lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="wan-modular-i2v", family="wan", pipeline="WanImage2VideoModularPipeline", build=_build_i2v,
        inputs=_inputs(image=True, context=_TEXT_CONTEXT), lora_targets=_LORA_TARGETS + ("add_k_proj", "add_v_proj"),
    ),
    TinyCase(
        name="wan2.2-modular", family="wan", pipeline="Wan22ModularPipeline", build=_build_22_t2v, inputs=_inputs(),
        lora_targets=_LORA_TARGETS, denoiser_attrs=("transformer", "transformer_2"),
    ),
    TinyCase(
        name="wan2.2-modular-i2v", family="wan", pipeline="Wan22Image2VideoModularPipeline", build=_build_22_i2v,
        inputs=_inputs(image=True), lora_targets=_LORA_TARGETS, denoiser_attrs=("transformer", "transformer_2"),
    ),
    TinyCase(
        name="wan2.2-modular-vace", family="wan-vace", pipeline="Wan22VaceModularPipeline", build=_build_22_vace,
        inputs=_inputs(vace=True), lora_targets=_LORA_TARGETS, denoiser_attrs=("transformer", "transformer_2"),
    ),
    TinyCase(
        name="wan-animate2-modular", family="wan-animate2", pipeline="WanAnimate2ModularPipeline",
        build=_build_animate(distilled=False), inputs=_animate_inputs, lora_targets=_ANIMATE_LORA_TARGETS,
        fixed_calls=_reference_pass,
    ),
    TinyCase(
        name="wan-animate2-distilled-modular", family="wan-animate2", pipeline="WanAnimate2DistilledModularPipeline",
        build=_build_animate(distilled=True), inputs=_animate_inputs, lora_targets=_ANIMATE_LORA_TARGETS,
        fixed_calls=_reference_pass,
    ),
]
