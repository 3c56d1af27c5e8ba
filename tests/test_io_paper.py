"""The paper's checkpoints (ControlGenAI/T-LoRA): exact parity with its processor math, and errors."""

import os
from collections import OrderedDict

import pytest
import torch
from conftest import reference_rank, state_hash

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.io import load_tlora, read_tlora
from tlora_diffusers.io.lycoris import NeedsInputError
from tlora_diffusers.tiny import tiny_pipeline
from test_io_lycoris import call, denoiser_of, inputs

RANK, MIN_RANK, ALPHA = 8, 2, 1.5
#: The processor layers the paper's code creates, and the attention submodule each one adds to.
SDXL_LAYERS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
FLUX_LAYERS = {**SDXL_LAYERS, "to_q_proj": "add_q_proj", "to_k_proj": "add_k_proj", "to_v_proj": "add_v_proj"}


def _layers(den, kind):
    """(processor name, layer name, in, out) for every LoRA layer the paper's processors hold."""
    table = SDXL_LAYERS if kind == "sdxl" else FLUX_LAYERS
    for proc in den.attn_processors:
        attn = den.get_submodule(proc.rpartition(".processor")[0])
        for layer, target in table.items():
            try:
                lin = attn.get_submodule(target)
                yield proc, layer, lin.in_features, lin.out_features
            except AttributeError:  # single-stream blocks: the processor still has the layer (hidden -> hidden)
                yield proc, layer, den.inner_dim, den.inner_dim


def paper_state_dict(den, kind, variant="vanilla", rank=RANK, seed=0):
    """What ``AttnProcsLayers(unet.attn_processors).state_dict()`` holds after training (tlora/model/lora.py)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for proc, layer, fin, fout in _layers(den, kind):
        key = f"{proc}.{layer}_lora."
        if variant == "vanilla":
            sd[key + "down.weight"] = 0.3 * torch.randn(rank, fin, generator=g)
            sd[key + "up.weight"] = 0.3 * torch.randn(fout, rank, generator=g)
            continue
        # OrthogonalLoRALinearLayer: SVD of a random (in, out) matrix, sig_type='last'
        u, s, v = torch.linalg.svd(torch.randn(fin, fout, generator=g) / rank)
        q0, p0, lam0 = u[-rank:].contiguous(), v[:, -rank:].contiguous(), s[None, -rank:].contiguous()
        sd[key + "q_layer.weight"] = q0 + 0.1 * torch.randn(q0.shape, generator=g)
        sd[key + "p_layer.weight"] = p0 + 0.1 * torch.randn(p0.shape, generator=g)
        sd[key + "lambda_layer"] = lam0 + 0.5 * torch.randn(lam0.shape, generator=g)
        sd[key + "base_q.weight"], sd[key + "base_p.weight"], sd[key + "base_lambda"] = q0.clone(), p0.clone(), lam0.clone()
    return sd


def write_paper_file(kind, folder, variant="vanilla", seed=0):
    """SDXL: ``save_attn_procs`` → safetensors (metadata format=pt); Flux: ``torch.save`` → lora.pt."""
    sd = paper_state_dict(denoiser_of(tiny_pipeline(kind)), kind, variant, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "sdxl":
        from safetensors.torch import save_file

        path = folder / "pytorch_lora_weights.safetensors"
        save_file(dict(sd), path, metadata={"format": "pt"})
    else:
        path = folder / "lora.pt"
        torch.save(sd, path)
    return path, sd


class PaperReference:
    """A fresh denoiser whose attention projections add the paper's LoRA terms (forward hooks).

    vanilla: ``proj(x) + up(down(x) * mask)``; ortho: ``proj(x) + p(q(x)·λ·mask) − base_p(base_q(x)·base_λ·mask)``
    with the paper's mask, ``r = int(((T - t) / T) ** alpha * (R - min_rank)) + min_rank`` (SDXL trainer) or
    ``int((T - t) * (R - min_rank) / T) + min_rank`` (Flux script). Written from the paper's code, not ours.
    """

    def __init__(self, kind, sd, min_rank, alpha):
        self.kind, self.min_rank, self.alpha, self.mask = kind, min_rank, alpha, None
        self.den = denoiser_of(tiny_pipeline(kind))
        table = SDXL_LAYERS if kind == "sdxl" else FLUX_LAYERS
        layers = {}
        for key, value in sd.items():
            head, _, param = key.partition("_lora.")
            proc, _, layer = head.rpartition(".")
            layers.setdefault((proc, layer), {})[param] = value
        for (proc, layer), params in layers.items():
            attn = self.den.get_submodule(proc.rpartition(".processor")[0])
            if not hasattr(attn, table[layer].split(".")[0]):
                continue  # the processor never calls it
            attn.get_submodule(table[layer]).register_forward_hook(self._hook(params))

    def _hook(self, p):
        def hook(module, args, out):
            x, m = args[0], self.mask
            if "down.weight" in p:
                return out + (x @ p["down.weight"].T * m) @ p["up.weight"].T
            cur = (x @ p["q_layer.weight"].T * p["lambda_layer"] * m) @ p["p_layer.weight"].T
            base = (x @ p["base_q.weight"].T * p["base_lambda"] * m) @ p["base_p.weight"].T
            return out + cur - base
        return hook

    def __call__(self, x, t, rank):
        T = 1000
        if self.kind == "sdxl":
            r = reference_rank(t, rank, self.min_rank, self.alpha)
        else:
            r = int((T - t) * (rank - self.min_rank) / T) + self.min_rank
        self.mask = torch.zeros(1, rank)
        self.mask[:, :r] = 1.0
        return call(self.kind, self.den, x, t)


@pytest.mark.parametrize("kind, variant", [("sdxl", "vanilla"), ("sdxl", "ortho"), ("flux", "vanilla"), ("flux", "ortho")])
@torch.no_grad()
def test_parity_with_the_papers_processor_math(kind, variant, tmp_path):
    path, sd = write_paper_file(kind, tmp_path / "ckpt", variant)
    alpha = ALPHA if kind == "sdxl" else 1.0  # the Flux script's schedule is linear
    ref = PaperReference(kind, sd, MIN_RANK, alpha)
    pipe = tiny_pipeline(kind)
    info = load_tlora(pipe, tmp_path / "ckpt", min_rank=MIN_RANK, alpha=alpha)  # a folder: finds the file
    layout = "paired" if variant == "ortho" else "plain"
    assert (info.format, info.config, info.meta.variant) == ("controlgenai", TLoRAConfig(RANK, MIN_RANK, alpha, layout), variant)
    den = denoiser_of(pipe)
    n_used = sum(1 for k in sd if k.endswith(("down.weight", "q_layer.weight"))
                 and not (k.startswith("single_") and ("to_out" in k or "_proj_lora" in k)))
    assert len(info.meta.target_modules) == n_used
    x = inputs(kind, den)
    plain = call(kind, denoiser_of(tiny_pipeline(kind)), x, 500)
    with TLoRAPatch(pipe):
        for t in (0, 250, 500, 999):
            expected = ref(x, t, RANK)
            got = call(kind, den, x, t)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            assert (got - plain).abs().max() > 1e-3


@torch.no_grad()
def test_flux_unused_single_block_layers_dropped_with_note(tmp_path):
    path, sd = write_paper_file("flux", tmp_path)
    converted = read_tlora(path, min_rank=1)
    assert any(k.startswith("single_transformer_blocks.") for k in sd if "to_out_lora" in k or "_proj_lora" in k)
    assert not any(k.startswith("single_") and ("to_out" in k or "add_" in k) for k in converted.state_dict)
    assert "single_transformer_blocks.0.attn.to_q.lora_A.weight" in converted.state_dict
    assert "transformer_blocks.0.attn.add_k_proj.lora_B.weight" in converted.state_dict
    assert "transformer_blocks.0.attn.to_out.0.lora_A.weight" in converted.state_dict
    assert any("dropped 8 layer(s) of single_transformer_blocks" in n for n in converted.notes)
    assert converted.meta.component == "transformer" and converted.lora_config["lora_alpha"] == RANK


def test_schedule_is_needed_and_checked(tmp_path):
    path, _ = write_paper_file("sdxl", tmp_path / "o", "ortho")
    with pytest.raises(NeedsInputError, match=r"do not store the rank schedule.*layout='paired'.*logs/hparams.yml") as e:
        read_tlora(path)
    assert e.value.needs == "cfg" and e.value.partial["rank"] == RANK and e.value.partial["variant"] == "ortho"
    assert read_tlora(path, cfg=TLoRAConfig(RANK, 3, 2.0, "paired")).meta.config == TLoRAConfig(RANK, 3, 2.0, "paired")
    assert read_tlora(path, cfg=TLoRAConfig(RANK, 3, 2.0)).meta.config == TLoRAConfig(RANK, 3, 2.0, "paired")
    with pytest.raises(ValueError, match="pass either cfg or min_rank"):
        read_tlora(path, cfg=TLoRAConfig(RANK, 3, 2.0, "paired"), min_rank=3)
    with pytest.raises(ValueError, match="alpha= was given without min_rank"):
        read_tlora(path, alpha=2.0)
    with pytest.raises(ValueError, match="min_rank must be an int in"):
        read_tlora(path, min_rank=RANK + 1)
    vanilla, _ = write_paper_file("sdxl", tmp_path / "v")
    assert read_tlora(vanilla, cfg=TLoRAConfig(RANK, 1)).meta.config.layout == "plain"


class Evil:
    """An arbitrary object in a pickle: weights-only loading must refuse it without running anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_paper_files_clear_errors_pipeline_unchanged(tmp_path):
    path, sd = write_paper_file("flux", tmp_path / "good")
    key = "transformer_blocks.0.attn.processor.to_q_lora."
    marker = tmp_path / "executed"
    evil = tmp_path / "evil" / "lora.pt"
    evil.parent.mkdir()
    torch.save({key + "down.weight": sd[key + "down.weight"], "payload": Evil(marker)}, evil)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    cases = {
        evil: "cannot be read as a weights-only torch file",
        truncated: "cannot be read as a weights-only torch file",
    }
    edits = {
        "mixed": ({**sd, key + "q_layer.weight": torch.zeros(RANK, 32)}, "expected"),
        "shape": ({**sd, key + "up.weight": torch.zeros(32, RANK + 1)}, "inconsistent shapes"),
        "missing": ({k: v for k, v in sd.items() if k != key + "up.weight"}, r"has \['down.weight'\]"),
        "ranks": ({**sd, key + "down.weight": torch.zeros(4, 32), key + "up.weight": torch.zeros(32, 4)}, "different ranks"),
        "not_a_dict": ([sd[key + "up.weight"]], "expected a dict of tensors"),
    }
    for name, (obj, message) in edits.items():
        p = tmp_path / f"{name}.pt"
        torch.save(obj, p)
        cases[p] = message
    for bad, message in cases.items():
        pipe = tiny_pipeline("flux")
        before = state_hash(pipe.transformer)
        with pytest.raises(ValueError, match=message) as e:
            load_tlora(pipe, bad, min_rank=1)
        assert str(bad) in str(e.value), bad
        assert state_hash(pipe.transformer) == before and not getattr(pipe.transformer, "peft_config", None)
    assert not marker.exists()
    # a file for another base model
    sdxl_file, _ = write_paper_file("sdxl", tmp_path / "sdxl")
    pipe = tiny_pipeline("flux")
    before = state_hash(pipe.transformer)
    with pytest.raises(ValueError, match=r"pytorch_lora_weights.safetensors: \d+ module\(s\) do not exist in FluxTransformer2DModel"):
        load_tlora(pipe, sdxl_file, min_rank=1)
    assert state_hash(pipe.transformer) == before and not getattr(pipe.transformer, "peft_config", None)


def test_config_passed_as_denoiser_is_caught(tmp_path):
    path, _ = write_paper_file("sdxl", tmp_path)
    with pytest.raises(TypeError, match=r"denoiser must be an nn.Module .* got TLoRAConfig; pass the schedule as cfg="):
        read_tlora(path, TLoRAConfig(RANK))
