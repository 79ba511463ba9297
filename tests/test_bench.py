"""lora-lab-bench: runs end to end on the tiny random model and stores figures whose ratios are the
quotients of the stored medians. Nothing here asserts how fast anything is."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_lab import bench
from lora_lab.bench import variants
from lora_lab.config.compose import compose
from lora_lab.methods import registered_methods
from lora_lab.runtime import timing

ROOT = Path(__file__).resolve().parent.parent
# every method's arms, and the first arm of each method with a PEFT counterpart
ARMS = [arm for cls in registered_methods().values() for arm in cls.bench_arms]
PEFT_ARMS = [cls.bench_arms[0] for cls in registered_methods().values() if cls.has_peft_counterpart and cls.bench_arms]


def bench_config(*overrides: str):
    return compose("bench", overrides)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real command-line run from a directory outside the repository: every section, the tiny
    model, quick settings, one thread."""
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lab.bench", "model=tiny", "quick=true", "batch_size=4", "seq_len=16",
         "threads=1", f"arms=[{','.join(ARMS)}]", f"peft.arms=[{','.join(PEFT_ARMS)}]",
         f"hydra.run.dir={tmp / 'run'}"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((tmp / "run" / "bench.json").read_text())


def test_writes_json_and_prints_markdown_tables(quick_run):
    stdout, result = quick_run
    assert "### 1. Training step" in stdout and "| method | trainable | step ms |" in stdout
    assert "### Targets" in stdout and result["table_markdown"] in stdout
    assert result["setup"]["model"] == "tiny-random-bert" and result["config"]["quick"] is True
    assert {t["result"] for t in result["targets"]} <= {"PASS", "FAIL", "n/a"} and len(result["targets"]) == 8
    assert "### 5. Checkpointing" in stdout


def lora_trainable_with_head(result) -> int:
    return result["checkpoint"]["rows"]["lora_r8"]["trainable_params"]


def test_checkpoint_overhead_is_the_write_over_the_interval_of_steps(quick_run):
    _, result = quick_run
    section = result["checkpoint"]
    assert section["every"] == 200 and set(section["rows"]) == {"lora_r8", "full"}
    for row in section["rows"].values():
        assert row["overhead"] == pytest.approx(row["checkpoint_ms"] / (200 * row["step_ms"]), rel=1e-12)
        assert row["checkpoint_ms_min"] <= row["checkpoint_ms"] <= row["checkpoint_ms_max"]
    lora, full = section["rows"]["lora_r8"], section["rows"]["full"]
    assert full["checkpoint_mb"] > lora["checkpoint_mb"]  # AdamW state of every parameter vs of LoRA's
    # a run keeps its trainable state only: LoRA's factors, not the W0 copies its version 2 ΔW file held
    n = lora_trainable_with_head(result)
    assert 4 * n <= lora["state_mb"] * 2**20 <= 4 * n + 4096  # fp32 values plus the safetensors header
    assert lora["delta_w_v2_mb"] > lora["state_mb"] and full["state_mb"] > 20 * lora["state_mb"]
    target = next(t for t in result["targets"] if t["section"] == "checkpoint")
    assert target["value"] == pytest.approx(100 * lora["overhead"])


def test_training_ratios_are_quotients_of_the_stored_medians(quick_run):
    _, result = quick_run
    rows = result["train_step"]["rows"]
    assert set(ARMS) | {bench.REFERENCE, bench.CONTROL} | {f"peft_{a}" for a in PEFT_ARMS} == set(rows)
    assert rows["dora"]["label"] == "DoRA r=8 α=8 (q+v)" and rows["peft_dora"]["label"] == "PEFT DoRA r=8 α=8 (q+v)"
    ref = rows[bench.REFERENCE]["step_ms"]["median"]
    for name, row in rows.items():
        s = row["step_ms"]
        assert len(s["samples"]) == 2 and s["min"] <= s["median"] <= s["max"]
        assert row["ratio_to_frozen"] == pytest.approx(s["median"] / ref, rel=1e-12)
    assert rows[bench.REFERENCE]["ratio_to_frozen"] == 1.0
    # the A/A control: the same model measured in the same rounds
    assert 1 / 3 < rows[bench.CONTROL]["ratio_to_frozen"] < 3
    assert rows["full"]["trainable_params"] > rows["lora_r64"]["trainable_params"] > rows["lora_r8"]["trainable_params"]
    assert rows[bench.REFERENCE]["trainable_params"] == rows["head"]["trainable_params"]
    load = result["train_step"]["other_processes_cpu_share"]
    if load["available"]:  # Linux: one share per timed sample, reported with the section
        assert load["samples"] == 2 * len(rows) and 0 <= load["median"] <= load["max"]
        assert result["setup"]["disturbed_samples"] >= load["disturbed_samples"]


def test_peft_twins_give_our_outputs_and_train_the_same_parameters(quick_run):
    _, result = quick_run
    peft = result["peft"]
    assert "skipped" not in peft, peft.get("skipped")  # peft is a test dependency
    assert set(peft) == set(PEFT_ARMS) | {"peft_version"}
    for arm in PEFT_ARMS:
        row = peft[arm]
        assert row["ratio"] == pytest.approx(row["ours_ms"]["median"] / row["peft_ms"]["median"], rel=1e-12)
        assert row["trainable_ours"] == row["trainable_peft"]  # same targets, rank and head
        assert row["max_abs_logit_diff"] < 1e-5  # same weights, after two training steps of ours


def test_inference_and_memory(quick_run):
    _, result = quick_run
    inf = result["inference"]
    base = inf["rows"]["base"]["latency_ms"]["median"]
    for name, row in inf["rows"].items():
        assert row["ratio_to_base"] == pytest.approx(row["latency_ms"]["median"] / base, rel=1e-12)
    assert set(inf["rows"]) == {"base", "unmerged", "merged", "merged_unloaded"}
    assert inf["merged"] == inf["rows"]["merged"]["ratio_to_base"]
    assert inf["merged_vs_unmerged_max_abs_logit_diff"] < 1e-4

    mem = result["memory"]
    for name, m in mem.items():
        assert m["gradients_mb"] == pytest.approx(m["trainable_params_mb"])
        # AdamW keeps two moments per trainable parameter (plus one step counter per tensor)
        assert 2 * m["trainable_params_mb"] <= m["optimizer_state_mb"] < 2 * m["trainable_params_mb"] + 0.01
    assert mem["full"]["gradients_mb"] == pytest.approx(mem["full"]["weights_mb"])
    assert mem["lora_r8"]["optimizer_state_mb"] < mem["full"]["optimizer_state_mb"] / 50
    assert mem["head"]["activations_saved_mb"] < mem[bench.REFERENCE]["activations_saved_mb"]

    options = result["memory_options"]
    assert list(options) == ["fp32", "checkpointing", "bf16_base", "bf16_base_checkpointing"]
    fp32, bf16 = options["fp32"], options["bf16_base"]
    frozen_fp32 = fp32["weights_mb"] - fp32["trainable_params_mb"]
    frozen_bf16 = bf16["weights_mb"] - bf16["trainable_params_mb"]
    assert frozen_bf16 == pytest.approx(frozen_fp32 / 2, rel=0.02)  # norms stay fp32: a little over half
    assert bf16["trainable_params_mb"] == fp32["trainable_params_mb"]  # trainables, their grads and AdamW: fp32
    assert bf16["optimizer_state_mb"] == fp32["optimizer_state_mb"]
    assert options["checkpointing"]["activations_saved_mb"] < fp32["activations_saved_mb"] / 2
    assert options["bf16_base_checkpointing"]["total_mb"] == min(m["total_mb"] for m in options.values())
    assert "### 3b. Fitting a bigger model" in result["table_markdown"]
    assert set(result["sharded_memory"]) == {f"{arm}/{strategy}/{n}" for arm in ("full", "lora_r8")
                                             for strategy in ("ddp", "fsdp") for n in (2, 4)}
    assert "### 3c. Training state per rank, DDP vs FSDP" in result["table_markdown"]


def test_in_process_with_peft_missing_gives_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    cfg = bench_config("model=tiny", "quick=true", "batch_size=2", "seq_len=8", "threads=1", "arms=[lora_r8]",
                       "control=false", "inference.enabled=false", "checkpoint.enabled=false",
                       f"output={tmp_path / 'b.json'}")
    lines = []
    threads = torch.get_num_threads()
    try:
        result = bench.run_benchmark(cfg, out=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert "pip install peft" in result["peft"]["skipped"]
    assert set(result["train_step"]["rows"]) == {bench.REFERENCE, "lora_r8"}
    assert json.loads((tmp_path / "b.json").read_text())["peft"] == result["peft"]
    assert any("Skipped: peft is not importable" in line for line in lines)
    verdicts = {t["key"]: t["result"] for t in result["targets"]}
    assert verdicts["lora_r8"] == verdicts["dora"] == verdicts["merged"] == "n/a"


def test_a_figure_compared_with_itself_is_exactly_one():
    s = timing.summarise([0.010, 0.012, 0.011], scale=1000)
    assert s["median"] == pytest.approx(11.0) and (s["min"], s["max"]) == pytest.approx((10.0, 12.0))
    c = timing.compare(s, s)
    assert c["ratio"] == 1.0 and c["paired_min"] == c["paired_max"] == 1.0
    slower = timing.summarise([0.020, 0.024, 0.022], scale=1000)
    assert timing.compare(slower, s)["ratio"] == pytest.approx(2.0)


def test_round_robin_interleaves_rotates_and_drops_warmup():
    calls = []
    fns = {name: (lambda k, name=name: calls.append((k, name))) for name in "ABC"}
    samples = timing.round_robin(fns, rounds=3, warmup=1, device=torch.device("cpu"))
    assert {k: len(v) for k, v in samples.items()} == {"A": 3, "B": 3, "C": 3}
    assert [n for _, n in calls] == list("ABC" "BCA" "CAB" "ABC")
    assert [k for k, _ in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


def test_arms_come_from_conf_arm_and_unknown_ones_are_config_errors():
    from lora_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="arms='no_such_arm'"):
        variants.method_config("no_such_arm", bench_config())
    m = variants.method_config("lora_r64", bench_config())
    assert m.name == "lora" and m.r == 64 and m.dropout == 0.0 and list(m.targets) == ["q", "v"]
    assert variants.method_config("pfeiffer", bench_config()).variant == "pfeiffer"
    wide = variants.method_config("lora_r8", bench_config("arm_overrides=['method.targets=[q,k,v,o]']"))
    assert list(wide.targets) == ["q", "k", "v", "o"]


def test_an_arm_without_a_peft_counterpart_is_refused_before_timing(tmp_path):
    from lora_lab.errors import ConfigError

    cfg = bench_config("model=tiny", "quick=true", "batch_size=2", "seq_len=8", "threads=1", "arms=[]",
                       "peft.arms=[houlsby]", "control=false", "inference.enabled=false",
                       f"output={tmp_path / 'b.json'}")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ConfigError, match="peft.arms='houlsby': method 'adapter' has no PEFT counterpart"):
            bench.run_benchmark(cfg, out=lambda line: None)
    finally:
        torch.set_num_threads(threads)


def test_bench_config_reuses_the_model_and_data_groups():
    cfg = bench_config("model=tiny", "batch_size=8", "seq_len=32")
    assert cfg.model.source == "random"
    assert cfg.batch_size == 8 and cfg.inference.seq_len == 32 and cfg.output is None
    assert bench_config().model.name == "all-MiniLM-L6-v2"


def test_bf16_autocasts_the_forward_and_keeps_fp32_weights_and_optimiser_state():
    from conftest import tiny_bert

    from lora_lab.bench.memory import memory_breakdown
    from lora_lab.errors import ConfigError

    base = tiny_bert(hidden=64).train()
    batch = variants.synthetic_batch(base, 2, 8, 60, 0, torch.device("cpu"))
    breakdown = {}
    for precision in ("fp32", "bf16"):
        v = variants.build_ours("lora_r8", base, bench_config("model=tiny", f"precision={precision}"),
                                torch.device("cpu"))
        with v.autocast():
            logits = v.model(**{k: t for k, t in batch.items() if k != "labels"}).logits
        assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        v.step(batch)
        assert all(p.dtype == torch.float32 for p in v.model.parameters())
        breakdown[precision] = memory_breakdown(v, batch, torch.device("cpu"))
    assert breakdown["bf16"]["weights_mb"] == breakdown["fp32"]["weights_mb"]
    assert breakdown["bf16"]["optimizer_state_mb"] == breakdown["fp32"]["optimizer_state_mb"]
    # most saved activations are the bf16 outputs of linear layers: well under the fp32 bytes
    assert breakdown["bf16"]["activations_saved_mb"] < 0.8 * breakdown["fp32"]["activations_saved_mb"]
    with pytest.raises(ConfigError, match="precision='fp16'"):
        variants.precision_of(bench_config("precision=fp16"))


def test_a_decoder_language_model_benches_the_peft_twins_of_prefix_and_prompt_tuning(tmp_path):
    """head=lm: GPT-2's causal LM, next-token labels; prefix and prompt tuning have their PEFT twins there, with
    the same outputs (over the real tokens: PEFT's prompt tuning also returns its virtual positions')."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lab.bench", "model=tiny_gpt2", "head=lm", "quick=true", "batch_size=2",
         "seq_len=8", "threads=1", "arms=[prefix,prompt]", "peft.arms=[prefix,prompt]", "control=false",
         "inference.enabled=false", "memory_options.enabled=false", "checkpoint.enabled=false",
         f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peft = json.loads((tmp_path / "run" / "bench.json").read_text())["peft"]
    for arm in ("prefix", "prompt"):
        assert peft[arm]["trainable_ours"] == peft[arm]["trainable_peft"]
        assert peft[arm]["max_abs_logit_diff"] < 1e-5
    bad = subprocess.run([sys.executable, "-m", "lora_lab.bench", "head=nope", f"hydra.run.dir={tmp_path / 'b'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "head='nope': must be one of ['sequence', 'lm']" in bad.stderr


def test_sharded_memory_per_rank_is_the_formula():
    """Section 3c, predicted from the tensors: DDP replicates weights, gradients and AdamW state; FSDP
    divides them by the ranks and adds the largest unit it gathers whole (a block, or the root)."""
    from lora_lab.bench.memory import MiB
    from lora_lab.bench.sharded_memory import sharded_memory
    from lora_lab.models.architectures import layer_stack
    from lora_lab.models.loading import load_model

    cfg = bench_config("model=tiny")
    torch.manual_seed(0)
    base = load_model(cfg.model, int(cfg.num_labels), None, task=variants.bench_task(cfg))
    rows = sharded_memory(cfg, base, torch.device("cpu"))
    assert list(rows) == [f"{arm}/{strategy}/{n}" for arm in ("full", "lora_r8") for n in (2, 4)
                          for strategy in ("ddp", "fsdp")]
    params = list(base.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    weights = 4 * sum(p.numel() for p in params)
    blocks = [4 * sum(p.numel() for p in block.parameters()) for block in layer_stack(base)[1]]
    largest = max(*blocks, weights - sum(blocks))  # a block, or the root's own parameters
    full = weights + weights + (2 * weights + 4 * len(params))  # weights, gradients, AdamW moments and steps
    for n in (2, 4):
        ddp, fsdp = rows[f"full/ddp/{n}"], rows[f"full/fsdp/{n}"]
        assert ddp["total_mb"] == pytest.approx(full / MiB, rel=1e-12) and ddp["gathered_mb"] == 0
        assert fsdp["total_mb"] == pytest.approx((full / n + largest) / MiB, rel=1e-12)
        assert fsdp["gathered_mb"] == pytest.approx(largest / MiB, rel=1e-12)
        assert fsdp["total_mb"] < ddp["total_mb"]
        lora_ddp, lora_fsdp = rows[f"lora_r8/ddp/{n}"], rows[f"lora_r8/fsdp/{n}"]
        assert lora_ddp["weights_mb"] > ddp["weights_mb"] and lora_ddp["gradients_mb"] < ddp["gradients_mb"] / 10
        assert lora_fsdp["weights_mb"] == pytest.approx(lora_ddp["weights_mb"] / n, rel=1e-12)
    assert rows["full/fsdp/4"]["total_mb"] < rows["full/fsdp/2"]["total_mb"]
