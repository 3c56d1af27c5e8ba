"""Tiny AuraFlow pipeline, run from UMT5 prompt embeddings and their masks."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn, vae

_T5_DIM = 32  # joint_attention_dim (UMT5 d_model stand-in)
_TEXT_LEN = 8
_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.linear_1", "ff.linear_2", "ff.out_projection", "ff_context.linear_1", "ff_context.linear_2",
    "ff_context.out_projection",
)


def _build(seed: int):
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    def make():
        transformer = AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=_T5_DIM, caption_projection_dim=32,
            out_channels=LATENT_CHANNELS, pos_embed_max_size=256,
        )
        return AuraFlowPipeline(
            tokenizer=None, text_encoder=None, transformer=transformer,
            vae=vae(scaling_factor=0.13025, shift_factor=None, quant_conv=True),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.73),
        )

    return finish(seeded(seed, make))


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # guidance_scale > 1 with negative embeddings: CFG batches both halves into one call.
    return {
        "prompt_embeds": randn(g, 1, _TEXT_LEN, _T5_DIM),
        "prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "negative_prompt_embeds": randn(g, 1, _TEXT_LEN, _T5_DIM),
        "negative_prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
        "guidance_scale": 3.5, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }


CASES = [
    TinyCase(name="auraflow", family="auraflow", pipeline="AuraFlowPipeline", build=_build, inputs=_inputs,
             lora_targets=_TARGETS),
]
