"""Sweeps on SLURM through hydra-submitit-launcher. No cluster here: the launcher configs must compose,
and submitit's checkpointing protocol is driven with its local executor (the same job code, the same
signal, a requeue by exit status instead of ``scontrol requeue``)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir

from lora_lab.runtime import records


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("launcher,tasks,strategy", [("slurm", 1, "ddp"), ("slurm_ddp", 4, "ddp"),
                                                     ("slurm_fsdp", 4, "fsdp")])
def test_slurm_launchers_compose(launcher, tasks, strategy):
    cfg = compose_with_hydra(f"launcher={launcher}", "hydra.launcher.partition=gpu")
    hydra_launcher = cfg.hydra.launcher
    assert hydra_launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert hydra_launcher.tasks_per_node == tasks and hydra_launcher.partition == "gpu"
    assert hydra_launcher.max_num_timeout > 0 and hydra_launcher.array_parallelism > 0
    assert cfg.trainer.device == "cuda" and cfg.trainer.strategy == strategy


def test_slurm_fsdp_is_slurm_ddp_with_the_model_sharded():
    """The same jobs (submitit parameters, one task per GPU), only trainer.strategy differs."""
    from omegaconf import OmegaConf

    ddp, fsdp = (OmegaConf.to_container(compose_with_hydra(f"launcher={name}", "hydra.launcher.gpus_per_node=8",
                                                           "hydra.launcher.tasks_per_node=8"))
                 for name in ("slurm_ddp", "slurm_fsdp"))
    assert fsdp["hydra"]["launcher"] == ddp["hydra"]["launcher"] and fsdp["hydra"]["launcher"]["tasks_per_node"] == 8
    assert fsdp["trainer"] == {**ddp["trainer"], "strategy": "fsdp"}
    assert compose_with_hydra("launcher=slurm_fsdp", "trainer.strategy=ddp").trainer.strategy == "ddp"


def submitit_tasks(folder: Path) -> list[int]:
    """Processes running a submitit job whose folder is under ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in command and str(folder) in command:
            found.append(int(entry.name))
    return found


def test_preempted_job_checkpoints_is_requeued_and_resumes(tmp_path, warm_cli):
    sweep = tmp_path / "sweep"
    run_dir = sweep / "0_lora_r8_s0"
    # the launching command forked by warm_cli; submitit starts the job in an interpreter of its own
    command = ["-m", "hydra/launcher=submitit_local",
               "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", "experiment=smoke", "logger=disabled",
               "data.max_train=400", "trainer.checkpoint_every=3",
               # a wider tiny model: 50 steps of ~0.1 s, so the signal lands mid-run
               "model.hidden_size=256", "model.intermediate_size=512", "trainer.threads=1", f"data.cache_dir={tmp_path / 'cache'}"]
    launch = warm_cli.start(command, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint" / "last.safetensors").exists():  # the job is training
        assert warm_cli.poll(launch) is None and time.monotonic() < deadline, warm_cli.wait(launch, timeout=10)
        time.sleep(0.05)
    tasks = submitit_tasks(sweep)
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends before the time limit (sbatch --signal=USR2@90)
    out = warm_cli.wait(launch, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    record = records.load_record(run_dir)
    assert record["status"] == "completed" and len(record["resumes"]) == 1
    assert record["resumes"][0]["step"] >= 3
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.err"))
    assert "Caught signal SIGUSR2" in logs  # submitit's handler ran after the checkpoint, and requeued


def test_one_job_of_two_tasks_is_one_ddp_run(tmp_path, warm_cli):
    """launcher=slurm_ddp's shape (tasks_per_node > 1) on submitit's local executor: the job's tasks
    take torch's rank and world size from submitit's environment and train one run together."""
    sweep = tmp_path / "sweep"
    command = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
               f"hydra.sweep.dir={sweep}", "experiment=smoke", "trainer.batch_size=4", f"data.cache_dir={tmp_path / 'cache'}"]
    out = warm_cli.run(command, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.parent.name for p in sweep.rglob(records.RECORD_FILE)] == ["0_lora_r8_s0"]
    record = records.load_record(sweep / "0_lora_r8_s0")
    assert record["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert record["config"]["trainer"]["world_size"] == 2 and record["measurements"]["world_size"] == 2


def test_one_job_of_two_tasks_is_one_fsdp_run(tmp_path, warm_cli):
    """launcher=slurm_fsdp's shape on submitit's local executor: the tasks shard one model between them."""
    sweep = tmp_path / "sweep"
    command = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
               f"hydra.sweep.dir={sweep}", "experiment=smoke", "trainer.batch_size=4", "trainer.strategy=fsdp",
               f"data.cache_dir={tmp_path / 'cache'}"]
    out = warm_cli.run(command, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.parent.name for p in sweep.rglob(records.RECORD_FILE)] == ["0_lora_r8_s0"]
    record = records.load_record(sweep / "0_lora_r8_s0")
    assert record["status"] == "completed"
    assert record["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": "fsdp"}
