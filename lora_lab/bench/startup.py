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

from lora_lab import records


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
    return [exe] if exe else [sys.executable, "-m", "lora_lab.main"]


def bench_startup(cfg, forwarded: list[str]) -> dict:
    """``lora-lab`` run twice as a fresh process on a fresh data cache: the first run tokenises
    (cold), the second finds the tokenised data on disk (warm). Each run reports the seconds from its
    process start to the end of its first training step."""
    scfg = cfg.startup
    tmp = Path(tempfile.mkdtemp(prefix="lora_lab_bench_"))
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    out: dict = {"command": None, "runs": {}}
    try:
        for name in ("cold", "warm"):
            args = [*startup_command(), *forwarded, "method=lora", f"data.max_train={int(scfg.max_train)}",
                    f"data.max_eval={int(scfg.max_eval)}", "trainer.max_steps=1", "trainer.epochs=1",
                    "trainer.progress_bar=false", "trainer.latency_repeats=1", "logger=disabled",
                    f"data.cache_dir={tmp / 'cache'}",
                    f"hydra.run.dir={tmp / name}"]
            out["command"] = " ".join(a if a != args[0] else Path(a).name for a in args)
            start = time.perf_counter()
            proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=float(scfg.timeout_s))
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                out["error"] = f"{name} run exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
                return out
            record = records.load_record(tmp / name)
            out["runs"][name] = {"process_start_to_first_step_s":
                                 record["measurements"]["process_start_to_first_step_s"], "wall_s": wall}
            if name == "cold":
                out["cache_entries_after_cold"] = len(list((tmp / "cache" / "tokenized").glob("*")))
        if scfg.floor:
            model = json.dumps(OmegaConf.to_container(cfg.model, resolve=True))
            proc = subprocess.run([sys.executable, "-c", _FLOOR_SCRIPT, model], capture_output=True, text=True,
                                  env=env, timeout=float(scfg.timeout_s))
            if proc.returncode == 0:
                out["floor"] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                out["floor_error"] = proc.stderr.strip()[-2000:]
    except subprocess.TimeoutExpired as error:
        out["error"] = f"timed out after {error.timeout} s"
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["cold"] = out["runs"]["cold"]["process_start_to_first_step_s"]
    out["warm"] = out["runs"]["warm"]["process_start_to_first_step_s"]
    out["warm_over_cold"] = out["warm"] / out["cold"]
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
    return out
