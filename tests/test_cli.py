"""The command line end to end on a tiny SDXL folder: outputs, PNG settings, error manners."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LORA_TARGETS, add_lora, reference_rank
from peft import get_peft_model_state_dict
from PIL import Image

import tlora_diffusers
from tlora_diffusers import TLoRAConfig, TLoRAPatch, load_tlora
from tlora_diffusers.cli import generate as generate_command
from tlora_diffusers.cli import main
from tlora_diffusers.cli.main import build_parser
from tlora_diffusers.cli.schedule import TABLE_TIMESTEPS, sampling_timesteps
from tlora_diffusers.io import TLoRAFileMetadata, save_tlora
from tlora_diffusers.tiny import save_tiny_pipeline, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
CFG = TLoRAConfig(8, 1, 1.0)
PROMPT = "a photo of a sks dog"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SDXL folder, a T-LoRA file of ours for it, the same LoRA as a plain diffusers file."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_pipeline("sdxl", root / "model")
    unet = tiny_pipeline("sdxl").unet
    add_lora(unet, "sdxl", rank=CFG.max_rank)
    meta = TLoRAFileMetadata(CFG, component="unet", target_modules=LORA_TARGETS["sdxl"])
    state_dict = get_peft_model_state_dict(unet)
    tlora = save_tlora(root / "tlora", state_dict, meta, unet.peft_config["default"].to_dict())
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(root / "plain", unet_lora_layers=state_dict)
    (root / "garbage.safetensors").write_bytes(os.urandom(256))
    return types.SimpleNamespace(root=root, model=str(root / "model"), tlora=str(tlora), plain=str(root / "plain"))


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def gen_args(files, out, *extra, quiet=True):
    quiet = ["-q"] if quiet else []
    return ["generate", "--model", files.model, "--lora", files.tlora, "--steps", 2, "--out", out, *extra, *quiet]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# -- manners -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["schedule"], ["generate"], ["inspect"], ["convert"]])
def test_help_for_every_command_has_examples(capsys, command):
    code, out, _ = cli(capsys, *command, "--help")
    assert code == 0 and "examples:" in out and "usage: tlora-diffusers" in out


def test_version_in_a_subprocess():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "tlora_diffusers.cli", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tlora-diffusers {tlora_diffusers.__version__}"


def test_usage_errors_exit_2(capsys):
    assert cli(capsys, "generate", "--model", "m", "--lora", "l")[0] == 2  # no --prompt/--prompts
    code, _, err = cli(capsys, "schedule", "--steps", "0")
    assert code == 2 and "expected a whole number >= 1, got 0" in err
    assert cli(capsys)[0] == 2  # no command


def assert_one_line_error(code, err, fragment):
    lines = [line for line in err.splitlines() if line.startswith("tlora-diffusers: error:")]
    assert code == 2, err
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["schedule", "--max-rank", 8, "--min-rank", 9], "invalid --max-rank/--min-rank/--alpha: TLoRAConfig.min_rank"),
        (["schedule", "--alpha", 0], "TLoRAConfig.alpha must be a finite number > 0, got 0.0"),
        (["schedule", "--shift", 3], "--shift describe the sampling steps: add --steps N"),
        (["schedule", "--steps", 4, "--shift", 3], "--shift/--resolution apply to --scheduler flow only"),
        (["schedule", "--steps", 4, "--scheduler", "flow", "--resolution", 100], "multiple of 16"),
        (["schedule", "--plot", "{root}/no/such/dir/s.png"],
         "/no/such/dir/s.png: no such file or directory (the folder "),
        (["generate", "--model", "{root}/nope", "--lora", "{tlora}", "--prompt", "x"],
         "--model {root}/nope: no such folder"),
        (["generate", "--model", "{root}", "--lora", "{tlora}", "--prompt", "x"], "not a diffusers pipeline folder"),
        (["generate", "--model", "{model}", "--lora", "{root}/missing.safetensors", "--prompt", "x"], "no such file"),
        (["generate", "--model", "{model}", "--lora", "{root}/garbage.safetensors", "--prompt", "x"],
         "not a readable safetensors file"),
        (["generate", "--model", "{model}", "--lora", "{plain}", "--prompt", "x"],
         "carries no T-LoRA schedule: pass the one it was trained with, --min-rank M --alpha A (--max-rank defaults "
         "to the file's rank, 8)"),
        (["generate", "--model", "{model}", "--lora", "{plain}", "--max-rank", 16, "--prompt", "x"],
         "--max-rank 16 does not fit {plain}: its rank is 8"),
        (["generate", "--model", "{model}", "--lora", "{tlora}", "--min-rank", 99, "--prompt", "x"],
         "TLoRAConfig.min_rank must be an int in [0, max_rank=8], got 99"),
        (["generate", "--model", "{model}", "--lora", "{tlora}", "--max-rank", 4, "--prompt", "x"],
         "--max-rank 4 does not fit"),
        (["generate", "--model", "{model}", "--lora", "{tlora}", "--prompt", " "], "--prompt is empty"),
        (["generate", "--model", "{model}", "--lora", "{tlora}", "--prompts", "{root}/none.txt"], "no such file"),
        (["generate", "--model", "{model}", "--lora", "{tlora}", "--prompt", "x", "--out", "{tlora}"],
         "a file is in the way"),
        (["generate", "--model", "{model}", "--lora", "{tlora}", "--prompt", "x", "--device", "gpu9"],
         "is not a torch device"),
        (["generate", "--model", "{model}", "--lora", "{tlora}", "--prompt", "x", "--width", 60, "--steps", 1],
         "divisible by 8"),  # the pipeline's own ValueError
        (["convert", "{tlora}", "{tlora}/x/y.safetensors"], "pytorch_lora_weights.safetensors is a file, not a folder)"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, files, tmp_path, argv, fragment):
    fill = lambda s: str(s).format(root=files.root, model=files.model, tlora=files.tlora, plain=files.plain)
    code, _, err = cli(capsys, *map(fill, argv))
    assert_one_line_error(code, err, fill(fragment))


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['a dog', '{"prompt": "x", "seed": 1'], "prompts.txt:2: not valid JSON"),
        (['{"prompt": "x", "sed": 1}'],
         "prompts.txt:1: unknown key(s) ['sed']; allowed: prompt, seed, negative_prompt"),
        (['{"prompt": ""}'], "'prompt' must be a non-empty string"),
        (['{"prompt": "x", "seed": -1}'], "'seed' must be a whole number >= 0, got -1"),
        (['{"prompt": 1}'], "'prompt' must be a non-empty string, got 1"),
        (['x', '{"prompt": "x", "seed": true}'], "prompts.txt:2: 'seed' must be a whole number >= 0, got True"),
        (['a dog', '["a sks dog", "a cat"]'], "prompts.txt:2: a JSON array; write one prompt per line"),
        (["# only a comment", ""], "no prompts in the file"),
    ],
)
def test_bad_prompts_files(capsys, files, tmp_path, lines, fragment):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines))
    code, _, err = cli(capsys, *gen_args(files, tmp_path / "out", "--prompts", prompts))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()  # checked before the model is even loaded


def test_verbose_shows_the_traceback(capsys, files):
    code, _, err = cli(capsys, "generate", "--model", files.model, "--lora", files.root / "missing.safetensors",
                       "--prompt", "x", "--verbose")
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("tlora-diffusers: error:")


# -- schedule ------------------------------------------------------------------------------------


def test_schedule_table_matches_the_formula(capsys):
    code, out, _ = cli(capsys, "schedule", "--max-rank", 64, "--min-rank", 2, "--alpha", 1, "--alpha", 2.5)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["timestep", "alpha=1", "alpha=2.5"]
    rows = [line.split() for line in lines[2:2 + len(TABLE_TIMESTEPS)]]
    assert [int(r[0]) for r in rows] == list(TABLE_TIMESTEPS)
    for t, r1, r2 in rows:
        assert (int(r1), int(r2)) == (reference_rank(int(t), 64, 2, 1.0), reference_rank(int(t), 64, 2, 2.5))


def _step_rows(out):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "timestep"]) + 1
    return [line.split() for line in lines[start:]]


def _stock_timesteps(kind, steps):
    """The timesteps a stock pipeline's scheduler actually ran (64x64 for flow)."""
    pipe = tiny_pipeline(kind)
    from tlora_diffusers.tiny import tiny_prompt_embeds

    with torch.no_grad():
        pipe(**tiny_prompt_embeds(pipe), num_inference_steps=steps, height=64, width=64, output_type="latent")
    return pipe.scheduler.timesteps


def test_schedule_steps_match_the_stock_pipelines(capsys, tmp_path):
    code, out, _ = cli(capsys, "schedule", "--max-rank", 16, "--steps", 5, "--plot", tmp_path / "s.png")
    assert code == 0
    rows = _step_rows(out.split("\nwrote")[0])
    euler = _stock_timesteps("sdxl", 5)
    assert [float(r[1]) for r in rows] == pytest.approx(euler.tolist())
    assert [int(r[2]) for r in rows] == [reference_rank(t, 16, 1, 1.0) for t in euler.tolist()]
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG" and im.width > 300
    # flow at 64x64 is what the tiny Flux pipeline (FLUX.1's dynamic shift) runs at 64x64
    flux = _stock_timesteps("flux", 4)
    assert sampling_timesteps("flow", 4, resolution=64).tolist() == pytest.approx(flux.tolist(), abs=1e-3)
    code, out, _ = cli(capsys, "schedule", "--max-rank", 16, "--steps", 4, "--scheduler", "flow", "--resolution", 64)
    assert [float(r[1]) for r in _step_rows(out)] == pytest.approx(flux.tolist(), abs=0.06)


# -- generate ------------------------------------------------------------------------------------


@torch.no_grad()
def test_generate_writes_masked_unmasked_and_grid_with_settings(capsys, files, tmp_path):
    out = tmp_path / "out"
    argv = gen_args(files, out, "--prompt", PROMPT, "--seed", 3, "--num-images", 2, "--no-mask", "--grid",
                    "--guidance", 4.0)
    assert cli(capsys, *argv)[0] == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-grid.png", "00000-seed3-unmasked.png", "00000-seed3.png",
                     "00000-seed4-unmasked.png", "00000-seed4.png"]
    with Image.open(out / "00000-seed4.png") as im:
        assert im.format == "PNG" and im.size == (64, 64)
        text = dict(im.text)
    assert text["prompt"] == PROMPT and text["seed"] == "4" and text["steps"] == "2" and text["guidance"] == "4.0"
    assert TLoRAConfig.from_dict(json.loads(text["tlora_config"])) == CFG
    assert text["lora"] == files.tlora and text["model"] == files.model and text["masked"] == "true"
    assert Image.open(out / "00000-seed4-unmasked.png").text["masked"] == "false"
    assert np.abs(pixels(out / "00000-seed4.png") - pixels(out / "00000-seed4-unmasked.png")).max() > 0

    # Image i of a prompt is the image of seed + i alone (up to batched-matmul rounding: 1 level).
    single = tmp_path / "single"
    assert cli(capsys, *gen_args(files, single, "--prompt", PROMPT, "--seed", 4, "--guidance", 4.0))[0] == 0
    assert np.abs(pixels(single / "00000-seed4.png") - pixels(out / "00000-seed4.png")).max() <= 1

    # Running again never overwrites: the new set gets -1 and the old files keep their bytes.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli(capsys, *argv)[0] == 0
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["00000-grid-1.png", "00000-seed3-1-unmasked.png",
                                               "00000-seed3-1.png", "00000-seed4-1-unmasked.png", "00000-seed4-1.png"]


def test_generate_schedule_overrides_reach_the_mask(capsys, files, tmp_path):
    assert cli(capsys, *gen_args(files, tmp_path / "a", "--prompt", PROMPT))[0] == 0
    assert cli(capsys, *gen_args(files, tmp_path / "b", "--prompt", PROMPT, "--min-rank", 8))[0] == 0
    assert cli(capsys, *gen_args(files, tmp_path / "c", "--prompt", PROMPT, "--no-mask"))[0] == 0
    default, full = tmp_path / "a/00000-seed0.png", tmp_path / "b/00000-seed0.png"
    # The default image is exactly what the library gives on the same folder (CPU generator).
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(files.model)
    load_tlora(pipe, files.tlora)
    with TLoRAPatch(pipe), torch.no_grad():
        image = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(image, dtype=np.int16), pixels(default))
    cfg = json.loads(Image.open(full).text["tlora_config"])
    assert (cfg["max_rank"], cfg["min_rank"], cfg["alpha"]) == (8, 8, 1.0)
    # min_rank = max_rank keeps every rank at every step: the same image as unmasked.
    assert np.array_equal(pixels(full), pixels(tmp_path / "c/00000-seed0-unmasked.png"))
    assert not np.array_equal(pixels(full), pixels(default))
    # A plain LoRA file with the schedule on the command line gives the T-LoRA's image.
    assert cli(capsys, *gen_args(files, tmp_path / "d", "--prompt", PROMPT, "--lora", files.plain,
                                 "--max-rank", 8, "--min-rank", 1, "--alpha", 1))[0] == 0
    plain = tmp_path / "d/00000-seed0.png"
    assert np.array_equal(pixels(plain), pixels(default))
    assert Image.open(plain).text["lora_format"] == "diffusers"


PROMPTS = ['a sks dog', '{"prompt": "a sks dog on a beach", "seed": 7}', '', '# a comment',
           '{"prompt": "a sks dog in snow", "negative_prompt": "blurry"}', 'a red sks dog']


def test_generate_prompts_file(capsys, files, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(PROMPTS))
    code, out, _ = cli(capsys, *gen_args(files, tmp_path / "out", "--prompts", prompts, "--seed", 5, quiet=False))
    assert code == 0 and "wrote 4 file(s) to" in out and len(out.splitlines()) == 5  # 4 paths and a summary
    texts = {p.name: Image.open(p).text for p in (tmp_path / "out").iterdir()}
    assert sorted(texts) == ["00000-seed5.png", "00001-seed7.png", "00002-seed5.png", "00003-seed5.png"]
    assert texts["00001-seed7.png"]["prompt"] == "a sks dog on a beach"
    assert texts["00002-seed5.png"]["negative_prompt"] == "blurry"


class FakeState:
    """accelerate's PartialState as process ``index`` of ``n`` sees it (its split, no process group)."""

    def __init__(self, index, n):
        from accelerate import PartialState

        self.process_index, self.num_processes, self.device = index, n, torch.device("cpu")
        self._split = PartialState.split_between_processes

    def split_between_processes(self, inputs):
        return self._split(self, inputs)


def test_generate_split_across_two_processes_into_one_folder(capsys, files, tmp_path):
    jobs = generate_command.read_prompts(str(_write(tmp_path / "p.txt", PROMPTS)), seed=1)
    shares = [generate_command.my_share(jobs, FakeState(i, 2)) for i in range(2)]
    assert [j.index for j in shares[0]] == [0, 1] and [j.index for j in shares[1]] == [2, 3]
    out = tmp_path / "out"
    for i in range(2):
        argv = gen_args(files, out, "--prompts", tmp_path / "p.txt", "--seed", 1)
        args = build_parser().parse_args([str(a) for a in argv])
        assert generate_command.run(args, state=FakeState(i, 2)) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-seed1.png", "00001-seed7.png", "00002-seed1.png", "00003-seed1.png"]
    assert all(Image.open(out / n).text["prompt"] == j.prompt for n, j in zip(names, jobs))


def _write(path, lines):
    path.write_text("\n".join(lines))
    return path


def test_write_pngs_never_overwrites_a_concurrent_claim(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    (tmp_path / "x-seed0-unmasked.png").write_bytes(b"someone else's")  # half of a pair taken
    paths = generate_command.write_pngs(tmp_path, "x-seed0", [("", image, {"a": 1}), ("-unmasked", image, {"a": 1})])
    assert [p.name for p in paths] == ["x-seed0-1.png", "x-seed0-1-unmasked.png"]
    assert (tmp_path / "x-seed0-unmasked.png").read_bytes() == b"someone else's"
    assert not (tmp_path / "x-seed0.png").exists()  # the claim on the free half was given back
    assert Image.open(paths[0]).text == {"a": "1"}


# -- inspect / convert ---------------------------------------------------------------------------

def test_inspect_and_convert_our_format(capsys, files, tmp_path):
    code, out, _ = cli(capsys, "inspect", files.tlora, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["format"] == "tlora_diffusers" and report["config"]["max_rank"] == 8
    code, out, _ = cli(capsys, "inspect", files.tlora, "--model", files.model)
    assert code == 0 and "tlora_diffusers" in out
    code, out, _ = cli(capsys, "convert", files.plain, tmp_path / "c.safetensors", "--min-rank", 2)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'c.safetensors'}"
    assert load_tlora(tiny_pipeline("sdxl"), tmp_path / "c.safetensors").config == TLoRAConfig(8, 2, 1.0)
    code, out, _ = cli(capsys, "convert", files.tlora, tmp_path / "d.safetensors", "--alpha", 2)  # an override
    assert code == 0 and load_tlora(tiny_pipeline("sdxl"), tmp_path / "d.safetensors").config == TLoRAConfig(8, 1, 2.0)
    assert_one_line_error(*cli(capsys, "inspect", files.root / "missing.safetensors")[::2], "no such file")


def test_convert_to_other_tools_and_generate_from_the_kohya_file(capsys, files, tmp_path):
    kohya = tmp_path / "k.safetensors"
    code, out, _ = cli(capsys, "convert", files.tlora, kohya, "--to", "kohya")
    assert code == 0 and out.startswith(f"wrote {kohya} (kohya)")
    code, out, _ = cli(capsys, "inspect", kohya, "--json", "--model", files.model)
    report = json.loads(out)
    assert code == 0 and report["format"] == "kohya" and TLoRAConfig.from_dict(report["config"]) == CFG
    masked = {}
    for name, lora in (("ours", files.tlora), ("kohya", kohya)):
        argv = ["generate", "--model", files.model, "--lora", lora, "--steps", 2, "--out", tmp_path / name,
                "--prompt", PROMPT, "--seed", 1, "-q"]
        assert cli(capsys, *argv)[0] == 0
        masked[name] = pixels(tmp_path / name / "00000-seed1.png")
    assert np.abs(masked["ours"] - masked["kohya"]).max() <= 1
    code, out, _ = cli(capsys, "convert", files.tlora, tmp_path / "c.safetensors", "--to", "comfyui-tlora")
    assert code == 0 and "node settings: max_rank 8, min_rank 1, alpha 1, max_timestep 0 (automatic: 1000" in out
    code, out, _ = cli(capsys, "convert", files.tlora, tmp_path / "s.safetensors", "--to", "static")
    assert code == 0 and "unmasked: every rank at every step" in out
    assert_one_line_error(*cli(capsys, "convert", files.tlora, kohya, "--to", "kohya")[::2],
                          "k.safetensors: already exists; pass --overwrite")
    assert cli(capsys, "convert", files.tlora, kohya, "--to", "kohya", "--overwrite")[0] == 0


@pytest.mark.parametrize("error, fragment", [
    ("safetensors", "Error while serializing: disk full"),
    ("enospc", "No space left on device"),
])
def test_a_failed_write_is_one_line(capsys, files, tmp_path, monkeypatch, error, fragment):
    """A write that fails under the library (safetensors' own error, an OSError without a filename) is the user's
    situation: one line, exit 2, no traceback."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    def broken(tensors, filename, metadata=None):
        if error == "safetensors":
            raise SafetensorError("Error while serializing: disk full")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    code, _, err = cli(capsys, "convert", files.tlora, str(tmp_path / "out.safetensors"), "--to", "static")
    assert_one_line_error(code, err, fragment)
    assert "Traceback" not in err and "[Errno" not in err


def test_convert_to_kohya_names_an_sdxl_unet_as_sd_scripts_does(capsys, files, tmp_path):
    """--model's config says SDXL: SGM names (as sd-scripts' SDXL UNet), which this file's resnet targets do not have
    here: one line with advice, and the advice (--kohya-names diffusers) works. (SGM output itself:
    tests/test_interop.py.)"""
    from safetensors.torch import load_file

    code, _, err = cli(capsys, "convert", files.tlora, tmp_path / "sgm.safetensors", "--to", "kohya", "--model",
                       files.model)
    assert_one_line_error(code, err, "export with kohya_names='diffusers' (--kohya-names diffusers)")
    code, out, _ = cli(capsys, "convert", files.tlora, tmp_path / "d.safetensors", "--to", "kohya", "--model",
                       files.model, "--kohya-names", "diffusers")
    assert code == 0 and "modules in diffusers' names" in out
    assert all(k.split("_")[2] in ("down", "mid", "up") for k in load_file(str(tmp_path / "d.safetensors")))
