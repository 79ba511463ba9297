"""Section 6: process start to first training step of ``lora-lab``, cold and warm data cache."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from lora_lab import records, warm
from lora_lab.bench.timing import summarise


# The same start in a bare process: import torch and transformers, load the tokenizer and the model,
# take one step; no Hydra, no data, no lora_lab training code. What any start-up pays at least.
_FLOOR_SCRIPT = r"""
import json, sys
from lora_lab.measure import process_age_seconds as age
import torch
ages = {"import_torch": age()}
from omegaconf import OmegaConf
from lora_lab.modeling import load_model, load_tokenizer
cfg = OmegaConf.create(json.loads(sys.argv[1]))
load_tokenizer(cfg)
ages["tokenizer_loaded"] = age()
model = load_model(cfg, 2).train()
ages["model_loaded"] = age()
vocab = model.get_input_embeddings().num_embeddings
ids = torch.randint(min(1000, vocab // 2), vocab, (16, 48), generator=torch.Generator().manual_seed(0))
head = [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]
optimizer = torch.optim.AdamW(head, lr=1e-4)
model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(16, dtype=torch.long)).loss.backward()
optimizer.step()
ages["first_step"] = age()
print(json.dumps(ages))
"""


def startup_command() -> list[str]:
    exe = shutil.which("lora-lab")
    return [exe] if exe else [sys.executable, "-m", "lora_lab.cli"]


def _server_command(action: str) -> list[str]:
    return [sys.executable, "-m", "lora_lab.server", action]


class StartupFailed(Exception):
    pass


def _run(name: str, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise StartupFailed(f"{name} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def bench_startup(cfg, forwarded: list[str]) -> dict:
    """``lora-lab`` started ``startup.repeats`` times in each of three ways, interleaved: a fresh
    process on an empty data cache (cold: it tokenises), a fresh process on that now warm cache, and
    (``startup.server``) the same through a warm server of its own (``lora-lab-server``, own socket,
    started once). Each run reports the seconds from its command's start to the end of its first
    training step; a figure is the median over the repeats."""
    scfg = cfg.startup
    tmp = Path(tempfile.mkdtemp(prefix="lora_lab_bench_"))
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
           warm.SOCKET_ENV: str(tmp / "server.sock")}
    fresh_env = {**env, warm.DISABLE_ENV: "off"}
    timeout = float(scfg.timeout_s)
    plan = [("cold", fresh_env), ("warm", fresh_env)] + ([("warm_server", env)] if scfg.get("server") else [])
    out: dict = {"command": None, "repeats": int(scfg.get("repeats", 1)), "runs": {name: [] for name, _ in plan}}
    try:
        if scfg.get("server"):
            begin = time.perf_counter()
            _run("lora-lab-server start", _server_command("start"), env, timeout)
            out["server_ready_s"] = time.perf_counter() - begin
        for i in range(out["repeats"]):
            for name, run_env in plan:
                run_dir = tmp / f"{name}_{i}"
                args = [*startup_command(), *forwarded, "method=lora", f"data.max_train={int(scfg.max_train)}",
                        f"data.max_eval={int(scfg.max_eval)}", "trainer.max_steps=1", "trainer.epochs=1",
                        "trainer.progress_bar=false", "trainer.latency_repeats=1", "logger=disabled",
                        f"data.cache_dir={tmp / f'cache_{i}'}", f"hydra.run.dir={run_dir}"]
                out["command"] = " ".join(a if a != args[0] else Path(a).name for a in args)
                start = time.perf_counter()
                proc = _run(f"the {name} run", args, run_env, timeout)
                wall = time.perf_counter() - start
                measured = records.load_record(run_dir)["measurements"]
                out["runs"][name].append({
                    "process_start_to_first_step_s": measured["process_start_to_first_step_s"],
                    "job_start_to_first_step_s": measured.get("job_start_to_first_step_s"),
                    "launched_via": measured.get("launched_via"), "wall_s": wall})
                if name == "cold":
                    out["cache_entries_after_cold"] = len(list((tmp / f"cache_{i}" / "tokenized").glob("*")))
                if name == "warm_server" and measured.get("launched_via") != "warm server":
                    raise StartupFailed(f"the warm server did not take the job: {proc.stderr.strip()[-2000:]}")
        if scfg.floor:
            model = json.dumps(OmegaConf.to_container(cfg.model, resolve=True))
            proc = subprocess.run([sys.executable, "-c", _FLOOR_SCRIPT, model], capture_output=True, text=True,
                                  env=fresh_env, timeout=timeout)
            if proc.returncode == 0:
                out["floor"] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                out["floor_error"] = proc.stderr.strip()[-2000:]
    except StartupFailed as error:
        out["error"] = str(error)
        return out
    except subprocess.TimeoutExpired as error:
        out["error"] = f"timed out after {error.timeout} s"
        return out
    finally:
        if scfg.get("server"):
            subprocess.run(_server_command("stop"), capture_output=True, env=env, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    for name, runs in out["runs"].items():
        first_step = summarise([r["process_start_to_first_step_s"] for r in runs])
        out[name], out[f"{name}_range"] = first_step["median"], [first_step["min"], first_step["max"]]
        jobs = [r["job_start_to_first_step_s"] for r in runs if r["job_start_to_first_step_s"] is not None]
        out[f"{name}_job"] = summarise(jobs)["median"] if jobs else None
        out[f"{name}_wall"] = summarise([r["wall_s"] for r in runs])["median"]
    out["warm_over_cold"] = out["warm"] / out["cold"]
    if "warm_server" in out:
        out["warm_server_over_warm"] = out["warm_server"] / out["warm"]
    return out


def forwarded_overrides(task_overrides: list[str], cfg) -> list[str]:
    """The command-line overrides of this benchmark that choose the model and data, for ``lora-lab``."""
    own = {"data.cache_dir", "data.max_train", "data.max_eval"}
    out = []
    for item in task_overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in ("model", "data"):
            out = [o for o in out if o.split("=", 1)[0].lstrip("+~") != key]
        if (key in ("model", "data") or key.startswith(("model.", "data."))) and key not in own:
            out.append(item)
    if cfg.get("threads"):
        out.append(f"trainer.threads={int(cfg.threads)}")
    out.append(f"trainer.device={cfg.device}")
    if cfg.get("precision", "fp32") != "fp32":
        out.append(f"trainer.precision={cfg.precision}")
    return out
