"""The README is the front door: every Python block runs as written, on tiny local models.

A workspace holds what the examples name (``./sdxl``, ``./flux-dev``, ``out/``, ``subject/``,
``simpletuner-out/``, ...), made offline from tiny stock pipelines and real trainers (our
trainer, LyCORIS). The blocks run in one subprocess, each in a fresh namespace, after the
substitutions below (a CPU, float32, fewer steps and frames); every substitution must
still match the README, so it cannot hide a changed example. The console examples are
parsed by the real command-line parser, the supported-models table must equal its
generator's output, and the shown ``inspect_tlora`` report must be what the block prints.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import add_lora
from peft import get_peft_model_state_dict

from tlora_diffusers import TLoRAConfig
from tlora_diffusers.io import TLoRAFileMetadata, save_tlora

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: (README text, what runs instead): the examples are written for a GPU and real model sizes.
SUBSTITUTIONS = [
    ('.to("cuda")', '.to("cpu")'),
    ("dtype=torch.float16", "dtype=torch.float32"),
    ("dtype=torch.bfloat16", "dtype=torch.float32"),
    ("num_inference_steps=25", "num_inference_steps=3"),
    ("num_inference_steps=28", "num_inference_steps=3"),
    ("num_frames=81, num_inference_steps=40", "num_frames=5, num_inference_steps=3, height=32, width=32"),
    ("steps=800, rank=32, resolution=1024", "steps=2, rank=32, resolution=64"),
]
#: What the README's examples load, and the schedules the examples assume of them.
SUBJECT, OTHER_SUBJECT = TLoRAConfig(8, 1), TLoRAConfig(8, 2, 1.5)
WAN_HIGH, WAN_LOW = TLoRAConfig(8, 1), TLoRAConfig(8, 4, 2.0)
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def blocks(language):
    """``(line number, code)`` of every fenced block of ``language``."""
    found = []
    for m in re.finditer(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M):
        found.append((README[:m.start()].count("\n") + 1, m.group(1)))
    return found


def runnable(code):
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new)
    return code


def _save_lora(den, path, cfg, component="unet"):
    """A T-LoRA file (our format, a folder) of ``den``'s default adapter."""
    meta = TLoRAFileMetadata(cfg, component=component) if cfg is not None else None
    state = get_peft_model_state_dict(den)
    lora = den.peft_config["default"].to_dict()
    if meta is not None:
        return save_tlora(path, state, meta, lora)
    from safetensors.torch import save_file  # a plain PEFT LoRA, as diffusers writes it: no T-LoRA metadata

    path.mkdir(parents=True)
    save_file({f"{component}.{k}": v.contiguous() for k, v in state.items()}, str(path / "pytorch_lora_weights.safetensors"))
    return path


def _lora(den, targets, rank, seed):
    from peft import LoraConfig

    torch.manual_seed(seed)
    den.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for n, p in den.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)


def _wan(path):
    """Tiny Wan 2.2 A14B (two experts) with a tiny T5 text encoder and tokenizer, saved."""
    from transformers import T5Config, T5EncoderModel

    from tlora_diffusers.testing import tiny_case
    from tlora_diffusers.testing._parts import t5_tokenizer

    pipe = tiny_case("wan2.2-a14b").build(0)
    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1,
                                      num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    pipe.register_modules(tokenizer=tokenizer, text_encoder=encoder)
    pipe.save_pretrained(path)
    return pipe


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from PIL import Image
    from test_io_lycoris import SIMPLETUNER_CONFIG, PRESETS, train_lycoris

    from tlora_diffusers.tiny import save_tiny_pipeline, tiny_pipeline
    from tlora_diffusers.training import TrainConfig, train

    ws = tmp_path_factory.mktemp("readme")
    save_tiny_pipeline("sdxl", ws / "sdxl")
    save_tiny_pipeline("flux", ws / "flux-dev")
    (ws / "dog").mkdir()
    for i, colour in enumerate(((200, 120, 40), (90, 60, 30))):
        Image.new("RGB", (64, 64), colour).save(ws / "dog" / f"{i}.png")
    # out/: a real (short) training run of the tiny SDXL, as `tlora-diffusers train` writes it.
    train(TrainConfig(model=str(ws / "sdxl"), images=str(ws / "dog"), prompt="a photo of sks dog",
                      output_dir=str(ws / "out"), steps=2, rank=8, resolution=64, progress=False))
    unet = tiny_pipeline("sdxl").unet
    _lora(unet, SDXL_TARGETS, 8, seed=1)
    _save_lora(unet, ws / "subject", SUBJECT)
    unet.delete_adapters("default")
    _lora(unet, SDXL_TARGETS, 8, seed=2)
    _save_lora(unet, ws / "other-subject", OTHER_SUBJECT)
    unet.delete_adapters("default")
    _lora(unet, ["to_q", "to_v"], 8, seed=3)
    _save_lora(unet, ws / "style", None)  # an ordinary LoRA
    flux = tiny_pipeline("flux").transformer
    add_lora(flux, "flux", rank=32, std=0.05)
    _save_lora(flux, ws / "flux-tlora", None, component="transformer")  # a T-LoRA file without its schedule
    wan = _wan(ws / "wan2.2-t2v-a14b")
    for name, cfg, den, seed in (("high-noise-tlora", WAN_HIGH, wan.transformer, 4),
                                 ("low-noise-tlora", WAN_LOW, wan.transformer_2, 5)):
        _lora(den, ["to_q", "to_k", "to_v", "to_out.0"], 8, seed)
        _save_lora(den, ws / name, cfg, component="transformer")
    # sdscripts_tlora.safetensors: a kohya-side T-LoRA with the sd-scripts fork's metadata (read in test_interop)
    from tlora_diffusers import convert_tlora

    convert_tlora(ws / "subject", ws / "sdscripts_tlora.safetensors", to="kohya")
    # simpletuner-out/: a LyCORIS tlora file as SimpleTuner saves it, its LyCORIS config beside it.
    (ws / "simpletuner-out").mkdir()
    (ws / "config").mkdir()
    train_lycoris("sdxl", ws / "simpletuner-out" / "pytorch_lora_weights.safetensors", metadata={})
    (ws / "config" / "lycoris_tlora.json").write_text(json.dumps({**SIMPLETUNER_CONFIG, "apply_preset": PRESETS["sdxl"]}))
    return ws


RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback, warnings
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results = []
    for line, code in json.load(open(sys.argv[1])):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
            results.append({"line": line, "ok": True, "stdout": out.getvalue()})
        except BaseException:
            results.append({"line": line, "ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()})
    json.dump(results, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="module")
def results(workspace):
    code = [(line, runnable(c)) for line, c in blocks("python")]
    (workspace / "blocks.json").write_text(json.dumps(code))
    (workspace / "runner.py").write_text(RUNNER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "runner.py", "blocks.json", "results.json"], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["line"]: r for r in json.loads((workspace / "results.json").read_text())}


def test_every_python_block_runs_as_written(results):
    assert len(results) == len(blocks("python")) >= 12
    failed = {line: r["error"][-2500:] for line, r in results.items() if not r["ok"]}
    assert not failed, "\n\n".join(f"README.md line {line}:\n{err}" for line, err in failed.items())


def test_the_examples_leave_what_they_promise(results, workspace):
    from PIL import Image

    assert (workspace / "out-dog" / "pytorch_lora_weights.safetensors").is_file()  # the Python training example
    assert (workspace / "converted" / "pytorch_lora_weights.safetensors").is_file()
    with Image.open(workspace / "circle.png") as im:  # the scenes model example
        assert im.size == (256, 256)
    hotswap = next(line for line, code in blocks("python") if "hotswap=True" in code)
    assert "TLoRAConfig(max_rank=8, min_rank=2, alpha=1.5" in results[hotswap]["stdout"]  # the new file's schedule


def test_shown_inspect_report_is_what_the_example_prints(results):
    shown = re.search(r"```\n(path: converted/.*?)```", README, flags=re.S).group(1)
    printed = next(r["stdout"] for r in results.values() if r["stdout"].startswith("path: "))
    for line in shown.splitlines():
        if line.strip() != "...":
            assert line in printed.splitlines(), f"README shows {line!r}; the example printed:\n{printed}"


def test_every_substitution_still_matches_the_readme():
    code = "".join(c for _, c in blocks("python"))
    for old, _ in SUBSTITUTIONS:
        assert old in code, f"test_readme.SUBSTITUTIONS: {old!r} is no longer in the README's examples"


def test_console_examples_parse_with_the_real_parser():
    from tlora_diffusers.cli.main import build_parser

    lines = [ln[2:] for _, c in blocks("console") for ln in c.splitlines() if ln.startswith("$ tlora-diffusers ")]
    assert len(lines) >= 5
    for line in lines:
        argv = shlex.split(line)[1:]
        try:
            build_parser(argv[0]).parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README example does not parse ({e}): {line}")


def test_supported_models_table_is_the_generated_one():
    from tlora_diffusers.models.docs import readme_with_table, supported_models_markdown

    assert readme_with_table(README, supported_models_markdown()) == README, (
        "README.md's supported-models table is stale: python -m tlora_diffusers.models.docs --readme README.md")


def test_shown_convert_output_is_what_convert_prints(tmp_path, capsys):
    from tlora_diffusers.cli.main import main

    block = next(c for _, c in blocks("console") if "--to comfyui-tlora" in c)
    command, *shown = block.splitlines()
    argv = shlex.split(command[2:])[1:]
    argv[2] = str(tmp_path / argv[2])
    assert main(argv) == 0
    printed = capsys.readouterr().out.replace(str(tmp_path) + "/", "").splitlines()
    for line in shown:
        assert line in printed, f"README shows {line!r}; convert printed:\n{printed}"


def _table_keys(heading):
    table = README.split(heading, 1)[1].split("\n\n", 1)[0]  # from the header line to the blank line after
    return [row.split("`")[1] for row in table.splitlines()[2:]]


def test_the_documented_schedule_metadata_is_what_files_carry():
    from tlora_diffusers.metadata import TLoRAFileMetadata, ss_mirror

    meta = TLoRAFileMetadata(TLoRAConfig(8, 1), target_modules=("to_q",))
    assert sorted(_table_keys("| `tlora_config` key |")) == sorted(json.loads(meta.to_json()))
    assert sorted(_table_keys("| kohya key |")) == sorted(ss_mirror(meta))


def test_every_test_the_guarantees_table_names_exists():
    section = README.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    named = 0
    for row in section.splitlines():
        if not row.startswith("| ") or row.startswith("| promise"):
            continue
        current = None
        for ref in re.findall(r"`([^`]+)`", row.rsplit(" | ", 1)[1]):
            file, _, name = ref.partition("::")
            if file.endswith(".py"):
                current = ROOT / "tests" / file
                assert current.is_file(), f"Guarantees names {file}, which does not exist"
            if name:
                assert current is not None, ref
                name = name.split("[")[0]
                pattern = re.escape(name).replace(r"\*", r"\w*")
                assert re.search(rf"^def {pattern}\(", current.read_text(), flags=re.M), f"{current.name}::{name} is gone"
                named += 1
    assert named >= 30
