"""``trainer.strategy=fsdp``: the model sharded over two torchrun processes (gloo on this CPU machine).

As for DDP (tests/test_distributed.py), the reference for 2 processes with batch_size b is 1 process
with batch_size 2b; without dropout the two differ only in the order in which gradients are summed,
so metrics and trained weights must agree to 1e-5. A sharded run killed mid-run resumes from its
checkpoint (each rank's shards in its own file, named by rank 0's header) to the same result, bit for bit. Every other method trains sharded
to the same result too (one torchrun launch, a Hydra multirun), and a sharded LoRA run exports and is
analysed as its one-process twin.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import batch, compose_config, method_cfg, tiny_bert
from test_distributed import state, torchrun
from test_resume import DRIVER

from lora_lab.runtime import records

# 57 examples: the last global batch of 8 has one example, so rank 1 takes part with a stand-in
BASE = ["experiment=smoke", "logger=disabled", "model.dropout=0", "data.max_train=57", "trainer.epochs=2",
        "trainer.checkpoint_every=3", "trainer.throughput_warmup_steps=1"]
FSDP = ["trainer.strategy=fsdp"]
# (model, method, per-rank batch, grad_accum, more settings): LoRA and full fine-tuning on an encoder and a
# decoder; one with gradient accumulation and gradient checkpointing; LoRA on a bf16 base
CASES = {"bert-lora": ("tiny", "lora", 4, 1, []), "bert-full": ("tiny", "full", 4, 1, []),
         "llama-lora": ("tiny_llama", "lora", 4, 1, []),
         "llama-full-accum-checkpointing": ("tiny_llama", "full", 2, 2, ["trainer.gradient_checkpointing=true"]),
         "llama-lora-bf16-base": ("tiny_llama", "lora", 4, 1, ["model.dtype=bf16"])}
# bf16 matrix products round differently for a batch of 4 and one of 8, and Adam's normalised steps carry
# that into the weights (up to ~1e-3 here): a bf16 base is compared with DDP on the same two ranks instead
AGAINST_DDP = {"llama-lora-bf16-base"}


def overrides(case: str, world: int, cache: Path) -> list[str]:
    model, method, batch_size, accum, more = CASES[case]
    return [*BASE, f"model={model}", f"method={method}", f"trainer.batch_size={batch_size * 2 // world}",
            f"trainer.grad_accum={accum}", f"data.cache_dir={cache}", *more]


@pytest.fixture(scope="module")
def sharded_lora(tmp_path_factory):
    """The BERT LoRA run under fsdp on 2 processes, shared by the equality and the resume test."""
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(*overrides("bert-lora", 2, root / "cache"), *FSDP, f"hydra.run.dir={root / 'run'}", cwd=root)
    return root


def assert_same_training(sharded_dir: Path, single: dict, single_dir: Path) -> None:
    sharded = records.load_record(sharded_dir)
    assert sharded["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": "fsdp"}
    assert sharded["parameters"] == single["parameters"]  # counted whole, not per shard
    for a, b in zip(sharded["epochs"], single["epochs"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    mine, theirs = state(sharded_dir), state(single_dir)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=0, msg=name)
    assert sharded["delta_w_shapes"] == single["delta_w_shapes"] and sharded["base_sha256"] == single["base_sha256"]


def single_process(case: str, cache: Path, run_dir: Path) -> dict:
    from lora_lab.trainer.train import run_training

    return run_training(compose_config(*overrides(case, 1, cache)), run_dir)


@pytest.fixture(scope="module")
def single_lora(sharded_lora):
    """The one-process reference of ``sharded_lora`` (twice the batch), in its folder: (record, run dir)."""
    return single_process("bert-lora", sharded_lora / "cache", sharded_lora / "single"), sharded_lora / "single"


def test_bert_lora_on_two_shards_matches_one_process(sharded_lora, single_lora):
    assert_same_training(sharded_lora / "run", *single_lora)
    assert not (sharded_lora / "run" / "checkpoint").exists()
    assert records.load_record(sharded_lora / "run")["measurements"]["inference_merged_ms"] > 0


@pytest.mark.parametrize("case", ["bert-full", "llama-lora", "llama-full-accum-checkpointing", "llama-lora-bf16-base"])
def test_two_shards_match_one_process(case, tmp_path):
    cache = tmp_path / "cache"
    torchrun(*overrides(case, 2, cache), *FSDP, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    if case in AGAINST_DDP:
        torchrun(*overrides(case, 2, cache), f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
        single = records.load_record(tmp_path / "single")
        assert single["distributed"] == {"world_size": 2, "backend": "gloo"}
    else:
        single = single_process(case, cache, tmp_path / "single")
    assert_same_training(tmp_path / "run", single, tmp_path / "single")


def test_a_sharded_lora_run_exports_and_reports_as_one_process(sharded_lora, single_lora, tmp_path, capsys):
    """lora-lab-export and lora-lab-subspace read an fsdp run's record and gathered state as any other."""
    import csv
    import json

    pytest.importorskip("peft")
    from lora_lab.analysis.subspace_report import main as subspace
    from lora_lab.peft.export import WRITTEN
    from lora_lab.peft.export import main as export

    adapters = {}
    for name, run_dir in (("sharded", sharded_lora / "run"), ("single", single_lora[1])):
        assert export([str(run_dir), str(tmp_path / name)]) == 0  # loads back into PEFT with the run's logits
        assert sorted(p.name for p in (tmp_path / name).iterdir() if not p.name.startswith(".")) == sorted(WRITTEN)
        adapters[name] = records.load_file(str(tmp_path / name / "adapter_model.safetensors"))
    assert "PEFT's logits differ from the run's by at most" in capsys.readouterr().out
    configs = [json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in adapters]
    assert configs[0] == configs[1]
    mine, theirs = adapters["sharded"], adapters["single"]
    assert mine.keys() == theirs.keys() and any("lora_A" in k for k in mine)
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-5, rtol=0, msg=key)
    out = tmp_path / "report"
    assert subspace([str(sharded_lora / "run"), str(single_lora[1]), "--out", str(out), "--no-progress"]) == 0
    assert f"| {sharded_lora / 'run'} |" in (out / "report.md").read_text() and (out / "table7.md").exists()
    with open(out / "phi_summary.csv") as f:  # the sharded run's ΔW spans the one-process run's subspace
        assert all(float(row["phi_full"]) == pytest.approx(1, abs=1e-6) for row in csv.DictReader(f))


# every other method, by its conf/arm preset: bottleneck adapters, DoRA, (IA)³, BitFit, prefix and prompt
# tuning, and the PEFT bridge (VeRA); all in one torchrun launch, as one Hydra multirun
EVERY_METHOD = {"houlsby": "adapter", "dora": "dora", "ia3": "ia3", "bitfit": "bitfit", "prefix": "prefix",
                "prompt": "prompt", "vera": "peft"}


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """``torchrun ... -m arm=houlsby,dora,...`` under fsdp: the multirun's jobs share one process group."""
    root = tmp_path_factory.mktemp("fsdp-methods")
    out = torchrun("-m", *BASE, "model=tiny", "trainer.batch_size=4", f"data.cache_dir={root / 'cache'}", *FSDP,
                   f"hydra.sweep.dir={root / 'sweep'}", f"arm={','.join(EVERY_METHOD)}", cwd=root)
    assert out.stdout.count("runs and comparison.md in") == 1  # rank 0 alone writes and prints the comparison
    return root


def test_every_method_on_two_shards_matches_one_process(every_method, tmp_path):
    from lora_lab.trainer.train import run_training

    runs = records.find_run_dirs(every_method / "sweep")  # 0_adapter_houlsby_s0, 1_dora_r8_s0, ...
    assert [int(run.name.split("_")[0]) for run in runs] == list(range(len(EVERY_METHOD)))
    assert (every_method / "sweep" / "comparison.md").exists()
    for run_dir, (arm, method) in zip(runs, EVERY_METHOD.items(), strict=True):
        record = records.load_record(run_dir)
        assert record["status"] == "completed" and record["config"]["method"]["name"] == method, arm
        assert record["config"]["trainer"]["strategy"] == "fsdp"
        single = run_training(compose_config(*BASE, "model=tiny", f"arm={arm}", "trainer.batch_size=8",
                                             f"data.cache_dir={every_method / 'cache'}"), tmp_path / arm)
        assert_same_training(run_dir, single, tmp_path / arm)


@pytest.fixture
def one_rank_group(tmp_path):
    """A real process group of one gloo rank, so FSDP itself runs in this process."""
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch_dist.destroy_process_group()


def test_sharded_parameters_are_read_and_written_whole(one_rank_group):
    from torch.distributed.tensor import DTensor

    from lora_lab.methods import build_method
    from lora_lab.models.architectures import layer_stack
    from lora_lab.runtime import checkpoint, sharding

    model = tiny_bert()
    build_method(method_cfg("lora")).apply(model)
    shell = sharding.meta_copy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sharding.shard_model(model, layer_stack(model)[1], 1, torch.device("cpu"), "bf16")
    assert sharding.is_sharded(model) and all(isinstance(p, DTensor) for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    model.train()
    model(**batch(1), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    assert isinstance(torch.nn.utils.clip_grad_norm_(trainable, 0.1), DTensor)  # clipping works on DTensor grads
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(**batch(2)).logits  # a forward pass may leave the root's parameters unsharded
    saved = {n: t.clone() for n, t in checkpoint.trainable_state(model).items()}  # gathered whole
    assert saved.keys() == before.keys() and not any(isinstance(t, DTensor) for t in saved.values())
    checkpoint.load_trainable_state(model, before)
    assert all(checkpoint.trainable_state(model)[n].equal(before[n]) for n in before)
    checkpoint.load_trainable_state(model, saved)
    assert all(checkpoint.trainable_state(model)[n].equal(saved[n]) for n in saved)
    whole = sharding.materialise(model, shell, torch.device("cpu"), keep=True)
    assert not sharding.is_sharded(whole) and not any(isinstance(p, DTensor) for p in whole.parameters())
    with torch.no_grad():
        torch.testing.assert_close(whole(**batch(2)).logits, expected.full_tensor() if isinstance(expected, DTensor)
                                   else expected, atol=1e-6, rtol=0)


def _sharded_lora_step():
    """A LoRA model sharded over the one-rank group after one optimiser step, with its optimiser."""
    from lora_lab.methods import build_method
    from lora_lab.models.architectures import layer_stack
    from lora_lab.runtime import sharding

    model = tiny_bert()
    build_method(method_cfg("lora")).apply(model)
    sharding.shard_model(model, layer_stack(model)[1], 1, torch.device("cpu"), "fp32")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch(1), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    optimizer.step()
    return model, optimizer


def _whole(tensors: dict) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in tensors.items()}


def test_a_sharded_checkpoint_is_every_rank_s_files_named_by_its_header(one_rank_group, tmp_path):
    from lora_lab.errors import ConfigError
    from lora_lab.runtime import checkpoint
    from lora_lab.runtime.distributed import Distributed

    model, optimizer = _sharded_lora_step()
    tmp_path = tmp_path / "checkpoint"
    tmp_path.mkdir()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    params = _whole(checkpoint.snapshot(model))
    moments = {i: _whole(optimizer.state_dict()["state"][i]) for i in optimizer.state_dict()["state"]}
    (tmp_path / "shards-killed").mkdir()  # what a kill during a write leaves: named by no checkpoint
    shards = checkpoint.write_shards(tmp_path, model, optimizer, Distributed())
    path = checkpoint.save(tmp_path, model, optimizer, scheduler, {"c": 1}, {"step": 1}, {}, shards=shards)
    checkpoint.drop_stale_shards(tmp_path, shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, shards["dir"]])
    saved = checkpoint.load(tmp_path)
    assert not saved.group("model") and not saved.group("optimizer")  # the header holds no model state
    files = sorted((tmp_path / shards["dir"]).iterdir())
    assert [f.suffix for f in files] == [".safetensors"] and set(shards["files"]) == {f.name for f in files}

    with torch.no_grad():  # lose everything, then restore it from the files
        for p in model.parameters():
            if p.requires_grad:
                p.to_local().zero_()
    for entry in optimizer.state.values():
        entry["exp_avg"].to_local().zero_()
    checkpoint.restore(saved, model, optimizer, scheduler, Distributed())
    assert all(v.equal(params[k]) for k, v in _whole(checkpoint.snapshot(model)).items())
    restored = optimizer.state_dict()["state"]
    assert all(_whole(restored[i])[key].equal(value) for i in moments for key, value in moments[i].items())

    best = checkpoint.snapshot(model)  # the best epoch: a folder of shards, read back into shards
    checkpoint.save_best(tmp_path, best, {"epoch": 1, "step": 1}, Distributed())
    assert checkpoint.best_folder(tmp_path, 1).is_dir()
    path = checkpoint.save(tmp_path, model, optimizer, scheduler, {"c": 1}, {"step": 1, "best": {"step": 1}}, {},
                           shards=shards)
    again = checkpoint.load_best(tmp_path, checkpoint.load(tmp_path), model, Distributed())
    assert all(_whole(again)[k].equal(v) for k, v in _whole(best).items())

    shard = files[0]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\1")  # a torn or changed file is refused in one line
    with pytest.raises(ConfigError, match="does not have the SHA-256 the checkpoint .* lists") as caught:
        checkpoint.restore(checkpoint.load(tmp_path), model, optimizer, scheduler, Distributed())
    assert str(shard) in str(caught.value) and "\n" not in str(caught.value)


def _assert_each_rank_wrote_its_rows(folder: Path) -> None:
    """The checkpoint's header names one shards folder, in which each rank's file holds its rows of every
    trainable parameter and of its Adam moments, together all of them."""
    from safetensors import safe_open

    from lora_lab.runtime import checkpoint, sharded_checkpoint

    saved = checkpoint.load(folder)
    shards = saved.meta["shards"]
    assert not saved.group("model") and [p.name for p in folder.glob("shards-*")] == [shards["dir"]]
    files = sorted((folder / shards["dir"]).iterdir())
    assert [f.name[:12] for f in files] == ["shard-00001-", "shard-00002-"]
    rows: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if shape:  # not a scalar (Adam's step: written once)
                    rows.setdefault(key, []).append(shape[0])
    stored = sharded_checkpoint.stored_shapes(folder / shards["dir"])
    tensors = [k for k in rows if k.startswith("model/") or k.endswith(("/exp_avg", "/exp_avg_sq"))]
    assert any(k.endswith("/exp_avg") for k in tensors)
    for key in tensors:
        assert len(rows[key]) == 2 and sum(rows[key]) == stored[key][0][0], key
    # a standard DCP checkpoint: read whole in this one process, each tensor is the two ranks' rows in order
    whole = {key: torch.zeros(stored[key][0], dtype=stored[key][1]) for key in tensors}
    sharded_checkpoint.read(folder / shards["dir"], whole)
    for key in tensors:
        parts = []
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                parts.append(f.get_tensor(key))
        assert whole[key].equal(torch.cat(parts)), key


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the files are read in this one process
def test_killed_sharded_run_resumes_to_the_same_result(sharded_lora, tmp_path):
    args = [*overrides("bert-lora", 2, sharded_lora / "cache"), *FSDP, f"hydra.run.dir={tmp_path / 'run'}"]
    killed = torchrun(*args, cwd=tmp_path, script=[DRIVER, "step", "11"], check=False)  # in step 11 of 16
    assert killed.returncode != 0 and (tmp_path / "run" / "checkpoint" / "last.safetensors").exists()
    _assert_each_rank_wrote_its_rows(tmp_path / "run" / "checkpoint")
    assert (tmp_path / "run" / "checkpoint" / "best-step8").is_dir()  # the best epoch's shards, resumed too
    torchrun(*args, cwd=tmp_path)
    resumed, reference = records.load_record(tmp_path / "run"), records.load_record(sharded_lora / "run")
    assert resumed["resumes"] == [{"step": 9, "epoch": 2}]
    assert resumed["epochs"] == reference["epochs"]
    mine, theirs = state(tmp_path / "run"), state(sharded_lora / "run")
    assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in theirs)


@pytest.mark.parametrize("extra,problem", [
    ([], "trainer.strategy='fsdp': needs several processes: start it with torchrun --nproc_per_node=N"),
    (["model.load_in_4bit=true"], "trainer.strategy='fsdp': cannot shard a 4-bit base"),
    (["trainer.generation.enabled=true"], "trainer.strategy='fsdp': does not generate yet"),
])
def test_bad_fsdp_settings_are_one_line(monkeypatch, extra, problem):
    from lora_lab.config.validate import _check_trainer
    from lora_lab.errors import ConfigError

    if extra:  # as under torchrun: the 4-bit and generation checks come after the process count
        monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_config(*BASE, *FSDP, *extra)
    with pytest.raises(ConfigError) as caught:
        _check_trainer(cfg)
    assert str(caught.value).startswith(problem) and "\n" not in str(caught.value)


def test_unknown_strategy_is_one_line():
    from lora_lab.config.validate import check_config
    from lora_lab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^trainer.strategy='zero3': ") as caught:
        check_config(compose_config(*BASE, "trainer.strategy=zero3"))
    assert "\n" not in str(caught.value)


def test_the_default_strategy_keeps_a_run_s_identity():
    from omegaconf import OmegaConf

    from lora_lab.config.run_identity import run_hash

    ddp = OmegaConf.to_container(compose_config(*BASE), resolve=True)
    assert ddp["trainer"]["strategy"] == "ddp"
    before = {**ddp, "trainer": {k: v for k, v in ddp["trainer"].items() if k != "strategy"}}
    assert run_hash(ddp) == run_hash(before)
    fsdp = OmegaConf.to_container(compose_config(*BASE, *FSDP), resolve=True)
    assert run_hash(fsdp) != run_hash(ddp)
