"""Tiny Bria FIBO pipelines: FIBO and FIBO Edit (``BriaFiboTransformer2DModel``) and FIBO 2.0
(``BriaFibo2Transformer2DModel``), each plain and with a reference image.

FIBO / FIBO Edit take no prompt embeddings (they always run their SmolLM3 text encoder,
and the layer-wise text conditioning feeds every block), so a narrow 2-layer SmolLM3 and a
byte-level tokenizer are built; its vocabulary reaches FIBO's hard-coded ``<bot>`` id
(128000), which encodes the default empty negative prompt. Both run CFG in one doubled batch
with the raw scheduler timestep. FIBO Edit needs a JSON prompt with an ``edit_instruction``;
its reference goes through the 16x-spatial ``AutoencoderKLWan`` (Wan 2.2 layout) and joins
the sequence as clean tokens on its own RoPE plane. FIBO 2.0 takes embeddings
(``(B, 1 + injection blocks, len, dim)``), runs the negative prompt as a second call and
gives the transformer ``t / 1000``; its edit path encodes the reference with the FLUX.2 VAE
into clean ``context_latents``. VAE decoding is skipped (``output_type="latent"``).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, flux2_vae, qwen_tokenizer, randn

__all__ = ["CASES", "FIBO2_LORA_TARGETS", "FIBO_LORA_TARGETS"]

_LLM_DIM = 16  # SmolLM3-3B hidden size stand-in (2048); FIBO concatenates the last two layers
_FIBO_LATENT = 16  # Wan 2.2 VAE latent channels stand-in (48)
_FIBO_BOT_TOKEN = 128000  # hard-coded in BriaFiboPipeline.get_prompt_embeds for empty prompts
_FIBO2_TEXT_DIM = 16  # stacked Qwen3-VL hidden states stand-in (7680)
_FIBO2_BUNDLES = 2  # the Perceiver's bundle + one per injection block (6 in the checkpoint)
_FIBO2_LATENT = 4  # FLUX.2 VAE latent channels (the _parts stand-in)
FIBO_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "ff.net.0.proj",
                     "ff.net.2", "proj_mlp")
FIBO2_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _fibo_transformer():
    from diffusers import BriaFiboTransformer2DModel

    return BriaFiboTransformer2DModel(
        patch_size=1, in_channels=_FIBO_LATENT, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=2 * _LLM_DIM, axes_dims_rope=[4, 6, 6], text_encoder_dim=_LLM_DIM,
    )


def _smollm3():
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    tokenizer = qwen_tokenizer()
    config = SmolLM3Config(
        vocab_size=_FIBO_BOT_TOKEN + 1, hidden_size=_LLM_DIM, intermediate_size=2 * _LLM_DIM, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=None,
    )
    return SmolLM3ForCausalLM(config)


def _wan22_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=_FIBO_LATENT, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
        latents_mean=[0.0] * _FIBO_LATENT, latents_std=[1.0] * _FIBO_LATENT, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
    )


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Both pipelines pass a resolution-dependent `mu`.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def _build_fibo(edit: bool):
    def build(seed: int) -> Any:
        import diffusers

        cls = diffusers.BriaFiboEditPipeline if edit else diffusers.BriaFiboPipeline
        return finish(cls(
            transformer=seeded(seed, _fibo_transformer), scheduler=_flow_scheduler(),
            vae=seeded(seed, _wan22_vae) if edit else None, text_encoder=seeded(seed, _smollm3),
            tokenizer=qwen_tokenizer(),
        ))

    return build


def _fibo2_transformer():
    from diffusers import BriaFibo2Transformer2DModel

    model = BriaFibo2Transformer2DModel(
        in_channels=_FIBO2_LATENT, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        cap_feat_dim=_FIBO2_TEXT_DIM, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4,
        max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4, gist_max_text_len=32, axes_dims=(4, 6, 6),
        axes_lens=(64, 32, 32),
    )
    with torch.no_grad():  # the injection blocks' cross-attention gates start at 0 (closed); open them
        for layer in model.layers:
            if layer.cross_attention is not None:
                layer.cross_attn_gate.fill_(0.5)
    return model


def _build_fibo2(edit: bool):
    def build(seed: int) -> Any:
        from diffusers import BriaFibo2Pipeline

        return finish(BriaFibo2Pipeline(
            transformer=seeded(seed, _fibo2_transformer), scheduler=_flow_scheduler(),
            vae=seeded(seed, flux2_vae) if edit else None, text_encoder=None, processor=None,
        ))

    return build


def _image(seed: int, size: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed + 100)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


def _fibo_inputs(*, edit: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        kwargs = dict(
            prompt="a red cube on a table", height=32, width=32, num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed), output_type="latent",
        )
        if edit:
            kwargs.update(prompt=json.dumps({"edit_instruction": "make the cube blue"}), image=_image(seed, 16))
        return kwargs

    return inputs


def _fibo2_inputs(*, edit: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        shape = (1, _FIBO2_BUNDLES, TEXT_LEN, _FIBO2_TEXT_DIM)
        kwargs = dict(
            prompt_embeds=randn(g, *shape, like=like), negative_prompt_embeds=randn(g, *shape, like=like),
            height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
        if edit:
            kwargs["image"] = _image(seed, 32)
        return kwargs

    return inputs


CASES = [
    TinyCase("bria-fibo", "bria-fibo", "BriaFiboPipeline", _build_fibo(edit=False), _fibo_inputs(edit=False),
             FIBO_LORA_TARGETS),
    TinyCase("bria-fibo-edit", "bria-fibo", "BriaFiboEditPipeline", _build_fibo(edit=True), _fibo_inputs(edit=True),
             FIBO_LORA_TARGETS),
    TinyCase("bria-fibo2", "bria-fibo2", "BriaFibo2Pipeline", _build_fibo2(edit=False), _fibo2_inputs(edit=False),
             FIBO2_LORA_TARGETS),
    TinyCase("bria-fibo2-edit", "bria-fibo2", "BriaFibo2Pipeline", _build_fibo2(edit=True), _fibo2_inputs(edit=True),
             FIBO2_LORA_TARGETS),
]
