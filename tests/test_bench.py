"""benchmarks/bench.py runs end to end and writes complete reports (timings are not asserted)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
MODELS = ("sdxl", "flux", "flux2-klein")
VARIANTS = ("base", "peft_unfused", "peft_fused", "tlora_mask", "tlora_fast", "lycoris_default", "lycoris_bypass")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One reduced ``--quick`` run in a subprocess (a fresh process, as users run it)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(BENCH), "--quick", "--reps", "2", "--warmup", "1", "--pipeline-steps", "2",
           "--pipeline-reps", "1", "--host-reps", "3", "--host-layers", "50", "--out", str(out), "--name", "t"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "t.json").read_text()), proc.stdout


def test_json_has_every_model_and_variant(quick_run):
    _, result, _ = quick_run
    rows = {(r["model"], r["variant"]): r for r in result["per_call"]}
    assert set(rows) == {(m, v) for m in MODELS for v in VARIANTS}
    fast_implemented = any(r["status"] == "ok" for (m, v), r in rows.items() if v == "tlora_fast")
    for (model, variant), r in rows.items():
        if variant == "tlora_fast" and not fast_implemented:
            assert r["status"].startswith("not implemented")
            continue
        assert r["status"] == "ok", (model, variant, r["status"])
        assert r["median_ms"] > 0 and r["n"] == 2
        assert set(r) >= {"ratio_vs_base", "ratio_vs_peft_unfused", "iqr_ms", "wall_median_ms", "peak_mib",
                          "weights_mib", "adapted_layers"}
    for model in MODELS:  # every adapter variant adapts the same layers
        counts = {rows[(model, v)]["adapted_layers"] for v in VARIANTS if v != "base" and rows[(model, v)]["status"] == "ok"}
        assert len(counts) == 1 and counts.pop() > 0, model


def test_json_has_machine_host_pipeline_and_targets(quick_run):
    _, result, _ = quick_run
    assert {"cpu", "torch", "diffusers", "peft", "lycoris-lora", "torch_threads", "device"} <= set(result["machine"])
    assert result["machine"]["torch_threads"] == 1
    host = result["host_overhead"]
    assert [c["case"] for c in host["cases"]] == ["synthetic-1", "synthetic-50", "sdxl-layout"]
    assert host["cases"][-1]["layers"] == 700  # the SDXL layer layout
    assert {"overhead_us", "per_layer_us", "fixed_us", "met"} <= set(host)
    pipeline = {(r["model"], r["variant"]) for r in result["pipeline"]}
    assert {(m, v) for m in MODELS for v in ("base", "peft_unfused", "tlora_mask")} <= pipeline
    assert len(result["targets"]) == 3
    assert all(t["status"] in ("met", "not met") or t["status"].startswith("not measured") for t in result["targets"])


def test_markdown_and_console_tables(quick_run):
    out, _, stdout = quick_run
    md = (out / "t.md").read_text()
    for heading in ("## Machine", "## Per denoiser call", "## Host overhead", "## Whole pipeline", "## Targets"):
        assert heading in md
    for model in MODELS:
        assert f"### {model}" in md
    for variant in VARIANTS:
        assert f"| {variant} |" in md
        assert variant in stdout
    assert "ratio vs base" in stdout


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_png_written(quick_run):
    out, result, _ = quick_run
    png = out / "t.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot" not in result  # set only when no plot was written


@pytest.fixture(scope="module")
def bench():
    """The script as a module (in-process: --help and argument errors need no subprocess)."""
    spec = importlib.util.spec_from_file_location("tlora_bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_help_documents_every_option(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--size", "--models", "--variants", "--device", "--reps", "--warmup", "--out",
                   "--clock", "--host-layers", "--pipeline-steps", "examples:"):
        assert option in text


@pytest.mark.parametrize("argv, message", [
    (["--size", "full", "--device", "cpu"], "needs a CUDA GPU"),
    (["--models", "sd4"], "--models: unknown ['sd4']"),
    (["--variants", "base,fastest"], "--variants: unknown ['fastest']"),
])
def test_bad_arguments_are_refused(bench, argv, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        bench.settings_from(bench.parse_args(argv))
