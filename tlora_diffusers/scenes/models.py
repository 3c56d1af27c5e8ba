"""The scenes model family: configs of the text encoder, UNet and VAE, and the evaluator.

Everything is a stock diffusers/transformers class built from a config in code, so the
trained pipeline is an ordinary ``StableDiffusionPipeline`` folder that
``DiffusionPipeline.from_pretrained`` loads offline.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .data import ATTRIBUTES, RESOLUTION
from .tokenizer import MAX_LENGTH

__all__ = [
    "TEXT_DIM", "LATENT_CHANNELS", "LATENT_SIZE", "text_encoder_config", "build_text_encoder", "build_unet",
    "build_vae", "build_scheduler", "SceneEvaluator", "CONCEPT_ATTRIBUTES",
]

TEXT_DIM = 128
LATENT_CHANNELS = 4
#: The VAE downsamples 2× (32×32 images, 16×16×4 latents).
LATENT_SIZE = RESOLUTION // 2
#: Attributes that make up a concept's identity (IS is computed over their evaluator features).
CONCEPT_ATTRIBUTES = ("shape", "colour", "texture")


def text_encoder_config(vocab_size: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=MAX_LENGTH, projection_dim=TEXT_DIM,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def build_text_encoder(vocab_size: int) -> nn.Module:
    from transformers import CLIPTextModel

    return CLIPTextModel(text_encoder_config(vocab_size))


def build_unet() -> nn.Module:
    """A 6.7 M-parameter SD-style UNet over 16×16×4 latents, cross-attention at 8×8 and 4×4."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4,
    )


def build_vae(scaling_factor: float = 1.0) -> nn.Module:
    """A 2× ``AutoencoderKL`` (two encoder levels) with 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=16, sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
    )


def build_scheduler(kind: str = "ddim", prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> Any:
    """SD's scaled-linear DDPM betas; ``ddim`` (trailing spacing, the pipeline's sampler) or ``ddpm`` (training).

    ``zero_terminal_snr`` rescales the betas so that t = 999 is pure noise (Lin et al. 2023);
    without it the last timestep keeps 7 % of the signal, the model learns to read the layout
    from that leak, and at sampling time the object's position follows the noise, not the prompt.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError(f"zero_terminal_snr needs prediction_type='v_prediction', got {prediction_type!r}")
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type, clip_sample=False, rescale_betas_zero_snr=zero_terminal_snr)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    raise ValueError(f"scheduler kind must be 'ddim' or 'ddpm', got {kind!r}")


class SceneEvaluator(nn.Module):
    """A small CNN that reads every attribute of a 32×32 scene (the experiment's measuring instrument).

    ``forward(images)`` takes ``(B, 3, 32, 32)`` in [-1, 1] and returns ``{attribute: logits}``;
    :meth:`features` returns each head's hidden layer (the IS embedding uses the
    :data:`CONCEPT_ATTRIBUTES`).
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, w, 1), (w, w, 2), (w, 2 * w, 1), (2 * w, 2 * w, 2), (2 * w, 4 * w, 1),
                                  (4 * w, 4 * w, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU())
        self.hidden = nn.ModuleDict({a: nn.Sequential(nn.Linear(256, 64), nn.SiLU()) for a in ATTRIBUTES})
        self.heads = nn.ModuleDict({a: nn.Linear(64, len(values)) for a, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(images)
        return {a: h(z) for a, h in self.hidden.items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {a: self.heads[a](f) for a, f in self.features(images).items()}

    def concept_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm concatenation of the concept heads' features: IS is its cosine similarity."""
        feats = self.features(images)
        z = torch.cat([nn.functional.normalize(feats[a], dim=-1) for a in CONCEPT_ATTRIBUTES], dim=-1)
        return nn.functional.normalize(z, dim=-1)
