"""The README's Python examples, run as written on tiny local models (paths swapped for temp folders)."""

import torch
from conftest import add_lora
from peft import get_peft_model_state_dict

from tlora_diffusers import (
    TLoRAConfig,
    TLoRAFileMetadata,
    TLoRAPatch,
    convert_tlora,
    inspect_tlora,
    load_tlora,
    save_tlora,
)
from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds


def write_tlora(kind, folder, cfg):
    src = tiny_pipeline(kind)
    den = getattr(src, "unet", None) or src.transformer
    add_lora(den, kind, rank=cfg.max_rank)
    meta = TLoRAFileMetadata(cfg, base_model=type(den).__name__, component="unet" if kind == "sdxl" else "transformer")
    return save_tlora(folder, get_peft_model_state_dict(den), meta, den.peft_config["default"].to_dict())


@torch.no_grad()
def test_sdxl_and_flux_examples(tmp_path):
    write_tlora("sdxl", tmp_path / "out", TLoRAConfig(8, 1))
    pipe = tiny_pipeline("sdxl")
    pipe.load_lora_weights(str(tmp_path / "out"))
    with TLoRAPatch(pipe):
        image = pipe(**tiny_prompt_embeds(pipe), num_inference_steps=3, guidance_scale=5.0, height=64, width=64).images[0]
    assert image.size == (64, 64)

    write_tlora("flux", tmp_path / "flux-tlora", TLoRAConfig(8, 1))
    pipe = tiny_pipeline("flux")
    pipe.load_lora_weights(str(tmp_path / "flux-tlora"), adapter_name="sks")
    patch = TLoRAPatch(pipe, TLoRAConfig(max_rank=8, min_rank=1), adapter_names=["sks"])
    pipe(**tiny_prompt_embeds(pipe), num_inference_steps=3, height=64, width=64)
    patch.remove()


@torch.no_grad()
def test_bare_denoiser_and_loader_examples(tmp_path):
    pipe = tiny_pipeline("sdxl")
    unet = pipe.unet
    add_lora(unet, "sdxl", rank=64)
    patch = TLoRAPatch(unet, TLoRAConfig(64, 1), num_train_timesteps=1000)
    cfg = unet.config
    latents = torch.randn(2, cfg.in_channels, 8, 8)
    emb = torch.randn(2, 5, cfg.cross_attention_dim)
    te = {"text_embeds": torch.randn(2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim),
          "time_ids": torch.randn(2, 6)}
    t = torch.tensor([10.0, 900.0])
    noise_pred = unet(latents, t, encoder_hidden_states=emb, added_cond_kwargs=te).sample
    assert noise_pred.shape == latents.shape
    patch.remove()

    write_tlora("sdxl", tmp_path / "run", TLoRAConfig(8, 2))
    pipe = tiny_pipeline("sdxl")
    info = load_tlora(pipe, tmp_path / "run")
    assert (info.format, info.config, info.adapter_name) == ("tlora_diffusers", TLoRAConfig(8, 2), "tlora")
    with TLoRAPatch(pipe):
        pipe(**tiny_prompt_embeds(pipe), num_inference_steps=2, height=64, width=64)
    convert_tlora(tmp_path / "run", tmp_path / "converted", denoiser=pipe.unet)
    report = inspect_tlora(tmp_path / "converted" / "pytorch_lora_weights.safetensors")
    assert report["format"] == "tlora_diffusers"
