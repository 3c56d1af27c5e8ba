"""Tiny CogView4 pipeline, run from GLM prompt embeddings."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn, vae

_GLM_DIM = 32  # text_embed_dim (GLM-4 hidden size stand-in)
_TEXT_LEN = 16  # the pipeline pads GLM tokens to a multiple of 16
_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _scheduler():
    """CogView4's scheduler: linear dynamic shift (the pipeline passes its own timesteps and sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
        use_dynamic_shifting=True, time_shift_type="linear",
    )


def _build(seed: int):
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel

    def make():
        transformer = CogView4Transformer2DModel(
            patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, text_embed_dim=_GLM_DIM, time_embed_dim=16,
            condition_dim=8, pos_embed_max_size=16, sample_size=8, rope_axes_dim=(16, 16),
        )
        return CogView4Pipeline(
            tokenizer=None, text_encoder=None, transformer=transformer, scheduler=_scheduler(),
            vae=vae(scaling_factor=1.0, shift_factor=None, quant_conv=False),
        )

    return finish(seeded(seed, make))


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # guidance_scale > 1 with negative embeddings: CFG is a second, separate call.
    return {
        "prompt_embeds": randn(g, 1, _TEXT_LEN, _GLM_DIM),
        "negative_prompt_embeds": randn(g, 1, _TEXT_LEN, _GLM_DIM),
        "guidance_scale": 5.0, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }


CASES = [
    TinyCase(name="cogview4", family="cogview4", pipeline="CogView4Pipeline", build=_build, inputs=_inputs,
             lora_targets=_TARGETS),
]
