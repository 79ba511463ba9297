"""ΔW derived from a run's trainable state and its base model (schema version 3) against ΔW stored
with W0 in delta_w.safetensors (version 2): the same ΔW, the same analysis, the same export."""
import shutil

import pytest
import torch
from conftest import compose_config

from lora_lab.analysis.subspace_report import main as report_main
from lora_lab.errors import ConfigError
from lora_lab.runtime import records
from lora_lab.runtime.rebuild import load_run_deltas, open_run_deltas
from lora_lab.trainer.train import run_training

SMOKE = ["experiment=smoke", "logger=disabled"]


def train_capturing_deltas(tmp_path, method: str, monkeypatch) -> tuple:
    """A run of the current format, and the ΔW (with W0) its model gave when the run ended: what a
    version 2 run stored in delta_w.safetensors."""
    captured = {}
    fingerprints = records.base_fingerprints

    def capture(deltas):
        captured.update(deltas)
        return fingerprints(deltas)

    monkeypatch.setattr(records, "base_fingerprints", capture)
    cfg = compose_config(*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", f"method={method}")
    run_dir = tmp_path / method
    run_training(cfg, run_dir)
    monkeypatch.setattr(records, "base_fingerprints", fingerprints)
    return run_dir, captured


def as_version_2(run_dir, deltas, to):
    """A copy of ``run_dir`` as a version 2 run writes it: ΔW and W0 in delta_w.safetensors."""
    shutil.copytree(run_dir, to)
    record = records.read_record(to / records.RECORD_FILE)
    records.save_delta_weights(to / records.DELTA_FILE, deltas)
    for key in ("delta_w", "base_sha256"):
        record.pop(key)
    record["schema_version"] = 2
    record["files"][records.DELTA_FILE] = {**record["files"][records.STATE_FILE],
                                           "sha256": records.file_sha256(to / records.DELTA_FILE)}
    records.write_json(to / records.RECORD_FILE, record)
    return to


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("derived")
    with pytest.MonkeyPatch.context() as monkeypatch:
        out = {}
        for method in ("lora", "full", "adapter"):
            run_dir, deltas = train_capturing_deltas(tmp_path, method, monkeypatch)
            out[method] = (run_dir, as_version_2(run_dir, deltas, tmp_path / f"{method}_v2"), deltas)
    return out


@pytest.mark.parametrize("method", ["lora", "full", "adapter"])
def test_derived_delta_w_equals_the_stored_one(runs, method):
    run_dir, old_dir, at_end = runs[method]
    assert not (run_dir / records.DELTA_FILE).exists()
    derived, stored = load_run_deltas(run_dir), load_run_deltas(old_dir)
    assert derived.keys() == stored.keys() == at_end.keys() and derived
    for name, d in derived.items():
        assert torch.allclose(d.to_dense(), stored[name].to_dense(), atol=1e-6, rtol=0)
        assert torch.equal(d.base, stored[name].base)  # W0 from the base model, as the old file held it
        assert (d.dense is None) is (stored[name].dense is None) and d.kind == stored[name].kind
    assert open_run_deltas(records.load_record(run_dir)).factored == records.open_delta_weights(
        records.load_record(old_dir)).factored


def report_tables(out) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): p.read_text() for p in sorted(out.rglob("*.csv"))}


def test_the_subspace_report_of_a_new_run_is_the_old_ones(runs, tmp_path):
    new = [str(runs[m][0]) for m in ("lora", "full")]
    old = [str(runs[m][1]) for m in ("lora", "full")]
    assert report_main([*new, "--out", str(tmp_path / "new"), "--no-progress"]) == 0
    assert report_main([*old, "--out", str(tmp_path / "old"), "--no-progress"]) == 0
    new_tables, old_tables = report_tables(tmp_path / "new"), report_tables(tmp_path / "old")
    assert new_tables and new_tables == old_tables


def test_the_peft_export_of_a_new_run_is_the_old_ones(runs, tmp_path):
    pytest.importorskip("peft")
    from lora_lab.peft.export import export_run

    run_dir, old_dir, _ = runs["lora"]
    new, old = export_run(run_dir, tmp_path / "new"), export_run(old_dir, tmp_path / "old")
    assert new.max_logit_difference is not None and new.max_logit_difference <= new.tolerance
    a, b = (records.load_file(str(e.out_dir / "adapter_model.safetensors")) for e in (new, old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_is_refused_against_another_base(runs, tmp_path, capsys):
    run_dir = shutil.copytree(runs["lora"][0], tmp_path / "run")
    record = records.read_record(run_dir / records.RECORD_FILE)
    record["config"]["seed"] += 1  # the tiny model is random: another seed, another W0
    records.write_json(run_dir / records.RECORD_FILE, record)
    with pytest.raises(ConfigError, match=r"^run=.*: was trained from another base .*W0 of .* differs") as error:
        load_run_deltas(run_dir)
    assert "\n" not in str(error.value)
    assert report_main([str(run_dir), "--out", str(tmp_path / "rep"), "--no-progress", "--analyses", "spectra"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-lab-subspace: error: run=") and "another base" in err and "\n" not in err


def test_a_record_without_fingerprints_is_refused(runs, tmp_path):
    run_dir = shutil.copytree(runs["lora"][0], tmp_path / "run")
    record = records.read_record(run_dir / records.RECORD_FILE)
    record.pop("base_sha256")
    records.write_json(run_dir / records.RECORD_FILE, record)
    with pytest.raises(ConfigError, match="base_sha256"):
        records.load_record(run_dir)


@pytest.mark.slow
def test_a_lora_run_on_7b_sized_matrices_keeps_its_state_not_the_model(tmp_path):
    """One Llama layer of 7B's sizes: each W0 LoRA adapts is 64 MB, the run keeps a few hundred kB."""
    cfg = compose_config(*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "method=lora", "model=tiny_llama",
                         "model.hidden_size=4096", "model.intermediate_size=11008", "model.num_heads=32",
                         "model.num_kv_heads=null", "model.num_layers=1", "data.max_train=8", "data.max_eval=8",
                         "data.max_length=8", "trainer.batch_size=8", "trainer.latency_repeats=1")
    run_dir = tmp_path / "run"
    record = run_training(cfg, run_dir)
    state_bytes = record["measurements"]["trainable_state_bytes"]
    assert state_bytes < 1_000_000 and record["delta_w_shapes"] == {
        f"model.layers.0.self_attn.{p}_proj": [4096, 4096] for p in ("q", "v")}
    kept = sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file() and p.name != "main.log")
    assert kept <= 1.1 * state_bytes + 1_000_000
    deltas = load_run_deltas(run_dir)
    assert all(d.B.shape == (4096, 8) and d.base.shape == (4096, 4096) for d in deltas.values())


def test_the_initial_state_rebuilt_is_where_training_started(tmp_path):
    """A run at a learning rate of 1e-12 barely moves (AdamW's steps are about the rate): its trained A is
    its initial one to 1e-9, which the rebuild with ``initial`` must give (the trainer's seed and order);
    at a real rate A moves away from it."""
    from lora_lab.runtime.rebuild import rebuild_trained

    for lr in (1e-12, 0.05):
        cfg = compose_config("experiment=smoke", "logger=disabled", f"data.cache_dir={tmp_path / 'cache'}",
                             "method=lora", f"trainer.lr={lr}", "seed=3")
        run_training(cfg, tmp_path / str(lr))
        start = dict(rebuild_trained(tmp_path / str(lr), initial=True).model.named_parameters())
        trained = dict(rebuild_trained(tmp_path / str(lr)).model.named_parameters())
        factors = [n for n in trained if "lora_A" in n]
        assert factors
        same = all(torch.allclose(start[n], trained[n], rtol=0, atol=1e-9) for n in factors)
        assert same == (lr < 1e-9)
