"""Tiny Sana pipeline, run from Gemma prompt embeddings and their masks."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn

_CAPTION_DIM = 16  # Gemma-2 hidden size stand-in
_TEXT_LEN = 8
# Sana's feed-forward (GLUMBConv) is convolutions only: the Linear layers are attention's.
_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _vae():
    """A two-level deep-compression autoencoder (2x; the real DC-AE compresses 32x)."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def _scheduler():
    """Sana's flow-matching DPM-Solver++ (integer timesteps)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    )


def _build(seed: int):
    from diffusers import SanaPipeline, SanaTransformer2DModel

    def make():
        transformer = SanaTransformer2DModel(
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=_CAPTION_DIM, sample_size=8, patch_size=1,
        )
        return SanaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                            scheduler=_scheduler())

    return finish(seeded(seed, make))


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # guidance_scale > 1 with negative embeddings: CFG batches both halves into one call.
    # Resolution binning needs a released sample_size; the tiny model has none.
    return {
        "prompt_embeds": randn(g, 1, _TEXT_LEN, _CAPTION_DIM),
        "prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "negative_prompt_embeds": randn(g, 1, _TEXT_LEN, _CAPTION_DIM),
        "negative_prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "negative_prompt": None, "guidance_scale": 4.5, "use_resolution_binning": False,
        "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }


CASES = [
    TinyCase(name="sana", family="sana", pipeline="SanaPipeline", build=_build, inputs=_inputs, lora_targets=_TARGETS),
]
