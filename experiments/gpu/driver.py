"""The GPU run (experiments/gpu/README.md), called by run.sh after it has installed what the machine lacks.

    python experiments/gpu/driver.py ab OUT    # (a) the benchmark, (b) the 4-bit base
    python experiments/gpu/driver.py c OUT     # (c) the embedded study at full size
    python experiments/gpu/driver.py all OUT   # both, one after the other

(a) ``lora-lab-bench`` as one Hydra multirun on the embedded MiniLM-L6: bf16 and fp32 autocast, batch 32
    and 256 x 128 tokens, every arm of conf/arm, the PEFT twins of LoRA, DoRA and (IA)³, merged vs base
    inference, the memory options (bf16 and 4-bit bases, gradient checkpointing).
(b) ``lora-lab-bench`` on a random Llama of 1.03B parameters: a LoRA step on a 4-bit NF4 base against
    bf16 and fp32 bases (memory of each alone on the device); without the 4-bit row when bitsandbytes
    does not load.
(c) ``lora-lab`` with experiments/gpu/conf/experiment/embedded_study_full.yaml, several jobs at once
    (launcher=joblib), seeds as the outer loop; at the part's time limit the sweep's process group gets
    SIGTERM: running jobs finish their step, write a checkpoint and record ``preempted`` (lora_lab's
    preemption handling), jobs not started never start. The records (and the checkpoints that fit)
    come back in study_state.tar.gz; given to a later call (GPU_STATE), completed jobs are skipped and
    checkpointed ones resume.

Each part runs in its own process group under its own time limit, clipped so that the whole command
ends within GPU_TOTAL seconds of GPU_STARTED (run.sh sets it when it starts). Everything lands in OUT,
at most seven files at its top level; the summaries (Markdown) are printed last.

Environment: GPU_DRY=1 (a CPU rehearsal: tiny models, quick settings, a small grid); GPU_BUDGET_A,
GPU_BUDGET_B, GPU_BUDGET_C (seconds per part); GPU_TOTAL; GPU_STUDY_JOBS (jobs at once);
GPU_STUDY_SEEDS (e.g. 0 or 0,1,2); GPU_STATE (a study_state.tar.gz to continue from; default
outputs/gpu/study_state.tar.gz when it exists); GPU_WORK (working folder, default outputs/gpu/work).
Nothing here imports torch: the parts are subprocesses.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "experiments" / "gpu"
CONF = HERE / "conf"
STUDY_EXPERIMENT = "embedded_study_full"
MiB = 2**20
RESERVE_S = 30            # kept for the study's table, the summaries and packing at the end of a command
MAX_FILE = 15 * MiB       # each file of OUT stays under the 16 MiB that comes back
CHECKPOINTS_CAP = 4 * MiB  # checkpoints of unfinished jobs carried in the study state, smallest first

ARMS = ["full", "head", "top2", "houlsby", "pfeiffer", "bitfit", "ia3", "dora", "lora_r1", "lora_r2", "lora_r4",
        "lora_r8", "lora_r64"]
PEFT_ARMS = ["lora_r8", "dora", "ia3"]
# the random Llama of (b): TinyLlama's shape (hidden 2048, 22 layers, 32 heads, 4 key/value heads, SwiGLU
# 5632) with the embedded tokenizer's 30,522 tokens: 1.03B parameters
LLAMA_1B = ["model=tiny_llama", "model.name=random-llama-1b", "model.hidden_size=2048", "model.num_layers=22",
            "model.num_heads=32", "model.num_kv_heads=4", "model.intermediate_size=5632",
            "model.max_positions=2048", "model.dropout=0.0"]
NF4_ROWS = ["fp32", "bf16_base", "bf16_base_checkpointing", "nf4_base"]
# the targets of the GPU run (bf16)
TARGET_LORA_VS_FROZEN, TARGET_OURS_VS_PEFT, TARGET_MERGED_VS_BASE = 1.05, 1.00, 1.02


class Settings:
    def __init__(self, env=os.environ):
        self.dry = env.get("GPU_DRY") == "1"
        dry = self.dry
        self.work = Path(env.get("GPU_WORK") or ROOT / "outputs" / "gpu" / "work").resolve()
        self.budget = {"a": float(env.get("GPU_BUDGET_A", 120 if dry else 185)),
                       "b": float(env.get("GPU_BUDGET_B", 90 if dry else 100)),
                       "c": float(env.get("GPU_BUDGET_C", 150 if dry else 300))}
        self.total = float(env.get("GPU_TOTAL", 600 if dry else 345))
        self.started = float(env.get("GPU_STARTED") or time.time())
        self.jobs = int(env.get("GPU_STUDY_JOBS", 2 if dry else 12))
        self.seeds = env.get("GPU_STUDY_SEEDS", "0,1" if dry else "0,1,2")
        default_state = ROOT / "outputs" / "gpu" / "study_state.tar.gz"
        state = env.get("GPU_STATE") or (str(default_state) if default_state.exists() else "")
        self.state = Path(state).resolve() if state else None
        self.grace = 10.0 if dry else 20.0

    def limit(self, part: str) -> float:
        """The part's own budget, clipped to what the command has left before its summaries (and the
        grace period a stopped part may take)."""
        left = self.total - (time.time() - self.started) - RESERVE_S - self.grace
        return max(0.0, min(self.budget[part], left))


def say(message: str) -> None:
    print(f"[gpu] {message}", flush=True)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ processes under a time limit

def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM to the group, then again every 2 s (a process that has finished its stop handling is back
    to the default action and ends; one still writing its checkpoint only sets its flag again), SIGKILL
    to what is left after ``grace`` seconds."""
    _signal_group(pgid, signal.SIGTERM)
    deadline, resend = time.time() + grace, time.time() + 3
    while group_members(pgid) and time.time() < deadline:
        time.sleep(0.25)
        if time.time() >= resend:
            _signal_group(pgid, signal.SIGTERM)
            resend = time.time() + 2
    if group_members(pgid):
        _signal_group(pgid, signal.SIGKILL)


def run_limited(cmd: list[str], log: Path, seconds: float, grace: float, cwd: Path) -> dict:
    """``cmd`` in a new process group, output to ``log``; stopped (stop_group) after ``seconds``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(seconds, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc.pid, grace)
            proc.wait()
        if group_members(proc.pid):  # idle pool workers outliving their parent, which had all their results
            stop_group(proc.pid, 1)
    return {"rc": proc.returncode, "timed_out": timed_out, "seconds": round(time.time() - start, 1),
            "limit_s": round(seconds, 1), "log": str(log), "pgid": proc.pid}


def log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# ------------------------------------------------------------------ preflight

PREFLIGHT = r"""
import json, importlib, importlib.metadata as md
import torch
info = {"cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_cuda": torch.version.cuda, "versions": {}, "imports": {}}
for name in ("torch", "transformers", "peft", "datasets", "hydra-core", "omegaconf", "bitsandbytes", "pyarrow",
             "huggingface-hub", "lora_lab", "numpy", "pandas", "joblib", "hydra-joblib-launcher", "wandb"):
    try:
        info["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        info["versions"][name] = None
for module in ("lora_lab.cli.main", "lora_lab.bench.run", "lora_lab.analysis.tables", "datasets",
               "hydra_plugins.hydra_joblib_launcher", "peft", "bitsandbytes"):
    try:
        importlib.import_module(module)
        info["imports"][module] = "ok"
    except Exception as error:
        info["imports"][module] = f"{type(error).__name__}: {error}"[:300]
print("PREFLIGHT " + json.dumps(info))
"""


def preflight(s: Settings) -> dict:
    """What the machine has (device, versions, whether everything imports), before any device time is spent
    on a part. Skipped in the CPU rehearsal."""
    if s.dry:
        return {"dry": True, "cuda": False}
    log = s.work / "logs" / "preflight.log"
    result = run_limited([sys.executable, "-c", PREFLIGHT], log, 120, 5, s.work)
    for line in Path(log).read_text(errors="replace").splitlines():
        if line.startswith("PREFLIGHT "):
            return json.loads(line[len("PREFLIGHT "):])
    return {"error": f"preflight failed (rc {result['rc']}): {log_tail(log, 15)}"}


def required_imports_fail(env: dict) -> list[str]:
    if env.get("dry"):
        return []
    if "error" in env:
        return [env["error"]]
    problems = [] if env.get("cuda") else ["torch sees no CUDA device"]
    problems += [f"{m}: {v}" for m, v in env.get("imports", {}).items()
                 if v != "ok" and m not in ("bitsandbytes", "peft")]
    return problems


# ------------------------------------------------------------------ (a) the benchmark

def bench_grid(s: Settings) -> dict[str, list[str]]:
    """The benchmark's configurations (a Hydra multirun over these keys, in this order)."""
    return {"precision": ["bf16", "fp32"], "batch_size": ["2"] if s.dry else ["32", "256"]}


def bench_overrides(s: Settings) -> list[str]:
    grid = [f"{key}={','.join(values)}" for key, values in bench_grid(s).items()]
    if s.dry:  # two arms, one PEFT twin: the rehearsal checks the path, not the figures
        return grid + ["model=tiny", "device=cpu", "quick=true", "threads=1", "seq_len=16", "arms=[lora_r8,ia3]",
                       "peft.arms=[lora_r8]", "memory_options.rows=[fp32,bf16_base,nf4_base]",
                       "checkpoint.enabled=false"]
    return grid + ["model=minilm", "device=cuda", "seq_len=128", f"arms=[{','.join(ARMS)}]",
                   f"peft.arms=[{','.join(PEFT_ARMS)}]", "checkpoint.enabled=false", "steps_per_sample=4",
                   "repeats=9", "warmup=2"]


def bench_configurations(s: Settings) -> int:
    count = 1
    for values in bench_grid(s).values():
        count *= len(values)
    return count


def part_a(s: Settings) -> dict:
    folder = s.work / "bench"
    limit = s.limit("a")
    info = {"expected": bench_configurations(s)}
    say(f"(a) benchmark: {info['expected']} configurations, limit {limit:.0f} s")
    cmd = python_cmd("lora_lab.bench", "-m", *bench_overrides(s), f"hydra.sweep.dir={folder}",
                     "hydra.sweep.subdir=${precision}_b${batch_size}")
    info.update(run_limited(cmd, s.work / "logs" / "a_bench.log", limit, s.grace, s.work))
    info["results"] = {}
    for path in sorted(folder.glob("*/bench.json")):
        info["results"][path.parent.name] = json.loads(path.read_text())
    say(f"(a) {len(info['results'])} of {info['expected']} configurations in {info['seconds']} s (rc {info['rc']}"
        f"{', stopped at its limit' if info['timed_out'] else ''})")
    if info["rc"] != 0 and not info["timed_out"]:
        print(log_tail(info["log"]), flush=True)
    return info


def _own_memory(m: dict | None) -> tuple[str, str]:
    if not m:
        return "—", "—"
    if "cuda_own_peak_allocated_mb" in m:
        return f"{m['cuda_own_peak_allocated_mb']:.0f}", f"{m['cuda_own_peak_reserved_mb']:.0f}"
    return f"{m['total_mb']:.1f} (tensors)", "—"


def summary_a(info: dict) -> str:
    parts = ["## (a) Benchmark"]
    if not info["results"]:
        return "\n\n".join(parts + [f"No configuration finished (rc {info['rc']}); see logs/a_bench.log."])
    first = next(iter(info["results"].values()))
    env = first.get("environment", {})
    device = env.get("cuda_device") or first["setup"]["device"]
    parts.append(f"Model: {first['setup']['model']}. Device: {device}; torch {first['setup']['torch']}; "
                 f"versions {json.dumps(env.get('versions', {}))}. Step = forward + backward + AdamW on one "
                 "synthetic batch; x frozen = step time over the frozen-backbone limit (head trains, gradients "
                 "reach the embeddings); memory = CUDA peak of the variant alone (allocated / reserved, MiB; "
                 "from the tensors on CPU). Medians over the timed rounds.")
    targets = []
    for key, result in info["results"].items():
        tr = result["train_step"]
        tokens = tr["batch_size"] * tr["seq_len"]
        rows = []
        for name, row in tr["rows"].items():
            step = row["step_ms"]["median"]
            memory = result.get("memory", {}).get(name)
            alloc, reserved = _own_memory(memory)
            rows.append([row["label"], f"{row['trainable_params']:,}", f"{step:.2f}", f"{row['ratio_to_frozen']:.3f}",
                         f"{tokens / (step / 1000):,.0f}", alloc, reserved])
        parts += [f"### {result['setup']['precision']}, batch {tr['batch_size']} x {tr['seq_len']} tokens "
                  f"({tr['repeats']} rounds x {tr['steps_per_sample']} steps)",
                  md_table(["arm", "trainable", "step ms", "x frozen", "tokens/s", "peak alloc. MiB",
                            "peak reserved MiB"], rows)]
        bf16 = result["setup"]["precision"] == "bf16"
        lora = tr["rows"].get("lora_r8", {}).get("ratio_to_frozen")
        if lora is not None:
            targets.append([key, "LoRA r=8 step / frozen-backbone limit", f"{lora:.3f}",
                            f"<= {TARGET_LORA_VS_FROZEN}" if bf16 else "(bf16 only)",
                            ("PASS" if lora <= TARGET_LORA_VS_FROZEN else "FAIL") if bf16 else ""])
        for arm in PEFT_ARMS:
            peft_row = result.get("peft", {}).get(arm)
            if isinstance(peft_row, dict) and "ratio" in peft_row:
                targets.append([key, f"ours / PEFT, {peft_row['label']} (max |Δ logit| "
                                f"{peft_row['max_abs_logit_diff']:.1e})", f"{peft_row['ratio']:.3f}",
                                f"<= {TARGET_OURS_VS_PEFT}",
                                "PASS" if peft_row["ratio"] <= TARGET_OURS_VS_PEFT else "FAIL"])
        skipped = result.get("peft", {}).get("skipped")
        if skipped:
            targets.append([key, "ours / PEFT", "—", "", f"skipped: {skipped}"])
        inference = result.get("inference")
        if inference:
            targets.append([key, f"merged / base inference (unmerged {inference['unmerged']:.3f})",
                            f"{inference['merged']:.3f}", f"<= {TARGET_MERGED_VS_BASE}",
                            "PASS" if inference["merged"] <= TARGET_MERGED_VS_BASE else "FAIL"])
    parts += ["### Targets", md_table(["configuration", "figure", "measured", "target", "result"], targets)]
    missing = info["expected"] - len(info["results"])
    if missing:
        parts.append(f"{missing} configuration(s) did not finish within the part's {info['limit_s']:.0f} s.")
    return "\n\n".join(parts)


# ------------------------------------------------------------------ (b) the 4-bit base

def part_b(s: Settings, env: dict) -> dict:
    folder = s.work / "nf4"
    rows = list(NF4_ROWS)
    note = None
    if not s.dry and env.get("imports", {}).get("bitsandbytes") != "ok":
        rows.remove("nf4_base")
        note = f"4-bit row left out: bitsandbytes does not load ({env.get('imports', {}).get('bitsandbytes')})"
    if s.dry:
        model = ["model=tiny_llama", "device=cpu", "quick=true", "threads=1", "batch_size=2", "seq_len=16"]
    else:
        model = [*LLAMA_1B, "device=cuda", "batch_size=4", "seq_len=512", "repeats=3", "warmup=1"]
    common = ["precision=bf16", "arms=[lora_r8]", "control=false", "peft.enabled=false", "inference.enabled=false",
              "checkpoint.enabled=false", "memory_options.arm=lora_r8", f"output={folder / 'bench.json'}",
              f"hydra.run.dir={folder}"]
    say(f"(b) 4-bit base: rows {rows}, limit {s.limit('b'):.0f} s")
    info = run_limited(python_cmd("lora_lab.bench", *model, *common, f"memory_options.rows=[{','.join(rows)}]"),
                       s.work / "logs" / "b_nf4.log", s.limit("b"), s.grace, s.work)
    if info["rc"] != 0 and "nf4_base" in rows and s.limit("b") > 30:
        print(log_tail(info["log"]), flush=True)
        rows.remove("nf4_base")
        note = f"the run with the 4-bit row failed (rc {info['rc']}; logs/b_nf4.log), repeated without it"
        say(f"(b) {note}")
        info = run_limited(python_cmd("lora_lab.bench", *model, *common, f"memory_options.rows=[{','.join(rows)}]"),
                           s.work / "logs" / "b_nf4_without_4bit.log", s.limit("b"), s.grace, s.work)
    path = folder / "bench.json"
    info["result"] = json.loads(path.read_text()) if path.exists() and info["rc"] == 0 else None
    info["note"] = note
    say(f"(b) {'done' if info['result'] else 'no result'} in {info['seconds']} s (rc {info['rc']})")
    if info["rc"] != 0:
        print(log_tail(info["log"]), flush=True)
    return info


def summary_b(info: dict) -> str:
    parts = ["## (b) LoRA r=8 on a random Llama: 4-bit NF4 base against bf16 and fp32 bases"]
    result = info["result"]
    if info.get("note"):
        parts.append(f"Note: {info['note']}.")
    if result is None:
        return "\n\n".join(parts + [f"No result (rc {info['rc']}); see the log in ab_results.tar.gz."])
    options = result.get("memory_options", {})
    fp32 = result["memory"].get("frozen", {})
    params = fp32.get("weights_mb", 0) * MiB / 4
    tr = result["train_step"]
    lora = tr["rows"].get("lora_r8", {})
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    parts.append(f"{result['setup']['model']}: {size} parameters; batch {tr['batch_size']} x "
                 f"{tr['seq_len']} tokens, bf16 autocast; device {result['setup']['device']}. LoRA r=8 step on the "
                 f"fp32 base: {lora.get('step_ms', {}).get('median', float('nan')):.1f} ms, "
                 f"{lora.get('ratio_to_frozen', float('nan')):.3f} x the frozen-backbone limit.")
    rows = []
    for m in options.values():
        alloc, reserved = _own_memory(m)
        rows.append([m["label"], f"{m['weights_mb']:.0f}", f"{m['trainable_params_mb']:.1f}",
                     f"{m['optimizer_state_mb']:.1f}", f"{m['activations_saved_mb']:.0f}", f"{m['total_mb']:.0f}",
                     alloc, reserved])
    parts.append(md_table(["base", "weights MiB", "trainable MiB", "AdamW MiB", "saved activations MiB",
                           "total (tensors) MiB", "CUDA peak alloc. MiB", "CUDA peak reserved MiB"], rows))
    for row in (result.get("memory_options_skipped") or {}).values():
        parts.append(f"Skipped: {row['label']}: {row['reason']}.")
    parts.append("A 4-bit row's weights are the packed 4-bit tensors; its CUDA peaks include the quantisation "
                 "constants. CUDA peaks are each row's alone (minus what other variants held).")
    return "\n\n".join(parts)


# ------------------------------------------------------------------ (c) the study

def study_grid(s: Settings) -> dict[str, list[str]]:
    config = yaml.safe_load((CONF / "experiment" / f"{STUDY_EXPERIMENT}.yaml").read_text())
    grid = {k: str(v).split(",") for k, v in config["hydra"]["sweeper"]["params"].items()}
    grid["seed"] = s.seeds.split(",")
    if s.dry:
        grid.update(arm=["lora_r8"], lr_step=["1"])
    return grid


def study_overrides(s: Settings, folder: Path) -> list[str]:
    grid = study_grid(s)
    overrides = [f"hydra.searchpath=[file://{CONF}]", f"experiment={STUDY_EXPERIMENT}", "launcher=joblib",
                 f"hydra.launcher.n_jobs={s.jobs}", "logger=disabled", f"hydra.sweep.dir={folder}",
                 "~hydra.callbacks.comparison",  # the sweep's own comparison table: lora-lab-table follows
                 *(f"{key}={','.join(values)}" for key, values in grid.items())]
    if s.dry:
        overrides += ["model=tiny", "trainer.device=cpu", "data.max_train=48", "data.max_eval=32",
                      "trainer.epochs=1", "trainer.latency_repeats=1", "trainer.throughput_warmup_steps=1"]
    else:
        overrides += ["trainer.device=cuda"]
    return overrides


def read_records(folder: Path) -> dict[str, dict]:
    records = {}
    for path in sorted(folder.glob("*/record.json")):
        try:
            records[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            records[path.parent.name] = {"status": "unreadable"}
    return records


def part_c(s: Settings) -> dict:
    folder = s.work / "study"
    folder.mkdir(parents=True, exist_ok=True)
    carried_from = None
    if s.state and s.state.exists():
        with tarfile.open(s.state) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.12 and the 3.8-3.11 security releases
                tar.extractall(s.work, filter="data")
            else:
                tar.extractall(s.work)  # our own archive
        carried_from = str(s.state)
    before = {k: r.get("status") for k, r in read_records(folder).items()}
    grid = study_grid(s)
    expected = 1
    for values in grid.values():
        expected *= len(values)
    limit = s.limit("c")
    say(f"(c) study: {expected} jobs ({' x '.join(f'{len(v)} {k}' for k, v in grid.items())}), {s.jobs} at once, "
        f"limit {limit:.0f} s; {sum(v == 'completed' for v in before.values())} completed before"
        + (f" (from {carried_from})" if carried_from else ""))
    info = run_limited(python_cmd("lora_lab", *study_overrides(s, folder)), s.work / "logs" / "c_study.log",
                       limit, s.grace, s.work)
    records = read_records(folder)
    info.update(expected=expected, grid=grid, carried_from=carried_from, before=before,
                statuses={k: r.get("status") for k, r in records.items()},
                train_seconds=sum(float((r.get("measurements") or {}).get("train_seconds") or 0)
                                  for k, r in records.items() if before.get(k) != "completed"))
    done = sum(v == "completed" for v in info["statuses"].values())
    say(f"(c) {done} of {expected} jobs completed after {info['seconds']} s (rc {info['rc']}"
        f"{', stopped at its limit' if info['timed_out'] else ''})")
    if info["rc"] != 0 and not info["timed_out"]:
        print(log_tail(info["log"]), flush=True)
    table = s.work / "table"
    info["table"] = None
    if done:
        args = [str(folder), "--tune", "trainer.lr", "--out", str(table), "--name", "study"]
        if not s.dry:
            args.append("--plot")
        tab = run_limited(python_cmd("lora_lab.analysis.tables", *args), s.work / "logs" / "c_table.log",
                          max(20.0, min(90.0, s.total - (time.time() - s.started) - 5)), 5, s.work)
        if (table / "study.md").exists():
            info["table"] = (table / "study.md").read_text()
        else:
            print(log_tail(tab["log"]), flush=True)
    return info


def summary_c(info: dict) -> str:
    statuses = info["statuses"]
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    carried = sum(v == "completed" for v in info["before"].values())
    seeds = info["grid"]["seed"]
    per_seed = []
    for seed in seeds:
        names = [k for k in statuses if k.endswith(f"_s{seed}")]
        per_task = {task: sum(statuses[k] == "completed" for k in names if k.startswith(f"{task}_"))
                    for task in info["grid"]["data"]}
        per_seed.append([seed, *per_task.values()])
    each = info["expected"] // max(1, len(seeds) * len(info["grid"]["data"]))
    parts = ["## (c) The embedded study at full size",
             f"{sum(v == 'completed' for v in statuses.values())} of {info['expected']} jobs completed "
             f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}); {carried} of them carried over from "
             f"an earlier call; this call ran {info['seconds']} s (limit {info['limit_s']:.0f} s"
             f"{', reached: the sweep was stopped, its running jobs with a checkpoint' if info['timed_out'] else ''}), "
             f"{info['train_seconds']:.0f} s of training in the jobs it ran.",
             md_table(["seed", *(f"{task} completed (of {each})" for task in info["grid"]["data"])], per_seed)]
    if info["table"]:
        parts += ["### Table (lora-lab-table --tune trainer.lr: each arm's lr chosen on validation, test at it)",
                  info["table"].strip()]
    else:
        parts.append("No table: no job completed.")
    if info["expected"] > sum(v == "completed" for v in statuses.values()):
        parts.append("To complete it: put study_state.tar.gz into outputs/gpu/ and run the same command again "
                     "(experiments/gpu/README.md).")
    return "\n\n".join(parts)


# ------------------------------------------------------------------ packing

def pack(target: Path, base: Path, paths: list[Path], skip=lambda p: False) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        for path in paths:
            if path.exists():
                tar.add(path, arcname=str(path.relative_to(base)), filter=lambda t: None if skip(t.name) else t)
    return target


def pack_study_state(s: Settings, out: Path, statuses: dict[str, str]) -> Path:
    """Records, Hydra configs and logs of every job; checkpoints of unfinished jobs, smallest first, while
    they fit. Trained weights stay behind (the table needs the records alone)."""
    folder = s.work / "study"
    checkpoints = []
    for name, status in statuses.items():
        ck = folder / name / "checkpoint"
        if status != "completed" and ck.is_dir():
            checkpoints.append((sum(p.stat().st_size for p in ck.rglob("*") if p.is_file()), ck))
    keep, size = set(), 0
    for nbytes, ck in sorted(checkpoints):
        if size + nbytes <= CHECKPOINTS_CAP:
            keep.add(ck)
            size += nbytes

    def skip(arcname: str) -> bool:
        path = s.work / arcname
        if path.suffix == ".safetensors" and "checkpoint" not in path.parts:
            return path.name != "predictions.safetensors"  # weights left out; per-example results feed the intervals
        return "checkpoint" in path.parts and not any(ck == path or ck in path.parents for ck in keep)

    target = out / "study_state.tar.gz"
    pack(target, s.work, [folder], skip)
    if target.stat().st_size > MAX_FILE:  # the checkpoints did not compress: records only
        keep.clear()
        pack(target, s.work, [folder], skip)
    return target


def finish(out: Path, name: str, text: str) -> None:
    (out / name).write_text(text + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("ab", "c", "all"):
        print(__doc__)
        return 2
    part = argv[0]
    out = Path(argv[1] if len(argv) > 1 else os.environ.get("OUT") or ROOT / "outputs" / "gpu" / "out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = Settings()
    s.work.mkdir(parents=True, exist_ok=True)
    say(f"{'CPU rehearsal (GPU_DRY=1)' if s.dry else 'GPU run'}: part {part}, work {s.work}, out {out}")
    env = preflight(s)
    (s.work / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    problems = required_imports_fail(env)
    header = (f"# GPU run ({'CPU rehearsal, GPU_DRY=1' if s.dry else env.get('device')}), "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if problems:
        text = header + "\n\nStopped before any part: " + "; ".join(problems)
        finish(out, "summary_failed.md", text)
        print(text, flush=True)
        return 1
    summaries = []
    if part in ("ab", "all"):
        a = part_a(s)
        b = part_b(s, env)
        text = "\n\n".join([header, summary_a(a), summary_b(b)])
        finish(out, "ab_summary.md", text)
        (s.work / "ab_parts.json").write_text(json.dumps({"a": {k: v for k, v in a.items() if k != "results"},
                                                          "b": {k: v for k, v in b.items() if k != "result"}},
                                                         indent=2) + "\n")
        pack(out / "ab_results.tar.gz", s.work, [s.work / "bench", s.work / "nf4", s.work / "logs",
                                                 s.work / "env.json", s.work / "ab_parts.json"])
        summaries.append(text)
    if part in ("c", "all"):
        c = part_c(s)
        text = "\n\n".join([header, summary_c(c)])
        finish(out, "c_summary.md", text)
        (s.work / "c_part.json").write_text(json.dumps(c, indent=2, default=str) + "\n")
        pack_study_state(s, out, c["statuses"])
        pack(out / "study_table.tar.gz", s.work, [s.work / "table", s.work / "logs", s.work / "env.json",
                                                  s.work / "c_part.json"])
        summaries.append(text)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / MiB:.2f} MiB" for p in sorted(out.iterdir()) if p.is_file())
    say(f"files in {out}: {sizes}; {time.time() - s.started:.0f} s since the command started")
    print("\n\n" + "\n\n".join(summaries), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
