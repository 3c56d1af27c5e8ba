"""Tiny, randomly initialised diffusers pipelines that build offline in milliseconds.

Tests, the offline demo, CLI tests and benchmarks need the *stock* pipelines (their
timestep conventions, CFG paths and module names are what T-LoRA has to get right)
without downloading a single weight, config or tokenizer. Every pipeline here is the
real diffusers class wired to a small ``from_config`` model that keeps the real
architecture's module names (``attn1/attn2.to_q``, ``ff.net``, ``time_emb_proj``,
``transformer_blocks`` + ``single_transformer_blocks``, ...), so LoRA target lists
written for the real checkpoints match here too.

Example:
    >>> import torch
    >>> from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds
    >>> pipe = tiny_pipeline("flux")
    >>> out = pipe(**tiny_prompt_embeds(pipe), num_inference_steps=4, height=64, width=64,
    ...            output_type="np", generator=torch.Generator().manual_seed(0))
    >>> out.images.shape
    (1, 64, 64, 3)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

__all__ = ["KINDS", "tiny_pipeline", "tiny_prompt_embeds", "save_tiny_pipeline"]

KINDS: tuple[str, ...] = ("sdxl", "flux", "flux2-klein", "flux2", "sd3")

# Text-encoder widths. The denoisers' conditioning widths are derived from these, so a
# pipeline built with or without text encoders has the same denoiser config and weights.
_SDXL_TE1 = 32  # CLIP-L stand-in (768 in SDXL)
_SDXL_TE2 = 64  # CLIP-G stand-in (1280 in SDXL)
_SDXL_POOLED = 32  # text_encoder_2 projection_dim
_SDXL_TIME_EMBED = 8  # addition_time_embed_dim; SDXL feeds 6 micro-conditioning numbers
_FLUX_CLIP = 32  # pooled_projection_dim (CLIP pooler output)
_T5_DIM = 64  # T5 d_model: Flux joint_attention_dim, SD3 joint_attention_dim
_SD3_TE1 = 16  # CLIP-L stand-in; SD3 pools both CLIPs and pads their concat to T5 width
_SD3_TE2 = 32  # CLIP-G stand-in
_LLM_DIM = 16  # Qwen3 (Klein) / Mistral (Flux2 dev) hidden size
_FLUX2_TEXT_LAYERS = 3  # the Flux2 pipelines stack three hidden-state layers
_KLEIN_LLM_LAYERS = 27  # Klein reads hidden_states[(9, 18, 27)] by default
_MISTRAL_LLM_LAYERS = 30  # Flux2 dev reads hidden_states[(10, 20, 30)] by default
_LATENT_CHANNELS = 4
_CLIP_MAX_LENGTH = 77
# Sequence length of the embeddings that tiny_prompt_embeds invents (CLIP's is fixed).
_TEXT_LEN = 16

# ----------------------------------------------------------------------------- tokenizers
# Vocabularies are generated in code (bytes or characters, no merges): tokenization is
# crude but deterministic, offline, and every string encodes.

_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
_CHATML_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                    "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2, CLIP, Qwen)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return tuple(sorted(ByteLevel.alphabet()))


@functools.cache
def _clip_vocab() -> dict[str, int]:
    """CLIP's specials, then every byte alone and as a word end (``</w>``)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _byte_alphabet():
            vocab[char + suffix] = len(vocab)
    return vocab


@functools.cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    """T5's ``<pad>``, ``</s>``, ``<unk>``, then characters (word-initial ones score higher)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -2.5) for c in _CHARS] + [(c, -3.0) for c in _CHARS]
    return tuple(vocab)


@functools.cache
def _qwen_vocab() -> dict[str, int]:
    """Every byte, then the ChatML specials."""
    vocab = {char: i for i, char in enumerate(_byte_alphabet())}
    for token in _CHATML_SPECIAL:
        vocab[token] = len(vocab)
    return vocab


@functools.cache
def _mistral_vocab() -> dict[str, int]:
    """Mistral's control tokens, the 256 byte-fallback tokens, then characters."""
    vocab = {token: i for i, token in enumerate(_MISTRAL_SPECIAL)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "\u2581" + _CHARS:
        vocab[char] = len(vocab)
    return vocab


def _clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer, padded to 77 like the real one.

    Without ``model_max_length`` the pipelines' ``padding="max_length"`` overflows.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=dict(_clip_vocab()), merges=[], model_max_length=_CLIP_MAX_LENGTH)


def _t5_tokenizer() -> Any:
    """A unigram T5 tokenizer; ``extra_ids=0`` keeps the 100 sentinel tokens out of the vocab."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0)


def _qwen_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer with the ChatML specials and a chat template.

    Flux2 Klein renders prompts through ``apply_chat_template(..., enable_thinking=False)``;
    the specials must be registered as added tokens or they are split into bytes.
    """
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=dict(_qwen_vocab()), merges=[])
    tokenizer.add_tokens(list(_CHATML_SPECIAL), special_tokens=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def _mistral_tokenizer() -> Any:
    """A byte-fallback Llama-style tokenizer with a Mistral chat template, standing in for
    Flux2 dev's ``PixtralProcessor``.

    The pipeline only calls ``tokenizer.apply_chat_template`` on batches of system+user
    conversations whose contents are lists of ``{"type": "text"}`` parts, which a tokenizer
    does as well as the processor; ``PixtralProcessor`` itself refuses to build without
    torchvision, which these tiny pipelines must not require.
    """
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer(vocab=dict(_mistral_vocab()), merges=[], pad_token="<pad>")
    tokenizer.add_tokens(list(_MISTRAL_SPECIAL[3:]), special_tokens=True)
    text = (
        "{% for c in (m['content'] if m['content'] is not string else [{'type': 'text', "
        "'text': m['content']}]) %}{% if c['type'] == 'text' %}{{ c['text'] }}"
        "{% else %}[IMG]{% endif %}{% endfor %}"
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
        + text + "[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]" + text
        + "[/INST]{% else %}" + text + "{{ eos_token }}{% endif %}{% endfor %}"
    )
    return tokenizer


# -------------------------------------------------------------------------- text encoders


def _clip_text_model(hidden: int, *, projection_dim: int | None) -> torch.nn.Module:
    """A 2-layer CLIP text tower; ``projection_dim`` selects ``CLIPTextModelWithProjection``.

    The pipelines read ``hidden_states[-2]``, so two layers is the least that is not the
    embedding output. ``eos_token_id=1`` makes the pooler pick the first ``<|endoftext|>``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(_clip_vocab()), hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=projection_dim or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def _t5_encoder() -> torch.nn.Module:
    """A 2-layer T5 v1.1-style (gated-GELU) encoder, as used by Flux and SD3."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(_t5_vocab()), d_model=_T5_DIM, d_ff=2 * _T5_DIM, d_kv=_T5_DIM // 2,
        num_layers=2, num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _qwen3_encoder() -> torch.nn.Module:
    """A narrow 27-layer Qwen3, deep enough for Klein's default ``text_encoder_out_layers``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(_qwen_vocab()), hidden_size=_LLM_DIM, intermediate_size=2 * _LLM_DIM,
        num_hidden_layers=_KLEIN_LLM_LAYERS, num_attention_heads=2, num_key_value_heads=1,
        head_dim=_LLM_DIM // 2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=_qwen_vocab()["<|im_end|>"],
        pad_token_id=_qwen_vocab()["<|endoftext|>"],
    )
    return Qwen3ForCausalLM(config)


def _mistral3_encoder() -> torch.nn.Module:
    """A narrow 30-layer Mistral3 (with a 1-layer Pixtral tower), deep enough for Flux2 dev."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    vocab = _mistral_vocab()
    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(vocab), "hidden_size": _LLM_DIM,
            "intermediate_size": 2 * _LLM_DIM, "num_hidden_layers": _MISTRAL_LLM_LAYERS,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": _LLM_DIM // 2,
            "max_position_embeddings": 1024, "sliding_window": None,
            "bos_token_id": vocab["<s>"], "eos_token_id": vocab["</s>"], "pad_token_id": vocab["<pad>"],
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8,
            "image_size": 32, "patch_size": 8, "num_channels": 3,
        },
        image_token_index=vocab["[IMG]"], spatial_merge_size=2, vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config)


# ----------------------------------------------------------------------- VAEs, schedulers


def _vae(*, scaling_factor: float, shift_factor: float | None, quant_conv: bool) -> AutoencoderKL:
    """A 4-level (8x downsampling, like the real ones) 4-channel ``AutoencoderKL``."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
        layers_per_block=1, latent_channels=_LATENT_CHANNELS, norm_num_groups=8, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
    )


def _flux2_vae() -> AutoencoderKLFlux2:
    """Flux2's VAE: a plain ``AutoencoderKL`` lacks the latent batch-norm (``bn``) it uses."""
    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
        layers_per_block=1, latent_channels=_LATENT_CHANNELS, norm_num_groups=8, sample_size=64,
        use_quant_conv=True, use_post_quant_conv=True,
    )


def _flow_scheduler(*, dynamic: bool) -> FlowMatchEulerDiscreteScheduler:
    """The FLUX.1/2 scheduler config (dynamic resolution shift) or SD3's (static ``shift=3``)."""
    if not dynamic:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


# ------------------------------------------------------------------------------ builders

# A builder maps each pipeline component name to a zero-argument factory (or a plain
# value such as ``None`` or a flag); tiny_pipeline seeds every factory separately.
_Components = dict[str, Any]
_Builder = Callable[[bool], tuple[type[DiffusionPipeline], _Components]]


def _sdxl_unet() -> UNet2DConditionModel:
    """A 2-level SDXL UNet: cross-attention down/mid/up blocks and the text-time embedding."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=_LATENT_CHANNELS, out_channels=_LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
        cross_attention_dim=_SDXL_TE1 + _SDXL_TE2, addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED + _SDXL_POOLED,
    )


def _sdxl(text_encoders: bool) -> tuple[type[DiffusionPipeline], _Components]:
    """SDXL: UNet + two CLIP text towers, Euler with the SDXL ("leading", offset 1) spacing."""
    components: _Components = {
        "unet": _sdxl_unet,
        "vae": lambda: _vae(scaling_factor=0.13025, shift_factor=None, quant_conv=True),
        "scheduler": lambda: EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
            timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
        ),
        "add_watermarker": False,
        "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
    }
    if text_encoders:
        components.update(
            tokenizer=_clip_tokenizer, tokenizer_2=_clip_tokenizer,
            text_encoder=lambda: _clip_text_model(_SDXL_TE1, projection_dim=None),
            text_encoder_2=lambda: _clip_text_model(_SDXL_TE2, projection_dim=_SDXL_POOLED),
        )
    return StableDiffusionXLPipeline, components


def _flux_transformer() -> FluxTransformer2DModel:
    """FLUX.1 [dev]'s transformer: double- and single-stream blocks plus guidance embedding."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * _LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_FLUX_CLIP, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )


def _flux(text_encoders: bool) -> tuple[type[DiffusionPipeline], _Components]:
    """FLUX.1 [dev]: CLIP pooled + T5 sequence, dynamically shifted flow matching."""
    components: _Components = {
        "transformer": _flux_transformer,
        "vae": lambda: _vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
        "scheduler": lambda: _flow_scheduler(dynamic=True),
        "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
    }
    if text_encoders:
        components.update(
            tokenizer=_clip_tokenizer, tokenizer_2=_t5_tokenizer,
            text_encoder=lambda: _clip_text_model(_FLUX_CLIP, projection_dim=None),
            text_encoder_2=_t5_encoder,
        )
    return FluxPipeline, components


def _flux2_transformer(*, guidance_embeds: bool) -> Flux2Transformer2DModel:
    """Flux2's transformer; its RoPE has 4 axes (time, height, width, text position)."""
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * _LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=_FLUX2_TEXT_LAYERS * _LLM_DIM, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    )


def _flux2_klein(text_encoders: bool) -> tuple[type[DiffusionPipeline], _Components]:
    """FLUX.2 [klein] (base, undistilled): no guidance embedding, real CFG, Qwen3 text encoder."""
    components: _Components = {
        "transformer": lambda: _flux2_transformer(guidance_embeds=False),
        "vae": _flux2_vae,
        "scheduler": lambda: _flow_scheduler(dynamic=True),
        "text_encoder": None, "tokenizer": None,
    }
    if text_encoders:
        components.update(tokenizer=_qwen_tokenizer, text_encoder=_qwen3_encoder)
    return Flux2KleinPipeline, components


def _flux2(text_encoders: bool) -> tuple[type[DiffusionPipeline], _Components]:
    """FLUX.2 [dev]: guidance embedding (no CFG), Mistral3 text encoder, Mistral chat template."""
    components: _Components = {
        "transformer": lambda: _flux2_transformer(guidance_embeds=True),
        "vae": _flux2_vae,
        "scheduler": lambda: _flow_scheduler(dynamic=True),
        "text_encoder": None, "tokenizer": None,
    }
    if text_encoders:
        components.update(tokenizer=_mistral_tokenizer, text_encoder=_mistral3_encoder)
    return Flux2Pipeline, components


def _sd3_transformer() -> SD3Transformer2DModel:
    """SD3 (medium)'s MMDiT: joint blocks over patchified latents and projected captions."""
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=_LATENT_CHANNELS, out_channels=_LATENT_CHANNELS,
        num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=_T5_DIM,
        caption_projection_dim=32, pooled_projection_dim=_SD3_TE1 + _SD3_TE2,
        pos_embed_max_size=16,
    )


def _sd3(text_encoders: bool) -> tuple[type[DiffusionPipeline], _Components]:
    """SD3: two CLIPs (pooled, and their sequences padded to T5 width) + T5, static shift 3."""
    components: _Components = {
        "transformer": _sd3_transformer,
        "vae": lambda: _vae(scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False),
        "scheduler": lambda: _flow_scheduler(dynamic=False),
        "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
        "text_encoder_3": None, "tokenizer_3": None,
    }
    if text_encoders:
        components.update(
            tokenizer=_clip_tokenizer, tokenizer_2=_clip_tokenizer, tokenizer_3=_t5_tokenizer,
            text_encoder=lambda: _clip_text_model(_SD3_TE1, projection_dim=_SD3_TE1),
            text_encoder_2=lambda: _clip_text_model(_SD3_TE2, projection_dim=_SD3_TE2),
            text_encoder_3=_t5_encoder,
        )
    return StableDiffusion3Pipeline, components


_BUILDERS: dict[str, _Builder] = {
    "sdxl": _sdxl, "flux": _flux, "flux2-klein": _flux2_klein, "flux2": _flux2, "sd3": _sd3,
}


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Run ``build`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_pipeline(
    kind: str, *, seed: int = 0, text_encoders: bool = False, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Build a stock diffusers pipeline of ``kind`` around tiny random models, offline.

    Every component is initialised from its own ``torch.manual_seed(seed)``, so the same
    seed gives bit-identical weights and the denoiser and VAE do not depend on
    ``text_encoders``. Models built from a config start in train mode, where dropout makes
    identical runs differ, so all are put in ``eval()`` (``requires_grad`` stays on, as
    after ``from_pretrained``). With ``text_encoders=False`` the encoders and tokenizers
    are ``None`` and callers pass :func:`tiny_prompt_embeds`; with ``True`` a string
    prompt works.

    Example:
        >>> pipe = tiny_pipeline("sdxl", text_encoders=True)
        >>> pipe(prompt="a photo of a sks dog", num_inference_steps=4, height=64, width=64,
        ...      output_type="np").images.shape
        (1, 64, 64, 3)
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {KINDS}")
    pipeline_class, factories = _BUILDERS[kind](text_encoders)
    components = {name: _seeded(seed, factory) if callable(factory) else factory
                  for name, factory in factories.items()}
    for value in components.values():
        if isinstance(value, torch.nn.Module):
            if dtype != torch.float32:  # a no-op cast still logs a diffusers warning
                value.to(dtype=dtype)
            value.eval()
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- embeddings


_Embeds = dict[str, torch.Tensor]


def _randn(generator: torch.Generator, *shape: int, like: torch.Tensor) -> torch.Tensor:
    """CPU normal noise (reproducible across devices), moved to ``like``'s device and dtype."""
    return torch.randn(*shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _sdxl_embeds(pipe: Any, batch: int, gen: torch.Generator, ref: torch.Tensor) -> _Embeds:
    """SDXL wants the two CLIPs' penultimate states concatenated plus CLIP-G's pooled projection.

    Negatives are included so the default CFG (guidance 5.0) runs without text encoders.
    """
    config = pipe.unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    out = {}
    for prefix in ("", "negative_"):
        out[f"{prefix}prompt_embeds"] = _randn(
            gen, batch, _CLIP_MAX_LENGTH, config.cross_attention_dim, like=ref
        )
        out[f"{prefix}pooled_prompt_embeds"] = _randn(gen, batch, pooled, like=ref)
    return out


def _flux_embeds(pipe: Any, batch: int, gen: torch.Generator, ref: torch.Tensor) -> _Embeds:
    """FLUX.1 wants T5 states (joint_attention_dim) and CLIP's pooled output; no CFG by default."""
    config = pipe.transformer.config
    return {
        "prompt_embeds": _randn(gen, batch, _TEXT_LEN, config.joint_attention_dim, like=ref),
        "pooled_prompt_embeds": _randn(gen, batch, config.pooled_projection_dim, like=ref),
    }


def _flux2_embeds(pipe: Any, batch: int, gen: torch.Generator, ref: torch.Tensor) -> _Embeds:
    """FLUX.2 [dev] wants stacked LLM hidden states only (guidance is embedded, no CFG)."""
    dim = pipe.transformer.config.joint_attention_dim
    return {"prompt_embeds": _randn(gen, batch, _TEXT_LEN, dim, like=ref)}


def _flux2_klein_embeds(pipe: Any, batch: int, gen: torch.Generator, ref: torch.Tensor) -> _Embeds:
    """FLUX.2 [klein] runs real CFG at its default ``guidance_scale=4.0``: negatives are needed."""
    dim = pipe.transformer.config.joint_attention_dim
    return {
        "prompt_embeds": _randn(gen, batch, _TEXT_LEN, dim, like=ref),
        "negative_prompt_embeds": _randn(gen, batch, _TEXT_LEN, dim, like=ref),
    }


def _sd3_embeds(pipe: Any, batch: int, gen: torch.Generator, ref: torch.Tensor) -> _Embeds:
    """SD3 wants the CLIP+T5 sequence and both CLIPs' pooled outputs, with negatives for CFG 7."""
    config = pipe.transformer.config
    out = {}
    for prefix in ("", "negative_"):
        out[f"{prefix}prompt_embeds"] = _randn(gen, batch, _TEXT_LEN, config.joint_attention_dim, like=ref)
        out[f"{prefix}pooled_prompt_embeds"] = _randn(gen, batch, config.pooled_projection_dim, like=ref)
    return out


_Embedder = Callable[[Any, int, torch.Generator, torch.Tensor], _Embeds]
_EMBEDDERS: dict[type, _Embedder] = {
    StableDiffusionXLPipeline: _sdxl_embeds,
    FluxPipeline: _flux_embeds,
    Flux2KleinPipeline: _flux2_klein_embeds,
    Flux2Pipeline: _flux2_embeds,
    StableDiffusion3Pipeline: _sd3_embeds,
}


def tiny_prompt_embeds(
    pipe: DiffusionPipeline, batch_size: int = 1, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random text embeddings shaped for ``pipe``'s denoiser, as ``pipe(**kwargs)`` keywords.

    Shapes come from the denoiser's config, so this also works for pipelines reloaded with
    ``from_pretrained``; values come from a CPU generator seeded with ``seed`` and are
    moved to the denoiser's device and dtype.

    Example:
        >>> pipe = tiny_pipeline("flux2-klein")
        >>> sorted(tiny_prompt_embeds(pipe))
        ['negative_prompt_embeds', 'prompt_embeds']
    """
    embedder = next((_EMBEDDERS[c] for c in type(pipe).__mro__ if c in _EMBEDDERS), None)
    if embedder is None:
        supported = ", ".join(c.__name__ for c in _EMBEDDERS)
        raise ValueError(f"no tiny embeddings for {type(pipe).__name__}; supported: {supported}")
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    reference = next(denoiser.parameters())
    generator = torch.Generator().manual_seed(seed)
    return embedder(pipe, batch_size, generator, reference)


def save_tiny_pipeline(
    kind: str, path: str | os.PathLike[str], *, text_encoders: bool = True, **kw: Any
) -> Path:
    """Build ``tiny_pipeline(kind, text_encoders=text_encoders, **kw)`` and save it to ``path``.

    The folder stands in for a hub checkpoint in CLI tests and the offline demo, so text
    encoders and tokenizers (chat templates included) are saved by default: then
    ``DiffusionPipeline.from_pretrained(path)`` reloads every kind offline and string
    prompts work. Saved with ``text_encoders=False``, only SDXL reloads as is: the Flux,
    Flux2 and SD3 pipelines list their text encoders as required, so diffusers needs them
    passed explicitly, e.g. ``from_pretrained(path, text_encoder=None, tokenizer=None)``.

    Example:
        >>> import tempfile
        >>> from diffusers import DiffusionPipeline
        >>> path = save_tiny_pipeline("sd3", tempfile.mkdtemp())
        >>> type(DiffusionPipeline.from_pretrained(path)).__name__
        'StableDiffusion3Pipeline'
    """
    path = Path(path)
    tiny_pipeline(kind, text_encoders=text_encoders, **kw).save_pretrained(path)
    return path
