"""What the trainer needs from one pipeline family (each family file defines its recipes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Recipe"]


@dataclass(frozen=True)
class Recipe:
    """How to train a T-LoRA on one pipeline class, using the pipeline's own helpers.

    ``encode_prompt(pipe, prompt) -> cond`` and ``encode_images(pipe, images) -> encoded``
    run once; ``sample(pipe, encoded, generator, ctx) -> (batch, target, timesteps)`` draws
    noise and timesteps (scheduler units, what ``TLoRAPatch`` masks by) for a step;
    ``forward_kwargs(pipe, cond, batch)`` builds the denoiser's keyword arguments, exactly
    what the stock pipeline feeds it at inference. ``component`` is the pipeline attribute
    of the trained denoiser.
    """

    component: str
    encode_prompt: Callable
    encode_images: Callable
    sample: Callable
    forward_kwargs: Callable
    #: Keys of the sampled batch whose first dimension is the batch (a process takes its share of them).
    batch_keys: tuple[str, ...] = ("sample", "hidden_states", "timestep")
