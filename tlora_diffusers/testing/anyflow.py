"""Tiny AnyFlow pipelines: bidirectional text-to-video (``AnyFlowPipeline``) and chunk-wise causal FAR
(``AnyFlowFARPipeline``).

Both transformers are the Wan 2.1 backbone (``blocks.N.attn1/attn2/ffn``) with a dual-timestep
flow-map embedding: besides ``timestep`` (the source time ``t``, the diffusion timestep) they take
``r_timestep`` (the target time ``r`` = the next sigma x 1000). Both are passed per latent frame,
``(B, F)``, in scheduler units, float64 on CPU (``FlowMapEulerDiscreteScheduler`` keeps float64
sigmas). Given conditioning latents (``video_latents``, the v2v case), the bidirectional pipeline
sets ``timestep`` of those frames to 0 (``r_timestep`` stays ``r``). The VAE is the Wan 2.1
``AutoencoderKLWan`` at its smallest width; prompts are umT5 embeddings; the default
``guidance_scale=1`` (CFG folded into the weights) makes one call per step.

FAR denoises the latent frames chunk by chunk (``chunk_partition``), restarting the scheduler
per chunk, and between chunks calls the transformer once more at ``t = r = 0`` (int64) to fill
its KV cache with the finished chunk; that call is outside the denoising loop. Its causal
attention is ``flex_attention``, which on CPU is traced by TorchDynamo the first time each shape
is seen: the first FAR call in a process takes a few seconds, later ones about 0.3 s.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 16  # umT5 hidden size stand-in (4096 in the checkpoints)
_INNER = 24  # 2 heads x 12: the rotary split (t, h, w) = (4, 4, 4)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def _transformer(far: bool):
    import diffusers

    kwargs = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=_INNER // 2, in_channels=16, out_channels=16,
        text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )
    if far:
        return diffusers.AnyFlowFARTransformer3DModel(compressed_patch_size=(1, 4, 4), full_chunk_limit=3,
                                                      chunk_partition=(1, 2), **kwargs)
    return diffusers.AnyFlowTransformer3DModel(**kwargs)


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _build(far: bool):
    def build(seed: int) -> Any:
        from diffusers import AnyFlowFARPipeline, AnyFlowPipeline, FlowMapEulerDiscreteScheduler

        cls = AnyFlowFARPipeline if far else AnyFlowPipeline
        return finish(cls(
            tokenizer=None, text_encoder=None, transformer=seeded(seed, lambda: _transformer(far)),
            vae=seeded(seed, _vae), scheduler=FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),
        ))

    return build


def _inputs(*, frames: int, context: int = 0):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        kwargs = dict(
            prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), height=32, width=32, num_frames=frames,
            num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(seed),
        )
        if context:  # pre-encoded conditioning latents, (B, F_ctx, C, H, W): kept fixed, their timestep is 0
            kwargs["video_latents"] = randn(g, 1, context, 16, 4, 4, like=like)
        return kwargs

    return inputs


def _cache_fill(kwargs: dict):
    """FAR's KV-cache fill between chunks runs at t = r = 0: clean."""
    return 0.0 if not bool(torch.as_tensor(kwargs["timestep"]).any()) else None


CASES = [
    TinyCase(
        name="anyflow", family="anyflow", pipeline="AnyFlowPipeline", build=_build(far=False),
        inputs=_inputs(frames=5), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        # Video-to-video: latent frame 0 is given, so the per-frame timesteps are (0, t).
        name="anyflow-v2v", family="anyflow", pipeline="AnyFlowPipeline", build=_build(far=False),
        inputs=_inputs(frames=5, context=1), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        # 9 frames = 3 latent frames = chunks (1, 2): two 2-step loops and one KV-cache call between them.
        name="anyflow-far", family="anyflow", pipeline="AnyFlowFARPipeline", build=_build(far=True),
        inputs=_inputs(frames=9), lora_targets=_LORA_TARGETS, fixed_calls=_cache_fill,
    ),
]
