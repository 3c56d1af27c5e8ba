"""The benchmarks package: a reduced --quick run writes complete reports where it is told (timings are not
asserted); the roofline model's arithmetic; the README's performance table is the committed results' one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
RESULTS = ROOT / "benchmarks" / "results" / "cpu.json"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One reduced ``--quick`` run in a subprocess (a fresh process, as users run it)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(BENCH), "--quick", "--only", "latency,host,staleness,fastpath,training,imports",
           "--reps", "3", "--out", str(out), "--name", "t"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "t.json").read_text()), proc.stdout


def test_quick_run_json_covers_every_model_variant_and_part(quick_run):
    _, result, _ = quick_run
    assert {"python", "torch", "diffusers", "peft", "cores", "threads", "tlora_diffusers"} <= set(result["machine"])
    rows = {(r["model"], r["variant"]): r for r in result["latency"]}
    variants = {"base", "peft_unfused", "peft_fused", "tlora_mask", "lycoris_default", "lycoris_bypass"}
    assert set(rows) == {(m, v) for m in ("sdxl", "flux", "flux2-klein") for v in variants}
    for (model, variant), r in rows.items():
        assert r["median_ms"] > 0 and r["n"] == 3, (model, variant)
        assert (r["x_base"] == 1.0) == (variant == "base")
    layers = {m: {r["layers"] for r in result["latency"] if r["model"] == m and r["variant"] != "base"}
              for m in ("sdxl", "flux")}
    assert all(len(v) == 1 and v.pop() > 0 for v in layers.values())  # every variant adapts the same layers
    host = result["host"]
    assert [r["layers"] for r in host["rows"]] == [10, 100, 700] and host["target_us"] == 100.0
    assert {"overhead_us", "hook_per_layer_overhead_us", "peft_us", "tlora_mask_us"} <= set(host["rows"][0])
    assert {r["model"] for r in result["staleness"]} == {"sdxl", "flux"}
    assert result["staleness"][0]["adapted_layers"] == 700  # full-size SDXL's attention + feed-forward layers
    assert {r["method"] for r in result["training"]} == {"peft_lora", "tlora_vanilla", "tlora_ortho", "lycoris_tlora"}
    assert result["imports"]["heavy_modules_imported"] == []
    roof = result["fastpath"]["roofline"]
    assert set(roof) == {"FLUX.1 [dev] 1024²", "SDXL 1024²"}


def test_markdown_report_has_every_section(quick_run):
    out, _, stdout = quick_run
    md = (out / "t.md").read_text()
    for heading in ("## Per denoiser call", "## Host overhead", "## Staleness check", "## Fast path",
                    "## Training step", "## Import"):
        assert heading in md, heading
    assert f"wrote {out / 't'}.json" in stdout


def test_default_output_folder_is_untracked():
    """`bench.py --quick` writes bench-out/ by default, which git ignores: committed results change only on purpose."""
    spec_args = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "default: bench-out/" in spec_args.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench-out/quick-cpu.json"], cwd=ROOT)
    assert ignored.returncode == 0, "bench-out/ must be in .gitignore"


def test_unknown_part_is_refused():
    proc = subprocess.run([sys.executable, str(BENCH), "--only", "latency,speed"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and "--only: unknown ['speed']" in proc.stderr


def test_roofline_terms_match_a_hand_computation():
    """One 3072x3072 layer, 4096 tokens, rank 64, bf16, on the H200's peak and bandwidth, written out here."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.fastpath import H200, Layer, roofline

    n, d, r, b, steps = 4096, 3072, 64, 2, 28
    peak, bw = 989e12, 4.8e12
    base = max(2 * n * d * d / peak, (d * d + 2 * n * d) * b / bw)
    branch = max(2 * n * r * 2 * d / peak, (r * 2 * d + n * d + 3 * n * d + 2 * n * r) * b / bw)
    merge = max(2 * (r / steps) * d * d / peak, 2 * d * d * b / bw) + 4 * d * d * b / bw / steps
    got = roofline([Layer(d, d, n)], r, steps, H200, b)
    assert got["mask_x_base"] == pytest.approx((base + branch) / base)
    assert got["fast_x_base"] == pytest.approx((base + merge) / base)
    assert got["fast_extra_memory_gib"] == pytest.approx(d * d * b / 2**30)


def test_readme_performance_table_is_generated_from_the_committed_results():
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import README_MARKERS, readme_table

    result = json.loads(RESULTS.read_text())
    readme = (ROOT / "README.md").read_text()
    start, end = README_MARKERS
    block = readme.split(start)[1].split(end)[0].strip()
    assert block == readme_table(result).strip(), "python -m benchmarks.report benchmarks/results/cpu.json --readme"
    host = result["host"]
    assert host["overhead_at_700_us"] is not None  # the headline number is measured, not typed


def test_gpu_suite_logic_dry_run_on_the_cpu(tmp_path):
    """The GPU suite's code path (no GPU here): tiny SDXL, eager variants, LyCORIS bypass, results JSON."""
    cmd = [sys.executable, "-m", "benchmarks.gpu.suite", "--device", "cpu", "--size", "tiny", "--models", "sdxl",
           "--reps", "2", "--skip", "compiled", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu-tiny.json").read_text())
    (row,) = result["models"]
    assert row["model"] == "sdxl" and row["skipped"] == ["compiled"]
    for name in ("peft_unfused", "peft_fused", "tlora_mask", "lycoris_bypass"):
        assert row[name]["x_base"] > 0 and row[name]["n"] == 2, name


def test_the_readme_front_door_table_is_the_committed_runs():
    from benchmarks.front_door import readme_with_table, render_table

    result = json.loads((ROOT / "benchmarks" / "results" / "front_door.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert readme_with_table(readme, render_table(result)) == readme, (
        "README's front-door table is stale: python benchmarks/front_door.py --render "
        "benchmarks/results/front_door.json --readme README.md")
    tasks = {(r["load"], r["task"], r["threads"]) for r in result["rows"]}
    assert {("quiet", t, "auto") for t in ("generate", "train", "app", "demo")} <= tasks
    assert {("busy", t, s) for t in ("generate", "train", "app") for s in ("auto", "per-core")} <= tasks
