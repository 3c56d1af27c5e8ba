"""Tiny Chroma pipeline, run from T5 prompt embeddings and their masks."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, flow_scheduler, randn, vae

_T5_DIM = 32  # joint_attention_dim (T5 d_model stand-in)
_TEXT_LEN = 8
# Single-stream blocks have no attn.to_out: their attention output and MLP share proj_out.
# "single_transformer_blocks.0.proj_out" spells the (only) single block's, so the model's
# final proj_out stays out (a PEFT list entry matches by suffix).
_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "single_transformer_blocks.0.proj_out",
)


def _build(seed: int):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    def make():
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=_T5_DIM, axes_dims_rope=(4, 4, 8),
            approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
        )
        return ChromaPipeline(
            scheduler=flow_scheduler(dynamic=True), text_encoder=None, tokenizer=None, transformer=transformer,
            vae=vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
            image_encoder=None, feature_extractor=None,
        )

    return finish(seeded(seed, make))


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # The pipeline's own T5 path returns the mask in the embeddings' dtype (float), not long.
    # guidance_scale > 1 with negative embeddings: CFG is a second, separate call.
    return {
        "prompt_embeds": randn(g, 1, _TEXT_LEN, _T5_DIM),
        "prompt_attention_mask": torch.ones(1, _TEXT_LEN),
        "negative_prompt_embeds": randn(g, 1, _TEXT_LEN, _T5_DIM),
        "negative_prompt_attention_mask": torch.ones(1, _TEXT_LEN),
        "guidance_scale": 5.0, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }


CASES = [
    TinyCase(name="chroma", family="chroma", pipeline="ChromaPipeline", build=_build, inputs=_inputs,
             lora_targets=_TARGETS),
]
