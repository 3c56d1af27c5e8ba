"""Tiny PixArt-α and PixArt-Σ pipelines, run from T5 prompt embeddings and their masks."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn, vae

_T5_DIM = 32  # caption_channels (T5 d_model stand-in)
_TEXT_LEN = 8
_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _scheduler():
    """PixArt's DPM-Solver++ over the linear-beta DDPM schedule (integer timesteps)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", solver_order=2,
    )


def _build(cls_name: str, seed: int):
    import diffusers
    from diffusers import PixArtTransformer2DModel

    def make():
        # out_channels = 2 x latent channels: the learned-sigma half the pipelines drop.
        # sample_size 8 (not 128) keeps PixArt-α's resolution/aspect micro-conditioning off.
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=_T5_DIM, in_channels=LATENT_CHANNELS, cross_attention_dim=24,
            out_channels=2 * LATENT_CHANNELS, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        )
        return getattr(diffusers, cls_name)(
            tokenizer=None, text_encoder=None, transformer=transformer, scheduler=_scheduler(),
            vae=vae(scaling_factor=0.18215, shift_factor=None, quant_conv=True),
        )

    return finish(seeded(seed, make))


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # guidance_scale > 1 with negative embeddings: CFG batches both halves into one call.
    # Resolution binning needs a released sample_size; the tiny model has none.
    return {
        "prompt_embeds": randn(g, 1, _TEXT_LEN, _T5_DIM),
        "prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "negative_prompt_embeds": randn(g, 1, _TEXT_LEN, _T5_DIM),
        "negative_prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "negative_prompt": None, "guidance_scale": 4.5, "use_resolution_binning": False,
        "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }


CASES = [
    TinyCase(name="pixart-alpha", family="pixart", pipeline="PixArtAlphaPipeline",
             build=lambda seed: _build("PixArtAlphaPipeline", seed), inputs=_inputs, lora_targets=_TARGETS),
    TinyCase(name="pixart-sigma", family="pixart", pipeline="PixArtSigmaPipeline",
             build=lambda seed: _build("PixArtSigmaPipeline", seed), inputs=_inputs, lora_targets=_TARGETS),
]
