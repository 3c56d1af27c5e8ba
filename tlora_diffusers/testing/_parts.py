"""Shared pieces of the tiny pipelines: tokenizers from generated vocabularies, narrow text
encoders, 4-level VAEs and the stock schedulers' configs. Nothing here downloads anything.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = [
    "clip_tokenizer", "t5_tokenizer", "qwen_tokenizer", "mistral_tokenizer", "clip_text_model", "t5_encoder",
    "qwen3_encoder", "mistral3_encoder", "vae", "flux2_vae", "flow_scheduler", "finish", "randn", "CLIP_MAX_LENGTH",
    "TEXT_LEN", "LATENT_CHANNELS", "unzero",
]

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
LATENT_CHANNELS = 4
CLIP_MAX_LENGTH = 77
# Sequence length of the embeddings that tiny_prompt_embeds invents (CLIP's is fixed).
TEXT_LEN = 16

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


def clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer, padded to 77 like the real one.

    Without ``model_max_length`` the pipelines' ``padding="max_length"`` overflows.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=dict(_clip_vocab()), merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> Any:
    """A unigram T5 tokenizer; ``extra_ids=0`` keeps the 100 sentinel tokens out of the vocab."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0)


def qwen_tokenizer() -> Any:
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


def mistral_tokenizer() -> Any:
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


def clip_text_model(hidden: int, *, projection_dim: int | None) -> torch.nn.Module:
    """A 2-layer CLIP text tower; ``projection_dim`` selects ``CLIPTextModelWithProjection``.

    The pipelines read ``hidden_states[-2]``, so two layers is the least that is not the
    embedding output. ``eos_token_id=1`` makes the pooler pick the first ``<|endoftext|>``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(_clip_vocab()), hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def t5_encoder() -> torch.nn.Module:
    """A 2-layer T5 v1.1-style (gated-GELU) encoder, as used by Flux and SD3."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(_t5_vocab()), d_model=_T5_DIM, d_ff=2 * _T5_DIM, d_kv=_T5_DIM // 2,
        num_layers=2, num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def qwen3_encoder() -> torch.nn.Module:
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


def mistral3_encoder() -> torch.nn.Module:
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


def vae(*, scaling_factor: float, shift_factor: float | None, quant_conv: bool):
    """A 4-level (8x downsampling, like the real ones) 4-channel ``AutoencoderKL``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
        layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
    )


def flux2_vae():
    """Flux2's VAE: a plain ``AutoencoderKL`` lacks the latent batch-norm (``bn``) it uses."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
        layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=64,
        use_quant_conv=True, use_post_quant_conv=True,
    )


def flow_scheduler(*, dynamic: bool):
    """The FLUX.1/2 scheduler config (dynamic resolution shift) or SD3's (static ``shift=3``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not dynamic:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def finish(pipe: Any) -> Any:
    """Put every module of a freshly built pipeline in ``eval()`` (dropout off) and hide its progress bar."""
    for value in pipe.components.values():
        if isinstance(value, torch.nn.Module):
            value.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randn(generator: torch.Generator, *shape: int, like: Any = None) -> torch.Tensor:
    """CPU normal noise (reproducible across devices), moved to ``like``'s device and dtype."""
    x = torch.randn(*shape, generator=generator)
    return x if like is None else x.to(device=like.device, dtype=like.dtype)


def unzero(net: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Give a ControlNet's zero-initialised projections (``zero_module``) small random weights, so that the
    control branch, and a test LoRA on it (rightly or wrongly masked), reach the output."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) \
                    and not module.weight.any():
                module.weight.normal_(std=std)
    return net
