"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` receives scheduler units (``t.expand(B)``).

``pipeline_stable_diffusion_3.py``: ``timestep = t.expand(latent_model_input.shape[0])``,
``self.transformer(hidden_states=..., timestep=timestep, ...)``; the SD3 ControlNet is
called with the same ``timestep``. ``_current_timestep`` is not set; FlowMatch's
``step_index`` is set only after the first ``step()``.
"""

from __future__ import annotations

from . import ModelFamily, conventions

__all__ = ["FAMILY"]

FAMILY = ModelFamily(
    name="sd3",
    denoisers=("SD3Transformer2DModel", "SD3ControlNetModel", "SD3MultiControlNetModel"),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer", "controlnet"),
    pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
               "StableDiffusion3ControlNetPipeline"),
    default_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"),
)
