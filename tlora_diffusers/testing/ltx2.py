"""Tiny LTX-2 (audio + video) pipelines: T2V, I2V, conditions, IC-LoRA, HDR, DFR, DFR temporal refine, modular.

One denoiser class, ``LTX2VideoTransformer3DModel``, denoises a video and an audio
sequence together, so every call takes a video ``timestep`` *and* an ``audio_timestep``
(plus ``sigma``/``audio_sigma`` for the LTX-2.3+ prompt modulation), all on the
``scheduler.timesteps`` scale (``t``, 0..1000). The conditioned pipelines pass the video
timestep per token, ``t * (1 - conditioning_mask)`` of shape ``(B, seq)`` (0 on clean
conditioning tokens), while the audio timestep stays ``(B,)``; the DFR temporal refine
round holds the audio at timestep 0.

The transformer keeps the real module names (``transformer_blocks.N.attn1/attn2/
audio_attn1/audio_attn2/audio_to_video_attn/video_to_audio_attn/ff/audio_ff``) in three
configurations: LTX-2.0 (caption projections), LTX-2.3 (gated attention, timestep-modulated
prompt cross-attention fed by ``sigma``) and LTX-2.5 (static prompt modulation, keyframe
embedding, bias-free video FF). The video VAE is one spatio-temporal level after a
patch-8 patchify (16x spatial, 2x temporal: a 32x32 frame is 2x2 latent tokens), the
audio VAE the smallest ``AutoencoderKLLTX2Audio``; no vocoder is built since every case
returns latents. Prompts go in as packed Gemma-style hidden states (``prompt_embeds``,
two layers of 16) that the real ``LTX2TextConnectors`` adapt, so no Gemma is built. The
guidance defaults are kept (CFG as one doubled batch, then a separate STG call and a
separate modality-isolation call per step, all at the same ``t``), with the STG block
moved to block 1 of the 2-layer model.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_CAPTION = 16  # Gemma hidden size stand-in (3840 in the checkpoints)
_TEXT_LAYERS = 2  # packed hidden-state layers (49 for Gemma-3-12B)
_TEXT_DIM = _CAPTION * _TEXT_LAYERS  # width of `prompt_embeds`
_INNER = 16  # video: 2 heads x 8
_AUDIO_INNER = 8  # audio: 2 heads x 4
_LATENT = 4  # video latent channels (128 in the checkpoints)
_AUDIO_LATENT = 2  # audio latent channels; 8 mel bins / 4 -> 2 latent mel bins
_SIZE, _FRAMES, _FPS = 32, 9, 25.0  # 2x2 latent tokens per frame, 5 latent frames, 9 audio tokens
_STG_BLOCKS = [1]  # the checkpoints' default [28] does not exist in a 2-layer model
_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2",
)


def _transformer(variant: str):
    from diffusers import LTX2VideoTransformer3DModel

    later = variant != "2.0"
    transformer = LTX2VideoTransformer3DModel(
        in_channels=_LATENT, out_channels=_LATENT, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=_INNER // 2, cross_attention_dim=_INNER, vae_scale_factors=(2, 16, 16),
        audio_in_channels=_AUDIO_LATENT * 2, audio_out_channels=_AUDIO_LATENT * 2, audio_num_attention_heads=2,
        audio_attention_head_dim=_AUDIO_INNER // 2, audio_cross_attention_dim=_AUDIO_INNER, num_layers=2,
        caption_channels=_CAPTION, rope_double_precision=False, rope_type="split",
        gated_attn=later, audio_gated_attn=later, cross_attn_mod=later, audio_cross_attn_mod=later,
        use_prompt_embeddings=not later, use_prompt_adaln_single=variant != "2.5", ff_bias=variant != "2.5",
        use_keyframes_abs_pos_embedding=variant == "2.5",
    )
    if variant == "2.5":
        # Zero-initialised in the checkpoint format; non-zero here so the keyframe marker reaches the output.
        torch.nn.init.normal_(transformer.keyframes_abs_pos_embedding, std=0.1)
    return transformer


def _connectors(variant: str):
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    return LTX2TextConnectors(
        caption_channels=_CAPTION, text_proj_in_factor=_TEXT_LAYERS, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=_INNER // 2, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=(_INNER if variant == "2.0" else _AUDIO_INNER) // 2,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
        rope_double_precision=False, rope_type="split", per_modality_projections=variant != "2.0",
        video_hidden_dim=_INNER, audio_hidden_dim=_AUDIO_INNER,
    )


def _vae():
    from diffusers import AutoencoderKLLTX2Video

    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=_LATENT, block_out_channels=(8,),
        decoder_block_out_channels=(8,), layers_per_block=(1,), decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False), downsample_type=("spatiotemporal",), upsample_type=("spatiotemporal",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=8,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return vae


def _audio_vae():
    from diffusers import AutoencoderKLLTX2Audio

    return AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=_AUDIO_LATENT, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    )


def _scheduler(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXEulerAncestralRFScheduler

    if kind == "full":  # the dev checkpoints: resolution-dependent shift, stretched to a 0.1 terminal sigma
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
            base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
        )
    if kind == "distilled":  # fixed sigma lists (DFR refuses dynamic shifting: it passes no `mu`)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return LTXEulerAncestralRFScheduler(eta=0.5)  # the DFR temporal refine round


def _components(seed: int, variant: str, scheduler: str) -> dict:
    return dict(
        scheduler=_scheduler(scheduler), vae=seeded(seed, _vae), audio_vae=seeded(seed, _audio_vae),
        text_encoder=None, tokenizer=None, connectors=seeded(seed, lambda: _connectors(variant)),
        transformer=seeded(seed, lambda: _transformer(variant)), vocoder=None,
    )


def _build(pipeline: str, variant: str, scheduler: str = "full"):
    def build(seed: int) -> Any:
        import diffusers

        components = _components(seed, variant, scheduler)
        if pipeline == "LTX2DFRTemporalRefinePipeline":
            from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel

            components["temporal_latent_upsampler"] = seeded(seed, lambda: LTX2LatentUpsamplerModel(
                in_channels=_LATENT, mid_channels=32, num_blocks_per_stage=1, dims=3, spatial_upsample=False,
                temporal_upsample=True,
            ))
        return finish(getattr(diffusers, pipeline)(**components))

    return build


def _like(pipe: Any) -> torch.Tensor:
    return torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)


def _prompt(g: torch.Generator, like: torch.Tensor, *, negative: bool = True) -> dict:
    """Packed per-layer text-encoder states and masks, as the pipelines' Gemma path returns them."""
    mask = torch.ones(1, TEXT_LEN, dtype=torch.long, device=like.device)
    kwargs = dict(prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), prompt_attention_mask=mask)
    if negative:
        kwargs.update(negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
                      negative_prompt_attention_mask=mask.clone())
    return kwargs


def _common(seed: int) -> dict:
    return dict(height=_SIZE, width=_SIZE, num_frames=_FRAMES, frame_rate=_FPS, output_type="latent",
                generator=torch.Generator().manual_seed(seed))


def _guided(seed: int) -> dict:
    """The full-model pipelines: 2 steps, default CFG + STG + modality guidance, STG on an existing block."""
    return dict(_common(seed), num_inference_steps=2, spatio_temporal_guidance_blocks=list(_STG_BLOCKS))


def _image(g: torch.Generator) -> torch.Tensor:
    return torch.rand(1, 3, _SIZE, _SIZE, generator=g)


def _t2v_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(_prompt(g, _like(pipe)), **_guided(seed))


def _i2v_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    # image_crf=0 skips the H.264 re-compression (PyAV) of the conditioning image.
    return dict(_prompt(g, _like(pipe)), image=_image(g), image_crf=0, **_guided(seed))


def _condition_inputs(pipe: Any, seed: int) -> dict:
    from diffusers.pipelines.ltx2 import LTX2VideoCondition

    g = torch.Generator().manual_seed(seed)
    conditions = [
        # First latent frame replaced in place (timestep 0), last latent frame appended as keyframe tokens at half
        # strength (timestep t/2): per-token timesteps of three values.
        LTX2VideoCondition(frames=_image(g), index=0, strength=1.0, crf=0),
        LTX2VideoCondition(frames=_image(g), index=4, strength=0.5, crf=0),
    ]
    return dict(_prompt(g, _like(pipe)), conditions=conditions, **_guided(seed))


def _in_context_inputs(pipe: Any, seed: int) -> dict:
    from diffusers.pipelines.ltx2 import LTX2ReferenceCondition

    g = torch.Generator().manual_seed(seed)
    reference = LTX2ReferenceCondition(frames=torch.rand(1, 5, 3, _SIZE, _SIZE, generator=g), strength=1.0)
    return dict(_prompt(g, _like(pipe)), reference_conditions=reference, **_guided(seed))


def _hdr_inputs(pipe: Any, seed: int) -> dict:
    from diffusers.pipelines.ltx2 import LTX2HDRReferenceCondition

    g = torch.Generator().manual_seed(seed)
    reference = LTX2HDRReferenceCondition(frames=_image(g), strength=1.0)
    # Distilled defaults (guidance 1, no STG/modality): one un-doubled call per step.
    return dict(_prompt(g, _like(pipe), negative=False), reference_conditions=reference, num_inference_steps=2,
                **_common(seed))


def _dfr_inputs(pipe: Any, seed: int) -> dict:
    from diffusers.pipelines.ltx2 import LTX2VideoCondition

    g = torch.Generator().manual_seed(seed)
    # No CFG; a first-frame image condition (timestep 0) and, by default (generate_slots=True), one keyframe-slot
    # latent frame appended after the canvas (timestep t).
    condition = LTX2VideoCondition(frames=_image(g), index=0, strength=1.0, crf=0)
    return dict(_prompt(g, _like(pipe), negative=False), conditions=[condition], sigmas=[1.0, 0.5], **_common(seed))


def _refine_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    frames, side = (_FRAMES - 1) // 2 + 1, _SIZE // 16  # latent grid of the 2x temporal / 16x spatial VAE
    audio_tokens = round(_FRAMES / _FPS * 16000 / 160 / 4)  # sample rate / hop / audio VAE temporal ratio
    # A previous DFR pass's raw outputs: the canvas, one carried keyframe at the last pixel frame, frozen audio.
    return dict(
        _prompt(g, _like(pipe), negative=False), latents=torch.randn(1, _LATENT, frames, side, side, generator=g),
        keyframes_latents=torch.randn(1, _LATENT, 1, side, side, generator=g), keyframe_positions=[_FRAMES - 1],
        audio_latents=torch.randn(1, _AUDIO_LATENT, audio_tokens, 2, generator=g), sigmas=[0.75, 0.25],
        **_common(seed),
    )


# ------------------------------------------------------------------------------------ modular


def _quiet(blocks: Any) -> None:
    """Hide every loop's progress bar: `ModularPipeline.set_progress_bar_config` reaches only the top-level blocks."""
    if hasattr(blocks, "set_progress_bar_config"):
        blocks.set_progress_bar_config(disable=True)
    for sub_block in getattr(blocks, "sub_blocks", {}).values():
        _quiet(sub_block)


def _build_modular(pipeline: str, variant: str):
    def build(seed: int) -> Any:
        from diffusers.guiders import LTX2Guidance
        from diffusers.modular_pipelines import LTX2AutoBlocks, LTX25AutoBlocks

        from ._parts import qwen_tokenizer

        blocks = (LTX25AutoBlocks if pipeline == "LTX25ModularPipeline" else LTX2AutoBlocks)()
        # Feed the packed text-encoder states directly: drop the Gemma step, keep the connectors step.
        blocks.sub_blocks["text_encoder"].sub_blocks.pop("text_encoder")
        _quiet(blocks)
        pipe = blocks.init_pipeline()
        assert type(pipe).__name__ == pipeline, type(pipe).__name__
        components = _components(seed, variant, "full")
        for name in ("text_encoder", "vocoder"):
            components.pop(name)
        # The connectors step reads only `tokenizer.padding_side`; any tokenizer does.
        tokenizer = qwen_tokenizer()
        tokenizer.padding_side = "left"
        components["tokenizer"] = tokenizer
        components["guider"] = LTX2Guidance(guidance_scale=3.0, stg_scale=1.0, modality_scale=3.0,
                                            guidance_rescale=0.7, spatio_temporal_guidance_blocks=list(_STG_BLOCKS))
        components["audio_guider"] = LTX2Guidance(guidance_scale=7.0, stg_scale=1.0, modality_scale=3.0,
                                                  guidance_rescale=0.7)
        pipe.update_components(**components)
        return finish(pipe)

    return build


def _modular_inputs(*, condition: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        # `batch_size` and `dtype` are what the dropped Gemma step would have reported.
        kwargs = dict(_prompt(g, _like(pipe)), batch_size=1, dtype=pipe.transformer.dtype, num_inference_steps=2,
                      output="videos", **_common(seed))
        if condition:
            from diffusers.pipelines.ltx2 import LTX2VideoCondition

            kwargs["conditions"] = [LTX2VideoCondition(frames=_image(g), index=0, strength=1.0, crf=0)]
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="ltx2", family="ltx2", pipeline="LTX2Pipeline", build=_build("LTX2Pipeline", "2.0"),
        inputs=_t2v_inputs, lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        # The image latent frame gets video timestep 0; the audio timestep stays t.
        name="ltx2-i2v", family="ltx2", pipeline="LTX2ImageToVideoPipeline",
        build=_build("LTX2ImageToVideoPipeline", "2.0"), inputs=_i2v_inputs, lora_targets=_LORA_TARGETS,
        per_token=True,
    ),
    TinyCase(
        name="ltx2-condition", family="ltx2", pipeline="LTX2ConditionPipeline",
        build=_build("LTX2ConditionPipeline", "2.3"), inputs=_condition_inputs, lora_targets=_LORA_TARGETS,
        per_token=True,
    ),
    TinyCase(
        # Reference-video tokens appended at timestep 0.
        name="ltx2-ic-lora", family="ltx2", pipeline="LTX2InContextPipeline",
        build=_build("LTX2InContextPipeline", "2.0"), inputs=_in_context_inputs, lora_targets=_LORA_TARGETS,
        per_token=True,
    ),
    TinyCase(
        name="ltx2-hdr", family="ltx2", pipeline="LTX2HDRPipeline",
        build=_build("LTX2HDRPipeline", "2.3", "distilled"), inputs=_hdr_inputs, lora_targets=_LORA_TARGETS,
        per_token=True,
    ),
    TinyCase(
        name="ltx2-dfr", family="ltx2", pipeline="LTX2DFRPipeline",
        build=_build("LTX2DFRPipeline", "2.5", "distilled"), inputs=_dfr_inputs, lora_targets=_LORA_TARGETS,
        per_token=True,
    ),
    TinyCase(
        # Ancestral RF scheduler; the audio is frozen at timestep 0 while the video is denoised.
        name="ltx2-dfr-temporal", family="ltx2", pipeline="LTX2DFRTemporalRefinePipeline",
        build=_build("LTX2DFRTemporalRefinePipeline", "2.5", "ancestral"), inputs=_refine_inputs,
        lora_targets=_LORA_TARGETS, per_token=True,
    ),
    TinyCase(
        # One un-doubled call per guidance pass (cond, uncond, STG, modality); loop t in `guider._timestep`.
        name="ltx2-modular", family="ltx2", pipeline="LTX2ModularPipeline",
        build=_build_modular("LTX2ModularPipeline", "2.0"), inputs=_modular_inputs(condition=False),
        lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="ltx2.5-modular-condition", family="ltx2", pipeline="LTX25ModularPipeline",
        build=_build_modular("LTX25ModularPipeline", "2.5"), inputs=_modular_inputs(condition=True),
        lora_targets=_LORA_TARGETS, per_token=True,
    ),
]
