"""The front door as a new user meets it: what the CLI reaches, how it words errors, help, quiet output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_io_lycoris import SIMPLETUNER_CONFIG, train_lycoris

from tlora_diffusers import TLoRAConfig, load_tlora
from tlora_diffusers.cli import main
from tlora_diffusers.cli.main import COMMANDS, build_parser
from tlora_diffusers.tiny import save_tiny_pipeline, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("front")
    model = save_tiny_pipeline("sdxl", root / "model")
    bare = train_lycoris("sdxl", root / "bare.safetensors", metadata={})[1]  # no lycoris_config header
    (root / "lycoris_config.json").write_text(json.dumps(SIMPLETUNER_CONFIG))
    Image.new("RGB", (32, 32), "red").save(root / "concept.png")
    return root, model, bare


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code, err):
    lines = [line for line in err.splitlines() if line.startswith("tlora-diffusers: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_lycoris_file_without_its_header_converts_and_generates_with_min_rank_and_alpha_alone(capsys, work, tmp_path):
    root, model, bare = work
    code, out, err = cli(capsys, "convert", bare, tmp_path / "c", "--model", model, "--min-rank", 2, "--alpha", 1.5)
    assert code == 0, err
    assert load_tlora(tiny_pipeline("sdxl"), tmp_path / "c").config == TLoRAConfig(8, 2, 1.5, layout="paired")
    code, _, err = cli(capsys, "generate", "--model", model, "--lora", bare, "--min-rank", 2, "--alpha", 1.5,
                       "--prompt", "a sks dog", "--steps", 2, "--out", tmp_path / "g", "-q")
    assert code == 0, err
    with Image.open(next((tmp_path / "g").glob("*.png"))) as im:
        cfg = json.loads(im.text["tlora_config"])
    assert (cfg["max_rank"], cfg["min_rank"], cfg["alpha"], cfg["layout"]) == (8, 2, 1.5, "paired")
    code, _, err = cli(capsys, "convert", bare, tmp_path / "d.safetensors", "--model", model,
                       "--lycoris-config", root / "lycoris_config.json")
    assert code == 0, err
    assert load_tlora(tiny_pipeline("sdxl"), tmp_path / "d.safetensors").config.min_rank == 2


@pytest.mark.parametrize("argv, fragment", [
    (["convert", "{bare}", "{tmp}/c"], "does not store its frozen base; it is rebuilt from the base model's weights, "
                                       "so pass --model PATH"),
    (["convert", "{bare}", "{tmp}/c", "--model", "{model}"], "carries no T-LoRA schedule: pass the one it was trained "
                                                              "with, --min-rank M --alpha A"),
    (["convert", "{bare}", "{tmp}/c", "--model", "{model}", "--max-rank", 16, "--min-rank", 2],
     "--max-rank 16 does not fit {bare}: its rank is 8"),
    (["inspect", "{root}/concept.png"], "concept.png: not a T-LoRA file (a PNG image)"),
    (["convert", "{tmp}/c", "{root}/concept.png"], "concept.png: an existing file that is not .safetensors"),
    (["generate", "--model", "{root}", "--lora", "{bare}", "--prompt", "x"], "not a diffusers pipeline folder"),
])
def test_errors_speak_the_command_lines_language(capsys, work, tmp_path, argv, fragment):
    root, model, bare = work
    if argv[0] == "convert" and argv[1] == "{tmp}/c":  # a valid source for the destination error
        assert cli(capsys, "convert", bare, tmp_path / "c", "--model", model, "--min-rank", 2)[0] == 0
    fill = lambda s: str(s).format(root=root, model=model, bare=bare, tmp=tmp_path)
    line = one_error(*cli(capsys, *map(fill, argv))[::2])
    assert fill(fragment) in line
    assert "weights_only=False" not in line and "trusted environment" not in line and "cfg=" not in line


def test_model_index_json_is_accepted_as_the_model(capsys, work, tmp_path):
    root, model, bare = work
    code, _, err = cli(capsys, "generate", "--model", Path(model) / "model_index.json", "--lora", bare, "--min-rank", 2,
                       "--prompt", "x", "--steps", 1, "--out", tmp_path, "-q")
    assert code == 0, err


def test_python_dash_m_and_a_broken_pipe(work):
    root, model, bare = work
    version = subprocess.run([sys.executable, "-m", "tlora_diffusers", "--version"], env=ENV, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("tlora-diffusers ")
    piped = subprocess.run(f'"{sys.executable}" -m tlora_diffusers inspect "{bare}" --json | head -1', shell=True,
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.strip() == "{"
    assert "Broken pipe" not in piped.stderr and "error" not in piped.stderr


def test_schedule_plot_without_a_suffix_says_the_file_it_wrote(capsys, tmp_path):
    code, out, _ = cli(capsys, "schedule", "--max-rank", 8, "--plot", tmp_path / "noext")
    assert code == 0 and out.strip().endswith(f"wrote {tmp_path / 'noext.png'}") and (tmp_path / "noext.png").is_file()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    parser = build_parser(command)
    sub = parser._subparsers._group_actions[0].choices[command]
    help_text = sub.format_help()
    assert "examples:" in help_text
    required_choices = {a for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in sub._actions:
        if not action.option_strings or action.dest in ("help", "verbose") or action in required_choices:
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        if action.nargs == 0 or action.required:  # flags and required options have no default to show
            continue
        shown = sub._get_formatter()._get_help_string(action)
        assert "default" in shown, f"{command} {action.option_strings[0]}: help shows no default: {shown!r}"


def test_top_level_help_and_version_import_no_command_module():
    probe = ("import sys; from tlora_diffusers.cli import main; main(['--version']); "
             "print(sorted(m for m in sys.modules if m.startswith(('torch', 'diffusers', 'tlora_diffusers.cli.'))))")
    out = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=120).stdout
    assert out.strip().endswith("['tlora_diffusers.cli.main']"), out


def test_grid_labels_wrap_instead_of_being_cut():
    from PIL import ImageDraw, ImageFont

    from tlora_diffusers.plot import _wrap, image_grid

    tiles = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    labels = ["seed 0, T-LoRA", "seed 0, unmasked (all ranks at every step)"]
    grid = image_grid(tiles, labels, cols=2)
    cell = 128  # 32 px upscaled to the minimum cell width
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    assert all(draw.textlength(line, font=font) <= cell for label in labels for line in _wrap(draw, label, font, cell))
    assert grid.width >= 2 * cell and grid.height > cell


def test_quiet_by_default_and_warnings_once(work, tmp_path):
    root, model, bare = work
    args = [sys.executable, "-m", "tlora_diffusers", "generate", "--model", str(model), "--lora", str(bare),
            "--min-rank", "2", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "q"), "-q", "--dtype", "float16"]
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    noise = [line for line in proc.stderr.splitlines() if line.strip()]
    assert not any(word in "\n".join(noise) for word in ("torchvision", "No LoRA keys", "kept in float32")), noise
    assert sum("float16 on the CPU" in line for line in noise) == 1, noise
    verbose = subprocess.run(args[:-2] + ["-v"], env=ENV, capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0


def test_inspect_report_prints_readably(work):
    from tlora_diffusers import inspect_tlora

    root, model, bare = work
    report = inspect_tlora(bare)
    text = str(report)
    assert text.splitlines()[0].startswith("path: ") and "needs: denoiser, cfg" in text and "{" not in text
    assert report["format"] == "lycoris" and json.loads(json.dumps(report))["rank"] == 8


def test_app_errors_name_the_model_folder(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tlora_space_app", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    with pytest.raises(ValueError, match="model folder /nonexistent: no such folder"):
        app.get_pipeline("/nonexistent")


def test_space_requirements_pin_versions_the_package_accepts():
    """requirements-space.txt pins every requirement of setup.cfg (and gradio, the app's) to a version
    inside setup.cfg's range, and takes torch from the CPU index."""
    import configparser

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    wanted = [Requirement(line) for line in cfg["options"]["install_requires"].strip().splitlines()]
    wanted += [Requirement(line) for line in cfg["options.extras_require"]["test"].strip().splitlines()
               if line.startswith("gradio")]
    lines = [ln.strip() for ln in (ROOT / "requirements-space.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    pins = {}
    for line in lines[1:]:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"requirements-space.txt: {line} is not a pin"
        pins[req.name.lower().replace("_", "-")] = spec.version
    for req in wanted:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"requirements-space.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


@pytest.mark.parametrize("cpus, load, env, flag, expected", [
    (2, 0.0, None, None, 2),     # an idle 2-core machine: both cores
    (2, 1.1, None, None, 1),     # one core kept busy by another process: one thread, not two spinning
    (2, 3.5, None, None, 1),     # busier than the machine: still one
    (16, 5.6, None, None, 10),   # CPUs minus the busy ones, rounded
    (2, 1.1, "2", None, 2),      # TLORA_THREADS wins over the load
    (2, 0.0, "1", "3", 3),       # --threads wins over TLORA_THREADS
    (2, 0.0, "auto", None, 2),
])
def test_threads_fit_the_machine(monkeypatch, cpus, load, env, flag, expected):
    from tlora_diffusers import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "busy_cpus", lambda: load)
    if env is None:
        monkeypatch.delenv("TLORA_THREADS", raising=False)
    else:
        monkeypatch.setenv("TLORA_THREADS", env)
    assert threads.choose_threads(flag) == expected


def test_bad_thread_counts_are_refused_in_the_flag_and_the_environment(capsys, monkeypatch):
    code, _, err = (lambda c: (c, *capsys.readouterr()))(main(["generate", "--threads", "0"]))
    assert code == 2 and "--threads" in err and "whole number >= 1 or 'auto', got 0" in err
    from tlora_diffusers.threads import choose_threads

    monkeypatch.setenv("TLORA_THREADS", "many")
    with pytest.raises(ValueError, match=r"threads must be a whole number >= 1 or 'auto', got 'many'"):
        choose_threads()


def one_line(capsys, argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("tlora-diffusers: error: "), err
    return err


def test_a_lora_argument_is_a_local_path_or_an_explicit_hub_file(capsys, work, tmp_path, monkeypatch):
    from tlora_diffusers.cli import generate

    def no_pipeline(*a, **k):
        raise AssertionError("the pipeline was loaded before --lora was checked")

    monkeypatch.setattr(generate, "load_pipeline", no_pipeline)
    err = one_line(capsys, ["generate", "--model", "scenes", "--lora", "someone/their-lora", "--prompt", "x",
                            "--out", tmp_path])
    assert "--lora someone/their-lora: no such file or folder (a Hub repo is written hf://user/repo" in err
    err = one_line(capsys, ["generate", "--model", "scenes", "--lora", "hf://only-a-user", "--prompt", "x"])
    assert "a Hub file is written hf://user/repo or hf://user/repo/file.safetensors" in err


def test_the_shipped_weights_folder_points_to_its_pipeline(capsys):
    from tlora_diffusers.scenes import PIPELINE, WEIGHTS

    err = one_line(capsys, ["inspect", "scenes-example", "--model", WEIGHTS])
    assert f"not a diffusers pipeline folder (no model_index.json in it); did you mean {PIPELINE}?" in err


def test_the_aliases_run_what_ships(capsys, tmp_path):
    code = main(["generate", "--model", "scenes", "--lora", "scenes-example", "--prompt", "a sks shape", "--steps", "2",
                 "--out", str(tmp_path), "-q"])
    assert code == 0 and (tmp_path / "00000-seed0.png").is_file()
    with Image.open(tmp_path / "00000-seed0.png") as im:
        assert im.size == (32, 32)  # the model's own resolution


@pytest.mark.parametrize("argv", [
    ["schedule", "--max-rank", "4", "--plot", "/nonexistent/dir/x.png"],
    ["convert", "scenes-example", "/proc/x.safetensors"],
])
def test_os_errors_are_one_readable_line(capsys, argv):
    err = one_line(capsys, argv)
    assert "[Errno" not in err and ("no such file or directory" in err.lower() or "ermission" in err or "ead-only" in err
                                    or "not writable" in err), err


def test_weights_are_readable_by_others_like_any_file(tmp_path):
    from tlora_diffusers import convert_tlora

    out = convert_tlora(_example(), tmp_path / "w.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    from tlora_diffusers.io.format import _umask

    assert _umask() == umask == os.umask(umask)  # read from /proc, the process umask left as it was


def _example():
    from tlora_diffusers.scenes import EXAMPLE_TLORA

    return EXAMPLE_TLORA


def test_train_takes_the_models_resolution_and_resume_needs_only_the_folder(capsys, tmp_path):
    image = tmp_path / "concept.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    out = tmp_path / "run"
    argv = ["train", "--model", "scenes", "--images", image, "--prompt", "a sks shape", "--steps", 2, "--rank", 4,
            "--out", out, "-q"]
    assert main([str(a) for a in argv]) == 0
    run = json.loads((out / "tlora_train.json").read_text())
    assert run["config"]["resolution"] == 32 and run["steps"] == 2  # 16 latents x 2 (the VAE), not 512
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "-q"]) == 0  # every other setting: the run's
    run = json.loads((out / "tlora_train.json").read_text())
    assert run["steps"] == 3 and run["config"]["rank"] == 4 and len(run["losses"]) == 3
    err = one_line(capsys, ["train", "--out", tmp_path / "none", "--resume"])
    assert "--resume:" in err and "holds no run to resume" in err
    assert not (tmp_path / "none").exists()  # a refused run leaves no folder behind


def test_the_progress_bar_says_which_it_trains(tmp_path, capsys):
    from tlora_diffusers.scenes import PIPELINE
    from tlora_diffusers.training import TrainConfig, train

    image = tmp_path / "c.png"
    Image.new("RGB", (32, 32), (40, 40, 200)).save(image)
    for rank, min_rank, label in ((4, 4, "training LoRA"), (4, 1, "training T-LoRA")):
        train(TrainConfig(model=str(PIPELINE), images=str(image), prompt="a sks shape", output_dir=str(tmp_path / label),
                          steps=1, rank=rank, min_rank=min_rank, progress=True))
        err = capsys.readouterr().err
        assert label + ":" in err and ("training T-LoRA" in err) == (label == "training T-LoRA")


def test_a_process_keeping_a_core_busy_is_measured_now():
    """busy_cpus measures the present (a tenth of a second), so a busy loop started just now counts fully."""
    import time

    from tlora_diffusers.threads import busy_cpus

    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cpus() >= 0.8
    finally:
        loop.kill()
        loop.wait()
