"""LTX-2 (``LTX2VideoTransformer3DModel``, audio + video): scheduler units, per-token video timesteps, audio layers
follow ``audio_timestep``.

Every LTX-2 pipeline of diffusers 0.42.1 passes ``timestep`` in scheduler units, float32, never cast
(``pipelines/ltx2/pipeline_ltx2.py``: ``timestep = t.expand(B)``). The image-, condition-, in-context-,
HDR- and DFR-pipelines pass one timestep per video token, ``t * (1 - conditioning_mask)`` of shape
``(B, seq)``: 0 on conditioning tokens, ``strength``-scaled on keyframe conditions, ``0.05·t`` on carried
DFR anchors. Audio rows see ``audio_timestep``: ``t`` in most runs, ``audio_scheduler.timesteps[i]`` when a
separately configured audio scheduler is given, 0 in the DFR temporal refine (frozen audio); the audio
layers are masked by it. The pipelines set ``pipe._current_timestep = t``; the modular LTX-2 / LTX-2.5
pipelines keep it in their guider. ``EchoModularPipeline`` (same transformer) has no scheduler: its DMD
loop passes ``σ·1000`` per token, masked by the argument itself with ``T = 1000``.
"""

from . import ModelFamily, conventions, token_layer_rule

_BLOCK = r"(^|\.)transformer_blocks\.\d+\."

FAMILY = ModelFamily(
    name="ltx2",
    denoisers=("LTX2VideoTransformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline", "LTX2InContextPipeline",
               "LTX2HDRPipeline", "LTX2DFRPipeline", "LTX2DFRTemporalRefinePipeline", "LTX2ModularPipeline",
               "LTX25ModularPipeline", "EchoModularPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj",
                     "audio_ff.net.2"),
    # Rows are video tokens: video self-attention, the video cross-attention query/output, the
    # audio-to-video query/output, the video-to-audio key/value (computed from video tokens),
    # the video feed-forward and projections (measured on every per-token pipeline).
    token_layers=token_layer_rule(
        _BLOCK + r"attn1\.(to_q|to_k|to_v|to_out\.0)($|\.)",
        _BLOCK + r"attn2\.(to_q|to_out\.0)($|\.)",
        _BLOCK + r"audio_to_video_attn\.(to_q|to_out\.0)($|\.)",
        _BLOCK + r"video_to_audio_attn\.(to_k|to_v)($|\.)",
        _BLOCK + r"ff\.net\.(0\.proj|2)($|\.)",
        r"^(proj_in|proj_out)($|\.)",
    ),
    # Rows are audio tokens: these follow audio_timestep.
    layer_timesteps={"audio_timestep": token_layer_rule(
        _BLOCK + r"audio_attn[12]\.",
        _BLOCK + r"audio_to_video_attn\.(to_k|to_v)($|\.)",
        _BLOCK + r"video_to_audio_attn\.(to_q|to_out\.0)($|\.)",
        _BLOCK + r"audio_ff\.",
        r"^audio_proj_(in|out)($|\.)",
    )},
    video=True,
    num_train_timesteps=1000,  # the Echo pipelines have no scheduler; their DMD loop passes σ·1000
)
