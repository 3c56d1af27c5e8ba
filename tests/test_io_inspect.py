"""inspect_tlora and convert_tlora: every supported format, and conversion parity."""

import pytest
import torch
from conftest import add_lora, state_hash
from peft import get_peft_model_state_dict

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.io import TLoRAFileMetadata, load_tlora, save_tlora
from tlora_diffusers.io.inspect import compress_names, convert_tlora, inspect_tlora
from tlora_diffusers.io.lycoris import NeedsInputError
from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds
from test_io_lycoris import CFG, SIMPLETUNER_CONFIG, call, denoiser_of, inputs, train_lycoris
from test_io_paper import write_paper_file

LYCO_MODULES = 41  # tiny SDXL: 4 transformer blocks x (8 attention + 2 feed-forward) + one 1x1 conv_shortcut


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of every supported format (and how to load it), built once."""
    root = tmp_path_factory.mktemp("formats")
    out = {"lycoris": ("sdxl", train_lycoris("sdxl", root / "lyco.safetensors")[1], {})}
    out["paper_sdxl"] = ("sdxl", write_paper_file("sdxl", root / "psdxl")[0], {"min_rank": 2, "alpha": 1.5})
    out["paper_sdxl_ortho"] = ("sdxl", write_paper_file("sdxl", root / "portho", "ortho")[0],
                               {"cfg": TLoRAConfig(8, 3, 2.0, "paired")})
    out["paper_flux"] = ("flux", write_paper_file("flux", root / "pflux")[0], {"min_rank": 1})
    src = tiny_pipeline("flux2-klein")
    add_lora(src.transformer, "flux2-klein", rank=8, alpha=4)
    meta = TLoRAFileMetadata(TLoRAConfig(8, 2, 1.5), component="transformer", base_model="Flux2Transformer2DModel")
    ours = save_tlora(root / "ours", get_peft_model_state_dict(src.transformer), meta,
                      src.transformer.peft_config["default"].to_dict())
    out["ours"] = ("flux2-klein", ours, {})
    return out


def test_compress_names():
    names = ["down_blocks.1.attentions.0.attn1.to_q", "up_blocks.0.attentions.1.attn1.to_q", "x.to_out.0",
             "lycoris_mid_block_attentions_0_ff_net_2"]
    assert compress_names(names) == {"down_blocks.*.attentions.*.attn1.to_q": 1, "up_blocks.*.attentions.*.attn1.to_q": 1,
                                     "x.to_out.*": 1, "lycoris_mid_block_attentions_*_ff_net_*": 1}


def test_inspect_every_format(files, tmp_path):
    from safetensors.torch import load_file, save_file

    kind, lyco, _ = files["lycoris"]
    info = inspect_tlora(lyco)  # no denoiser: LyCORIS names, schedule from SimpleTuner's header
    assert (info["format"], info["variant"], info["layout"], info["rank"], info["lora_rank"]) == ("lycoris", "ortho", "paired", 8, 16)
    assert info["config"] == CFG.to_dict() and info["needs"] == ["denoiser"] and info["num_modules"] == LYCO_MODULES
    assert "lycoris_down_blocks_*_attentions_*_transformer_blocks_*_attn1_to_q" in info["modules"]
    assert info["metadata"]["lycoris_config"]["tlora_min_rank"] == SIMPLETUNER_CONFIG["tlora_min_rank"]
    assert info["parameters"] == LYCO_MODULES * (8 + 1) + sum(
        v.numel() for k, v in load_file(lyco).items() if k.endswith("_layer.weight"))
    assert info["dtypes"] == ["float32"]
    with_model = inspect_tlora(lyco, tiny_pipeline("sdxl"))
    assert with_model["needs"] == [] and with_model["num_modules"] == LYCO_MODULES
    assert with_model["modules"]["down_blocks.*.resnets.*.conv_shortcut"] == 1
    assert with_model["modules"]["up_blocks.*.attentions.*.transformer_blocks.*.attn2.to_out.*"] == 2

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(lyco), bare)
    assert inspect_tlora(bare)["needs"] == ["denoiser", "cfg"] and inspect_tlora(bare)["config"] == "needs cfg"
    assert inspect_tlora(bare, tiny_pipeline("sdxl").unet)["needs"] == ["cfg"]

    info = inspect_tlora(files["paper_sdxl"][1].parent)  # a checkpoint folder
    assert (info["format"], info["config"], info["needs"], info["variant"], info["layout"], info["num_modules"]) == (
        "controlgenai", "needs cfg", ["cfg"], "vanilla", "plain", 8 * 4)
    info = inspect_tlora(files["paper_sdxl_ortho"][1], min_rank=3)
    assert (info["config"]["min_rank"], info["variant"], info["layout"], info["lora_rank"]) == (3, "ortho", "paired", 16)
    info = inspect_tlora(files["paper_flux"][1])
    assert info["num_modules"] == 2 * 7 + 2 * 3 and any("dropped 8 layer(s)" in n for n in info["notes"])
    assert info["num_tensors"] == 4 * 7 * 2
    info = inspect_tlora(files["ours"][1])
    assert (info["format"], info["config"]["min_rank"], info["needs"], info["component"]) == ("tlora_diffusers", 2, [], "transformer")


def test_inspect_plain_diffusers_lora_needs_cfg(tmp_path):
    src = tiny_pipeline("sdxl")
    add_lora(src.unet, "sdxl", rank=4)
    src.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(src.unet))
    info = inspect_tlora(tmp_path)
    assert (info["format"], info["config"], info["needs"], info["rank"]) == ("tlora_diffusers", "needs cfg", ["cfg"], 4)


@pytest.mark.parametrize("name", ["lycoris", "paper_sdxl", "paper_sdxl_ortho", "paper_flux", "ours"])
@torch.no_grad()
def test_convert_then_stock_load_equals_loading_the_original(files, name, tmp_path):
    kind, src, options = files[name]
    pipe_src = tiny_pipeline(kind)
    den_src = denoiser_of(pipe_src)
    options = dict(options)
    cfg = options.pop("cfg", None)
    load_tlora(pipe_src, src, cfg, **options)
    out = convert_tlora(src, tmp_path / "converted", den_src if name == "lycoris" else None, cfg, **options)
    assert out == tmp_path / "converted" / "pytorch_lora_weights.safetensors"
    info = inspect_tlora(out)
    assert info["format"] == "tlora_diffusers" and info["needs"] == []
    assert info["metadata"]["tlora_config"]["source_format"] == {"lycoris": "lycoris", "ours": "tlora_diffusers"}.get(name, "controlgenai")

    pipe = tiny_pipeline(kind)
    pipe.load_lora_weights(out.parent)  # stock diffusers
    with TLoRAPatch(pipe_src), TLoRAPatch(pipe):
        if kind == "flux2-klein":  # no direct-call inputs for Flux2 here: run both pipelines
            def run(p):
                return p(**tiny_prompt_embeds(p), num_inference_steps=3, height=64, width=64, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images

            assert (run(pipe) == run(pipe_src)).all()
            return
        x = inputs(kind, den_src)
        for t in (10, 400, 990):
            torch.testing.assert_close(call(kind, denoiser_of(pipe), x, t), call(kind, den_src, x, t), rtol=0, atol=0)


def test_convert_errors_leave_no_file(files, tmp_path):
    _, lyco, _ = files["lycoris"]
    with pytest.raises(NeedsInputError, match="pass the denoiser"):
        convert_tlora(lyco, tmp_path / "out")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(lyco.read_bytes()[:-64])
    with pytest.raises(ValueError, match="bad.safetensors"):
        convert_tlora(bad, tmp_path / "out", tiny_pipeline("sdxl"))
    _, paper, _ = files["paper_sdxl"]
    flux = tiny_pipeline("flux")
    before = state_hash(flux.transformer)
    with pytest.raises(ValueError, match="do not exist in FluxTransformer2DModel"):
        convert_tlora(paper, tmp_path / "out", flux, min_rank=1)
    assert state_hash(flux.transformer) == before
    assert not (tmp_path / "out").exists()
    from safetensors.torch import save_file

    locon = tmp_path / "locon.safetensors"  # another LyCORIS algorithm: no rank schedule
    save_file({"lycoris_conv_in.lora_down.weight": torch.zeros(4, 4), "lycoris_conv_in.lora_up.weight": torch.zeros(4, 4)}, locon)
    pipe = tiny_pipeline("sdxl")
    before = state_hash(pipe.unet)
    for fn in (inspect_tlora, lambda p: load_tlora(pipe, p)):
        with pytest.raises(ValueError, match=r"locon.safetensors: unknown T-LoRA key layout .*known formats: .*lycoris.*controlgenai.*kohya"):
            fn(locon)
    assert state_hash(pipe.unet) == before and not getattr(pipe.unet, "peft_config", None)
