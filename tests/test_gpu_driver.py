"""experiments/gpu: the driver of the GPU run, rehearsed on CPU (GPU_DRY=1: tiny models, quick settings, a
small grid). Two calls as on the GPU machine: the first runs every part with one seed of the study (two
jobs at once, as joblib pool workers), the second, on a fresh working folder that gets only what the first
sent back, continues the study with two seeds (one job at a time, which saves the workers' start here)
and skips the jobs the first completed. Plus the process-group stop the parts' time limits use."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "experiments" / "gpu"
MiB = 2**20


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_driver", GPU / "driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(part: str, out: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(GPU / "run.sh"), part, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc


def members(tar: Path) -> list[str]:
    with tarfile.open(tar) as t:
        return t.getnames()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    subprocess.run([sys.executable, str(GPU / "prepare.py"), "assets", str(tmp / "assets"), "--no-weights"],
                   check=True, capture_output=True, text=True, timeout=120)
    env = {**os.environ, "GPU_DRY": "1", "GPU_ASSETS": str(tmp / "assets"), "PYTHON": sys.executable,
           "WANDB_MODE": "disabled", "LORA_LAB_CACHE": str(tmp / "cache")}
    env.pop("OUT", None)
    started = time.time()
    first = run_script("all", tmp / "out1", {**env, "GPU_WORK": str(tmp / "work1"), "GPU_STUDY_SEEDS": "0"})
    # a fresh machine: a new working folder, and only the state the first call sent back
    second = run_script("c", tmp / "out2", {**env, "GPU_WORK": str(tmp / "work2"), "GPU_STUDY_SEEDS": "0,1", "GPU_STUDY_JOBS": "1",
                                            "GPU_STATE": str(tmp / "out1" / "study_state.tar.gz")})
    return tmp, first.stdout, second.stdout, time.time() - started


def test_the_first_call_writes_few_flat_small_files_with_every_part(rehearsal):
    tmp, stdout, _, _ = rehearsal
    out = tmp / "out1"
    assert {p.name for p in out.iterdir()} == {"all_log.txt", "ab_summary.md", "ab_results.tar.gz", "c_summary.md",
                                              "study_state.tar.gz", "study_table.tar.gz"}
    assert all(p.is_file() and p.stat().st_size < 16 * MiB for p in out.iterdir())
    assert f"assets: {tmp / 'assets'}" in stdout  # the carried asset folder is what lora_lab read
    results = members(out / "ab_results.tar.gz")
    for name in ("bench/bf16_b2/bench.json", "bench/fp32_b2/bench.json", "nf4/bench.json", "logs/a_bench.log",
                 "logs/b_nf4.log", "env.json"):
        assert name in results


def test_benchmark_and_4bit_summaries(rehearsal):
    tmp, stdout, _, _ = rehearsal
    summary = (tmp / "out1" / "ab_summary.md").read_text()
    assert summary.strip() in stdout  # printed last, as written
    assert "## (a) Benchmark" in summary and "### Targets" in summary
    for heading in ("### bf16, batch 2 x 16 tokens", "### fp32, batch 2 x 16 tokens"):
        assert heading in summary
    assert "| arm | trainable | step ms | x frozen | tokens/s | peak alloc. MiB | peak reserved MiB |" in summary
    assert "| frozen-backbone limit | " in summary and "| PEFT LoRA r=8" in summary
    assert "ours / PEFT, LoRA r=8" in summary and "merged / base inference" in summary
    assert "LoRA r=8 step / frozen-backbone limit" in summary
    assert "## (b) LoRA r=8 on a random Llama" in summary
    assert "bf16 frozen base (model.dtype=bf16)" in summary and "fp32 weights" in summary
    assert "Skipped: 4-bit NF4 frozen base" in summary and "needs a CUDA GPU" in summary  # CPU: skipped, said so


def test_first_study_call_completes_its_seed_and_sends_back_records_without_weights(rehearsal):
    tmp, _, _, _ = rehearsal
    summary = (tmp / "out1" / "c_summary.md").read_text()
    assert "2 of 2 jobs completed (2 completed); 0 of them carried over" in summary
    assert "| LoRA r=8 α=8 (q+v) |" in summary and "Seeds per cell: 1" in summary
    state = members(tmp / "out1" / "study_state.tar.gz")
    records = sorted(n for n in state if n.endswith("record.json"))
    assert records == ["study/rotten_tomatoes_lora_r8_lr0.001_s0/record.json",
                       "study/trec6_lora_r8_lr0.001_s0/record.json"]
    assert sorted(n for n in state if n.endswith(".safetensors")) == [  # weights left out, per-example results kept
        "study/rotten_tomatoes_lora_r8_lr0.001_s0/predictions.safetensors",
        "study/trec6_lora_r8_lr0.001_s0/predictions.safetensors"]
    assert "table/study.md" in members(tmp / "out1" / "study_table.tar.gz")


def test_second_call_skips_what_the_first_completed_and_completes_the_grid(rehearsal):
    tmp, _, stdout, seconds = rehearsal
    out = tmp / "out2"
    assert {p.name for p in out.iterdir()} == {"c_log.txt", "c_summary.md", "study_state.tar.gz",
                                              "study_table.tar.gz"}
    summary = (out / "c_summary.md").read_text()
    assert summary.strip() in stdout
    assert "4 of 4 jobs completed (4 completed); 2 of them carried over from an earlier call" in summary
    assert "| 0 | 1 | 1 |" in summary and "| 1 | 1 | 1 |" in summary
    assert "Seeds per cell: 2" in summary
    log = (tmp / "work2" / "logs" / "c_study.log").read_text()
    assert log.count("already completed, skipped") == 2
    records = [n for n in members(out / "study_state.tar.gz") if n.endswith("record.json")]
    assert len(records) == 4
    part = json.loads((tmp / "work2" / "c_part.json").read_text())
    assert part["timed_out"] is False and set(part["statuses"].values()) == {"completed"}
    print(f"rehearsal: {seconds:.0f} s for both calls")


STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    flag = sys.argv[1]
    def stop(signum, frame):
        open(flag, "w").write("stopped")  # what a training job does: finish the step, checkpoint, exit
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    # a child that ignores SIGTERM (a hung worker): only SIGKILL ends it
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "time.sleep(60)"])
    time.sleep(60)
""")


def test_a_part_past_its_limit_is_stopped_group_and_all(tmp_path):
    driver = load_driver()
    script = tmp_path / "job.py"
    script.write_text(STUBBORN)
    started = time.time()
    info = driver.run_limited([sys.executable, str(script), str(tmp_path / "flag")], tmp_path / "job.log", 2.0,
                              grace=3.0, cwd=tmp_path)
    assert info["timed_out"] and info["rc"] == 143
    assert (tmp_path / "flag").read_text() == "stopped"
    assert time.time() - started < 15
    # nothing of the group is left: the child that ignored SIGTERM was killed after the grace period
    assert not driver.group_members(info["pgid"])


def test_the_limit_leaves_time_for_the_summaries(monkeypatch):
    driver = load_driver()
    monkeypatch.setenv("GPU_TOTAL", "130")
    monkeypatch.setenv("GPU_STARTED", str(time.time() - 70))
    monkeypatch.setenv("GPU_BUDGET_C", "300")
    settings = driver.Settings()
    left = 130 - 70 - driver.RESERVE_S - settings.grace
    assert left - 1 <= settings.limit("c") <= left
    monkeypatch.setenv("GPU_STARTED", str(time.time() - 200))
    assert driver.Settings().limit("c") == 0
