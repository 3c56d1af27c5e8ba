"""Tiny HiDream-I1 pipeline, run from T5, Llama (stacked layers) and pooled CLIP embeddings."""

from __future__ import annotations

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn, vae

_T5_DIM = 32  # caption_channels[0]: the T5 projection's input
_LLAMA_DIM = 16  # caption_channels[1]: each Llama layer's projection input
_LLAMA_LAYERS = 2  # hidden states the stand-in "Llama" stacks; llama_layers picks (0, 1)
_POOLED_DIM = 32  # text_emb_dim: two CLIP poolers concatenated
_TEXT_LEN = 8
_SAMPLE_SIZE = 32  # latent side the pipeline rescales every request to (128 in the stock pipeline)
_TARGETS = ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t", "w1", "w2", "w3")


def _scheduler():
    """HiDream-I1-Full's flow UniPC (the pipeline has a branch of its own for UniPC)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    )


def _build(seed: int):
    """The pipeline rescales every request to the area of ``default_sample_size``² latents
    (128², 4096 tokens, about 0.5 s a call here); the tiny pipeline's is set to 32 (256 tokens
    of 2x2 patches), the only attribute changed after construction. ``max_resolution`` matches
    it (non-square latents are padded to ``max_resolution`` / patch tokens)."""
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    def make():
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=1,
            num_single_layers=1, attention_head_dim=8, num_attention_heads=4, caption_channels=[_T5_DIM, _LLAMA_DIM],
            text_emb_dim=_POOLED_DIM, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
            max_resolution=(_SAMPLE_SIZE, _SAMPLE_SIZE), llama_layers=(0, 1),
        )
        parts = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3", "_4")}
        pipe = HiDreamImagePipeline(
            scheduler=_scheduler(),
            vae=vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False), transformer=transformer, **parts,
        )
        pipe.default_sample_size = _SAMPLE_SIZE
        return pipe

    return finish(seeded(seed, make))


def _inputs(pipe, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # guidance_scale > 1 with negative embeddings: CFG batches both halves into one call.
    # height and width only choose the aspect ratio (see _build).
    return {
        "prompt_embeds_t5": randn(g, 1, _TEXT_LEN, _T5_DIM),
        "prompt_embeds_llama3": randn(g, _LLAMA_LAYERS, 1, _TEXT_LEN, _LLAMA_DIM),
        "pooled_prompt_embeds": randn(g, 1, _POOLED_DIM),
        "negative_prompt_embeds_t5": randn(g, 1, _TEXT_LEN, _T5_DIM),
        "negative_prompt_embeds_llama3": randn(g, _LLAMA_LAYERS, 1, _TEXT_LEN, _LLAMA_DIM),
        "negative_pooled_prompt_embeds": randn(g, 1, _POOLED_DIM),
        "guidance_scale": 5.0, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }


CASES = [
    TinyCase(name="hidream", family="hidream", pipeline="HiDreamImagePipeline", build=_build, inputs=_inputs,
             lora_targets=_TARGETS),
]
