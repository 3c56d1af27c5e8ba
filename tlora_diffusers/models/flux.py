"""Flux and Flux2 transformers: the pipelines pass ``t / 1000``; the models multiply by 1000 inside."""

from . import ModelAdapter, _register_builtin


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def _flux2():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel


_register_builtin(
    [
        (_flux, ModelAdapter(timestep_arg="timestep", scale=1000.0)),
        (_flux2, ModelAdapter(timestep_arg="timestep", scale=1000.0)),
    ]
)
