"""One run over several processes: torchrun with the gloo backend on this CPU machine.

The reference for a 2-process run with batch_size b is a 1-process run with batch_size 2b (the same
global batch). The tiny BERT runs without dropout, so the two differ only in the order in which the
gradients are summed: metrics must be equal and trained weights equal to 1e-5.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch, compose_config, method_cfg, tiny_bert
from safetensors.torch import load_file
from test_resume import DRIVER

from lora_lab.data.sampling import EpochBatches, EpochSampler
from lora_lab.methods import available_methods
from lora_lab.runtime import records
from lora_lab.runtime.distributed import Distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 57 examples: 7 full global batches of 8 and one of a single example, so rank 1 gets a stand-in
RUN = ["experiment=smoke", "logger=disabled", "model.dropout=0", "data.max_train=57", "trainer.epochs=2",
       "trainer.checkpoint_every=3", "trainer.throughput_warmup_steps=1"]


@pytest.mark.parametrize("size,batch_size,world", [(10, 2, 3), (57, 4, 2), (8, 4, 2), (5, 1, 4), (3, 2, 4)])
def test_ranks_share_each_global_batch_of_a_one_process_run(size, batch_size, world):
    single = list(EpochBatches(EpochSampler(size, seed=3), batch_size * world))
    ranks = [EpochBatches(EpochSampler(size, seed=3), batch_size, rank, world) for rank in range(world)]
    shares = [list(r) for r in ranks]
    assert all(len(s) == len(single) for s in shares)  # every rank takes part in every step
    for index, global_batch in enumerate(single):
        counted = [r.counted(index) for r in ranks]
        together = [i for rank, s in enumerate(shares) for i in s[index][:counted[rank]]]
        assert together == global_batch
        assert all(len(s[index]) == 1 for s, c in zip(shares, counted) if c == 0)  # a stand-in: one example


def test_resumed_epoch_skips_the_batches_already_seen():
    batches = EpochBatches(EpochSampler(57, seed=1), 4, rank=1, world_size=2)
    batches.set_epoch(2)
    whole = list(batches)
    batches.set_epoch(2, start=5)
    assert list(batches) == whole[5:] and len(batches) == len(whole) - 5


@pytest.fixture
def one_rank_group(tmp_path):
    """A real process group of one gloo rank, so DDP itself runs in this process."""
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_under_ddp_without_searching_for_unused_parameters(one_rank_group, method):
    from lora_lab.methods import build_method
    from lora_lab.trainer.setup import wrap_distributed


    model = tiny_bert()
    m = build_method(method_cfg(method))
    m.apply(model)
    ddp = wrap_distributed(model, m, Distributed(world_size=2, backend="gloo"), torch.device("cpu"))
    assert ddp.find_unused_parameters is m.needs_unused_parameter_search is False
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for seed in (1, 2, 3):  # DDP raises in the next step if a parameter got no gradient
        ddp(**batch(seed), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def torchrun(*args: str, cwd: Path, script: list[str] | None = None, check: bool = True):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    command = [*TORCHRUN, *(script or ["-m", "lora_lab.cli.main"]), *args]
    out = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / records.STATE_FILE))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    torchrun(*RUN, "trainer.batch_size=4", f"data.cache_dir={root / 'cache'}", f"hydra.run.dir={root / 'run'}",
             cwd=root)
    return root


def test_two_processes_match_one_with_the_same_global_batch(two_process_run, tmp_path):
    from lora_lab.trainer.train import run_training

    run_dir = two_process_run / "run"
    ddp = records.load_record(run_dir)
    cfg = compose_config(*RUN, "trainer.batch_size=8", f"data.cache_dir={two_process_run / 'cache'}")
    single = run_training(cfg, tmp_path / "single")
    assert ddp["data_sizes"]["train"] % 8 == 1  # the last global batch: one example, a stand-in on rank 1
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo"} and ddp["config"]["trainer"]["world_size"] == 2
    for a, b in zip(ddp["epochs"], single["epochs"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    mine, theirs = state(run_dir), state(tmp_path / "single")
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=0, msg=name)


def test_one_record_one_hydra_folder_and_aggregated_measurements(two_process_run):
    run_dir = two_process_run / "run"
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix == ".json") == [records.RECORD_FILE]
    assert not (run_dir / "checkpoint").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    assert len(list(two_process_run.rglob(records.RECORD_FILE))) == 1
    m = records.load_record(run_dir)["measurements"]
    assert m["world_size"] == 2 and len(m["train_samples_per_s_per_rank"]) == 2
    assert m["train_samples_per_s"] == pytest.approx(sum(m["train_samples_per_s_per_rank"]))
    assert len(m["peak_memory_mb_per_rank"]) == 2 and m["peak_memory_mb"] == max(m["peak_memory_mb_per_rank"])


def test_killed_torchrun_resumes_to_the_same_result(two_process_run, tmp_path):
    args = [*RUN, "trainer.batch_size=4", f"data.cache_dir={two_process_run / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    killed = torchrun(*args, cwd=tmp_path, script=[DRIVER, "step", "5"], check=False)  # in step 5 of 16
    assert killed.returncode != 0 and (tmp_path / "run" / "checkpoint" / "last.safetensors").exists()
    torchrun(*args, cwd=tmp_path)
    resumed, reference = records.load_record(tmp_path / "run"), records.load_record(two_process_run / "run")
    assert resumed["resumes"] == [{"step": 3, "epoch": 1}]
    assert resumed["epochs"] == reference["epochs"]
    mine, theirs = state(tmp_path / "run"), state(two_process_run / "run")
    assert all(mine[k].equal(theirs[k]) for k in theirs)


def test_world_size_is_not_an_override():
    from lora_lab.config.validate import check_config
    from lora_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.world_size=2: is the number of processes torchrun started"):
        check_config(compose_config(*RUN, "trainer.world_size=2"))
