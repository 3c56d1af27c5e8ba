"""Tiny Qwen-Image 2.1 pipelines: ``QwenImage21Pipeline`` and the modular ``QwenImage21ModularPipeline`` (text-to-image
and image-conditioned) / ``QwenImage21TurboModularPipeline``.

One ``QwenImage21Transformer2DModel`` (single stream, block-causal attention, one shared
``modulation`` for every block) keeps the real module names
(``transformer_blocks.N.attn.to_q/k/v/out.0``, ``img_mlp.proj/gate_layer/out``). It receives
``t / 1000`` and, with ``causal_condition`` (the checkpoint's setting), modulates text and
condition-image tokens from an internal extra ``t = 0`` row; their keys/values are written
to a KV cache on the first step (``kv_cache_mode="extract"``) and reused afterwards
(``"cached"``), so from the second step on only the target-image tokens go through the
blocks. True CFG is a second, separate call with its own cache.

Prompts are passed as embeddings (with an all-false ``image_pad_mask``: no vision slots), so
no Qwen3-VL is built. ``QwenImage21Pipeline.__init__`` reads its processor (the system
prompt's token count and the ``<|image_pad|>`` id), and ``Qwen3VLProcessor`` cannot be built
without torchvision (its video processor requires it), so a tokenizer-backed stand-in is
passed. The modular pipelines are built from their auto blocks with the encoder and decode
blocks removed and return the unpacked latents (``output="latents"``); the image-conditioned
modular case feeds one condition image as ``image_latents`` plus one vision slot in
``image_pad_mask``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish, qwen_tokenizer, randn

_Z_DIM = 4  # VAE latent channels = transformer channels (2.1 consumes latents unpatched; 64 in the checkpoint)
_TEXT_DIM = 16  # Qwen3-VL hidden size stand-in
_TEXT_LEN = 8
_SIZE = 32  # pixels: 16x VAE -> a 2x2 token grid, i.e. one 2x2 vision slot
_VISION_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")


def _transformer():
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel(
        patch_size=1, in_channels=_Z_DIM, out_channels=_Z_DIM, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, context_in_dim=_TEXT_DIM, mlp_ratio=3, axes_dims_rope=(2, 2, 4), causal_condition=True,
    )


def _vae():
    from diffusers import AutoencoderKLQwenImage21

    return AutoencoderKLQwenImage21(
        base_dim=2, decoder_base_dim=2, z_dim=_Z_DIM, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=0,
        temperal_downsample=[False, True, True, True], latents_mean=[0.0] * _Z_DIM, latents_std=[1.0] * _Z_DIM,
    )


def _scheduler():
    """Flow matching with the resolution-dependent dynamic shift (``mu`` computed by the pipeline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )


class _TextProcessor:
    """A text-only stand-in for ``Qwen3VLProcessor`` (which needs torchvision for its video processor).

    ``QwenImage21Pipeline.__init__`` tokenizes the system message with ``apply_chat_template``
    (batched output, like a processor's) and looks up ``tokenizer.encode("<|image_pad|>")``;
    ``__call__`` tokenizes text like the processor does for prompts without images.
    """

    def __init__(self):
        self.tokenizer = qwen_tokenizer()
        self.tokenizer.add_tokens(list(_VISION_TOKENS), special_tokens=True)

    def apply_chat_template(self, conversation, **kwargs):
        messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                     "".join(part.get("text", "") for part in m["content"])} for m in conversation]
        out = self.tokenizer.apply_chat_template(messages, **kwargs)
        return [out] if kwargs.get("tokenize") and not kwargs.get("return_dict", True) else out

    def __call__(self, text=None, images=None, **kwargs):
        if images is not None:
            raise ValueError("the tiny Qwen3-VL processor stand-in encodes text only")
        return self.tokenizer(text, **kwargs)


def _build(seed: int) -> Any:
    from diffusers import QwenImage21Pipeline

    return finish(QwenImage21Pipeline(
        scheduler=_scheduler(), vae=seeded(seed, _vae), text_encoder=None, processor=_TextProcessor(),
        transformer=seeded(seed, _transformer),
    ))


def _quiet(blocks: Any) -> None:
    """``ModularPipeline.set_progress_bar_config`` only reaches top-level blocks; the loops are nested."""
    for block in getattr(blocks, "sub_blocks", {}).values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        _quiet(block)


def _build_modular(pipeline: str, *, guidance_scale: float | None = None):
    def build(seed: int) -> Any:
        import diffusers

        cls = getattr(diffusers, pipeline)
        blocks = getattr(diffusers, cls.default_blocks_name)()
        for name in ("text_encoder", "vae_encoder", "decode"):  # embeddings (and image latents) in, latents out
            blocks.sub_blocks.pop(name)
        pipe = cls(blocks=blocks)
        pipe.update_components(transformer=seeded(seed, _transformer), scheduler=_scheduler())
        if guidance_scale is not None:  # the default guider (scale 1) runs no unconditional branch
            pipe.update_components(guider=diffusers.ClassifierFreeGuidance(guidance_scale=guidance_scale))
        _quiet(pipe._blocks)
        return finish(pipe)

    return build


def _inputs(*, negative: bool, modular: bool, condition: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        ones = torch.ones(1, _TEXT_LEN, dtype=torch.long, device=like.device)
        kwargs = dict(prompt_embeds=randn(g, 1, _TEXT_LEN, _TEXT_DIM, like=like), prompt_embeds_mask=ones,
                      height=_SIZE, width=_SIZE, num_inference_steps=2, generator=torch.Generator().manual_seed(seed))
        if negative:  # true CFG: a second, separate transformer call (and KV cache) on the negative prompt
            kwargs["negative_prompt_embeds"] = randn(g, 1, _TEXT_LEN, _TEXT_DIM, like=like)
            kwargs["negative_prompt_embeds_mask"] = ones.clone()
        if not modular:
            kwargs.update(true_cfg_scale=4.0 if negative else 1.0, output_type="latent")
            return kwargs
        pad = torch.zeros(1, _TEXT_LEN, dtype=torch.bool, device=like.device)
        if condition:  # one condition image of 2x2 latent tokens = one vision slot after two text tokens
            pad[:, 2] = True
            kwargs["image_latents"] = [randn(g, 1, _Z_DIM, 1, _SIZE // 16, _SIZE // 16, like=like)]
        kwargs["image_pad_mask"] = pad
        if negative:
            kwargs["negative_image_pad_mask"] = pad.clone()
        kwargs["output"] = "latents"
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="qwen-image21", family="qwen-image21", pipeline="QwenImage21Pipeline", build=_build,
        inputs=_inputs(negative=True, modular=False), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="qwen-image21-modular", family="qwen-image21", pipeline="QwenImage21ModularPipeline",
        build=_build_modular("QwenImage21ModularPipeline", guidance_scale=4.0),
        inputs=_inputs(negative=True, modular=True), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="qwen-image21-modular-cond", family="qwen-image21", pipeline="QwenImage21ModularPipeline",
        build=_build_modular("QwenImage21ModularPipeline", guidance_scale=4.0),
        inputs=_inputs(negative=True, modular=True, condition=True), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="qwen-image21-turbo-modular", family="qwen-image21", pipeline="QwenImage21TurboModularPipeline",
        build=_build_modular("QwenImage21TurboModularPipeline"), inputs=_inputs(negative=False, modular=True),
        lora_targets=_LORA_TARGETS,
    ),
]
