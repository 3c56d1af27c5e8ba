"""Tiny Z-Image pipeline, run from prompt embeddings (lists of per-prompt ``(L, D)`` tensors)."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn, vae

_CAP_DIM = 16  # Qwen3 hidden size stand-in
_TEXT_LEN = 8
_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _build(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    def make():
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=32, n_layers=2,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=_CAP_DIM,
            rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
        )
        return ZImagePipeline(
            transformer=transformer, vae=vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            text_encoder=None, tokenizer=None,
        )

    return finish(seeded(seed, make))


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # guidance_scale > 1 with negative embeddings: CFG batches both halves into one call.
    return {
        "prompt_embeds": [randn(g, _TEXT_LEN, _CAP_DIM)],
        "negative_prompt_embeds": [randn(g, _TEXT_LEN, _CAP_DIM)],
        "guidance_scale": 5.0, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }


CASES = [
    TinyCase(name="z-image", family="z-image", pipeline="ZImagePipeline", build=_build, inputs=_inputs,
             lora_targets=_TARGETS),
]
