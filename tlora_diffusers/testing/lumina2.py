"""Tiny Lumina-Image 2.0 pipeline, run from Gemma-2 prompt embeddings and their masks."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn, vae

_CAP_DIM = 16  # Gemma-2 hidden size stand-in
_TEXT_LEN = 8
_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3",
)


def _build(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    def make():
        # Grouped-query attention (2 heads, 1 KV head) as in the released model (24/8).
        transformer = Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, hidden_size=32, num_layers=2,
            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, norm_eps=1e-5,
            scaling_factor=1.0, axes_dim_rope=(8, 4, 4), axes_lens=(300, 64, 64), cap_feat_dim=_CAP_DIM,
        )
        return Lumina2Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0),
            vae=vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False), text_encoder=None, tokenizer=None,
        )

    return finish(seeded(seed, make))


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # guidance_scale > 1 with negative embeddings: CFG is a second, separate call (at every
    # step with the default cfg_trunc_ratio=1.0).
    return {
        "prompt_embeds": randn(g, 1, _TEXT_LEN, _CAP_DIM),
        "prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "negative_prompt_embeds": randn(g, 1, _TEXT_LEN, _CAP_DIM),
        "negative_prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "guidance_scale": 4.0, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }


CASES = [
    TinyCase(name="lumina2", family="lumina2", pipeline="Lumina2Pipeline", build=_build, inputs=_inputs,
             lora_targets=_TARGETS),
]
