"""Reading run records and ΔW files: what the analysis tools accept (schema versions 1 and 2, runs that
did not complete) and what they refuse, with the file named in one line and exit status 2."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_lab.analysis import compare, tables
from lora_lab.analysis.subspace_report import main as report_main
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW
from lora_lab.runtime import records
from lora_lab.runtime.records import (
    DELTA_FILE,
    LAST_STATE_FILE,
    RECORD_FILE,
    STATE_FILE,
    load_delta_weights,
    load_record,
    save_delta_weights,
    save_tensors,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
LORA = {"name": "lora", "r": 2, "alpha": 8, "targets": ["q", "v"], "rslora": False, "init": "kaiming"}
MODULES = [f"bert.encoder.layer.{layer}.attention.self.{t}" for layer in range(2) for t in ("query", "value")]
D = 8


# ----------------------------------------------------------------------------------------------
# Records and ΔW built by hand, as the trainer writes them
# ----------------------------------------------------------------------------------------------
def row(epoch: int, val: float = .7, test: float = .68) -> dict:
    return {"epoch": epoch, "step": 10 * epoch, "train_loss": .5, "validation/accuracy": val, "test/accuracy": test}


def completed_record(method=None, seed=0, *, version=2, best=1, last=None, delta_shapes=None, val=.7) -> dict:
    """A completed record of schema ``version``; version 2 lists its files (ΔW when ``delta_shapes``)."""
    method = method or LORA
    last = last or best
    config = {"method": method, "seed": seed, "trainer": {"lr": 1e-3, "epochs": last},
              "data": {"name": "rotten_tomatoes", "subset": None}, "logger": {"mode": "disabled"}}
    record = {"status": "completed", "method": method["name"], "config": config,
              "epochs": [row(e, val) for e in range(1, last + 1)], "best": row(best, val), "last": row(last, val),
              "measurements": {"peak_memory_mb": 900.0, "train_samples_per_s": 20.0},
              "parameters": {"trainable": 100, "total": 10000, "trainable_percent": 1.0},
              "majority_class_test_accuracy": .5}
    if version == 1:
        return record
    files = {STATE_FILE: {"epoch": best, "holds": "best"}}
    if last != best:
        files[LAST_STATE_FILE] = {"epoch": last, "holds": "last"}
    if delta_shapes is not None:
        files[DELTA_FILE] = {"epoch": best, "holds": "best"}
        record["delta_w_shapes"] = delta_shapes
    return {"schema_version": version, **record, "files": files}


def stopped_record(status="failed", kind="exception", error="RuntimeError: boom", seed=0) -> dict:
    """A version 2 record of a run that did not complete."""
    return {"schema_version": 2, "status": status, "error": error, "error_kind": kind,
            "traceback": "Traceback ...\n", "config": completed_record(seed=seed)["config"]}


def lora_deltas(seed=0, d=D, r=2, names=MODULES) -> dict[str, DeltaW]:
    g = torch.Generator().manual_seed(seed)
    base = torch.Generator().manual_seed(0)
    return {name: DeltaW(B=torch.randn(d, r, generator=g), A=torch.randn(r, d, generator=g),
                         base=torch.randn(d, d, generator=base), kind="lora") for name in names}


def make_run(run_dir: Path, *, version=2, seed=0, best=1, last=2, deltas=None) -> Path:
    """A completed run directory with record.json and delta_w.safetensors (ΔW of the best epoch for
    version 2, of the last for version 1)."""
    deltas = lora_deltas(seed) if deltas is None else deltas
    save_delta_weights(run_dir / DELTA_FILE, deltas)
    write_json(run_dir / RECORD_FILE, completed_record(seed=seed, version=version, best=best, last=last,
                                                       delta_shapes=records.delta_shapes(deltas)))
    return run_dir


def edit_record(run_dir: Path, change) -> Path:
    record = json.loads((run_dir / RECORD_FILE).read_text())
    change(record)
    write_json(run_dir / RECORD_FILE, record)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Accepted
# ----------------------------------------------------------------------------------------------
def test_version_1_and_version_2_records_are_accepted(tmp_path):
    v1 = make_run(tmp_path / "v1", version=1)
    v2 = make_run(tmp_path / "v2", version=2, best=1, last=2)
    assert "schema_version" not in json.loads((v1 / RECORD_FILE).read_text())
    one, two = load_record(v1), load_record(v2)
    assert records.record_version(one) == 1 and records.record_version(two) == 2
    assert records.delta_epoch(one) == "last epoch" and records.delta_epoch(two) == "epoch 1 (best)"
    assert two["run_dir"] == str(v2)
    assert set(records.open_delta_weights(one).shapes) == set(MODULES)
    deltas = load_delta_weights(v2 / DELTA_FILE, two["delta_w_shapes"])
    assert torch.equal(deltas[MODULES[0]].A, lora_deltas(0)[MODULES[0]].A)


def test_every_status_the_trainer_writes_is_accepted(tmp_path):
    kinds = {"failed": "exception", "diverged": "diverged", "preempted": "preempted",
             "interrupted": "interrupted"}
    for status, kind in kinds.items():
        write_json(tmp_path / status / RECORD_FILE, stopped_record(status, kind))
        assert load_record(tmp_path / status, require_completed=False)["error_kind"] == kind
        with pytest.raises(ConfigError, match=f"did not complete \\(status '{status}'\\)"):
            load_record(tmp_path / status)
    # version 1: a failed record of the old trainer (no error_kind, multi-line error)
    write_json(tmp_path / "old" / RECORD_FILE, {"status": "failed", "error": "ValueError: x\ny", "config": {}})
    assert load_record(tmp_path / "old", require_completed=False)["status"] == "failed"


def test_the_tools_read_both_versions_side_by_side(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_run(sweep / "0_v1", version=1, seed=0)
    make_run(sweep / "1_v2", version=2, seed=1)
    assert tables.main([str(sweep), "--out", str(tmp_path / "table")]) == 0
    assert "| LoRA r=2 α=8 (q+v) |" in (tmp_path / "table" / "table.md").read_text()
    capsys.readouterr()
    assert compare.main([str(sweep)]) == 0
    assert capsys.readouterr().out.count("| LoRA r=2 α=8 (q+v) |") == 2


def test_the_subspace_report_says_which_epoch_each_delta_w_comes_from(tmp_path, capsys):
    v1 = make_run(tmp_path / "v1", version=1, seed=0)
    v2 = make_run(tmp_path / "v2", version=2, seed=1, best=3, last=5)
    out = tmp_path / "report"
    assert report_main([str(v1), str(v2), "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "| # | label | ΔW from | run directory |" in report
    assert f"| last epoch | {v1} |" in report and f"| epoch 3 (best) | {v2} |" in report


def test_runs_that_did_not_complete_are_listed_not_fatal(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_run(sweep / "0_ok", seed=0)
    write_json(sweep / "1_nan" / RECORD_FILE, stopped_record("diverged", "diverged",
                                                              "Diverged: training loss is nan at step 3", seed=1))
    write_json(sweep / "2_pre" / RECORD_FILE, stopped_record("preempted", "preempted", "Preempted: SIGTERM", seed=2))
    write_json(sweep / "3_oom" / RECORD_FILE, stopped_record("failed", "out_of_memory", "OutOfMemoryError: | x", 3))
    write_json(sweep / "4_old" / RECORD_FILE, {"status": "failed", "error": "ValueError: bad\nmore",
                                               "config": completed_record(seed=4)["config"]})

    assert compare.main([str(sweep)]) == 0
    table = capsys.readouterr().out
    assert "diverged: Diverged: training loss is nan at step 3" in table
    assert "preempted: Preempted: SIGTERM" in table and "failed: OutOfMemoryError: \\| x" in table
    assert "failed: ValueError: bad |" in table and "more" not in table

    assert tables.main([str(sweep), "--out", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t" / "table.md").read_text()
    assert "4 run(s) left out (1 diverged, 2 failed, 1 preempted; listed in the selection CSV)" in md
    cell = tables.build_table(tables.collect_runs([sweep], "accuracy", "best")).cells[
        ("LoRA r=2 α=8 (q+v)", "rotten_tomatoes")]
    assert (cell.seeds, cell.failed) == (1, 4)
    capsys.readouterr()


def test_a_stopped_run_without_the_tuned_key_does_not_stop_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep / "0_ok")
    write_json(sweep / "1_bad" / RECORD_FILE, dict(stopped_record("failed", "config"), config={"seed": 1}))
    t = tables.build_table(tables.collect_runs([sweep], "accuracy", "best"), tune=["trainer.lr"])
    assert t.cells[("LoRA r=2 α=8 (q+v)", "rotten_tomatoes")].seeds == 1


# ----------------------------------------------------------------------------------------------
# Refused records: each tool, the file named in one line, exit status 2
# ----------------------------------------------------------------------------------------------
def _truncate(run_dir):
    path = run_dir / RECORD_FILE
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _set(key, value):
    return lambda run_dir: edit_record(run_dir, lambda r: r.__setitem__(key, value))


def _drop(key):
    return lambda run_dir: edit_record(run_dir, lambda r: r.pop(key))


def _files_epoch(run_dir):
    edit_record(run_dir, lambda r: r["files"][DELTA_FILE].__setitem__("epoch", 2))


RECORD_CASES = {
    "truncated": (_truncate, "is not valid JSON"),
    "not_json": (lambda d: (d / RECORD_FILE).write_bytes(b"\x00\x01binary"), "is not valid JSON"),
    "not_utf8": (lambda d: (d / RECORD_FILE).write_bytes(b'{"status": "\xff"}'), "is not UTF-8"),
    "empty": (lambda d: (d / RECORD_FILE).write_text(""), "is not valid JSON"),
    "a_list": (lambda d: (d / RECORD_FILE).write_text("[1, 2]"), "holds a JSON list, not an object"),
    "unknown_version": (_set("schema_version", 4), "has schema_version 4; this lora_lab reads versions 1, 2, 3"),
    "version_as_text": (_set("schema_version", "2"), "has schema_version '2'"),
    "unknown_status": (_set("status", "done"), "has status 'done'"),
    "no_best_v2": (_drop("best"), "lacks best, which every completed record of schema version 2 has"),
    "no_files_v2": (_drop("files"), "lacks files"),
    "no_parameters_v1": (lambda d: edit_record(d, lambda r: (r.pop("schema_version"), r.pop("parameters"))),
                         "lacks parameters, which every completed record of schema version 1 has"),
    "best_not_a_row": (_set("best", {"validation/accuracy": .7}), "has a 'best' that is not an epoch's metrics"),
    "config_not_object": (_set("config", "lora"), "has a 'config' that is not an object"),
    "files_disagree": (_files_epoch, f"says {DELTA_FILE} holds the best epoch, 2, but its best epoch is 1"),
    "no_shapes": (_drop("delta_w_shapes"), f"lists {DELTA_FILE} without 'delta_w_shapes'"),
    "stopped_without_kind": (lambda d: write_json(d / RECORD_FILE, dict(stopped_record(), error_kind="oops")),
                             "has error_kind 'oops'"),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_load_record_refuses_naming_the_file(case, tmp_path):
    damage, message = RECORD_CASES[case]
    run_dir = make_run(tmp_path / "run")
    damage(run_dir)
    with pytest.raises(ConfigError) as error:
        load_record(run_dir, require_completed=False)
    text = str(error.value)
    assert text.startswith(f"record='{run_dir / RECORD_FILE}': ") and message in text and "\n" not in text


def _one_line_error(capsys, prog: str, path: Path, message: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(prog), err
    assert f"'{path}'" in err and message in err, err


@pytest.mark.parametrize("case", ["truncated", "not_json", "unknown_version", "no_best_v2", "no_parameters_v1",
                                  "stopped_without_kind"])
def test_every_tool_refuses_a_bad_record_in_a_sweep(case, tmp_path, capsys):
    damage, message = RECORD_CASES[case]
    sweep = tmp_path / "sweep"
    make_run(sweep / "0_ok", seed=0)
    bad = make_run(sweep / "1_bad", seed=1)
    damage(bad)
    record = bad / RECORD_FILE

    assert tables.main([str(sweep), "--out", str(tmp_path / "t")]) == 2
    _one_line_error(capsys, "lora-lab-table: error: record=", record, message)
    assert not (tmp_path / "t").exists()

    assert compare.main([str(sweep)]) == 2
    _one_line_error(capsys, "lora-lab-compare: error: record=", record, message)
    assert not (sweep / "comparison.md").exists()

    if case == "stopped_without_kind":  # the subspace report takes completed runs only
        return
    assert report_main([str(sweep / "0_ok"), str(bad), "--out", str(tmp_path / "rep"), "--no-progress"]) == 2
    _one_line_error(capsys, "lora-lab-subspace: error: record=", record, message)
    assert not (tmp_path / "rep" / "report.md").exists()


def test_the_multirun_callback_names_a_refused_record(tmp_path, capsys):
    from omegaconf import OmegaConf

    from lora_lab.cli.callbacks import ComparisonTable

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    ComparisonTable().on_multirun_end(config)  # no records (a dry run): nothing said
    assert capsys.readouterr() == ("", "")
    make_run(tmp_path / "sweep" / "0_ok")
    _truncate(make_run(tmp_path / "sweep" / "1_bad", seed=1))
    ComparisonTable().on_multirun_end(config)
    err = capsys.readouterr().err
    assert err.startswith("lora-lab: comparison not written: record=") and str(tmp_path / "sweep" / "1_bad") in err
    assert not (tmp_path / "sweep" / "comparison.md").exists()


def test_a_metric_of_the_wrong_type_is_refused_naming_the_record(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    bad = edit_record(make_run(sweep / "0"), lambda r: r["best"].__setitem__("test/accuracy", "0.7"))
    assert tables.main([str(sweep)]) == 2
    _one_line_error(capsys, "lora-lab-table: error: record=", bad / RECORD_FILE, "has a non-numeric '0.7' as test/accuracy")
    edit_record(bad, lambda r: r["best"].pop("test/accuracy"))
    assert compare.main([str(sweep)]) == 2
    _one_line_error(capsys, "lora-lab-compare: error: record=", bad / RECORD_FILE, "has no test/accuracy in 'best'")


# ----------------------------------------------------------------------------------------------
# Refused ΔW files
# ----------------------------------------------------------------------------------------------
def _cut(run_dir, keep=lambda n: n - 7):
    path = run_dir / DELTA_FILE
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


def _rewrite(tensors, metadata=None):
    """Replace the ΔW file by these tensors; the record lists the one module they are about."""
    def damage(run_dir):
        save_tensors(run_dir / DELTA_FILE, tensors, metadata=metadata)
        edit_record(run_dir, lambda r: r.__setitem__("delta_w_shapes", {_M: [D, D]}))
    return damage


def _with_shapes(shapes):
    return lambda run_dir: edit_record(run_dir, lambda r: r.__setitem__("delta_w_shapes", shapes))


_M = MODULES[0]
_OK = {f"{_M}::B": torch.ones(D, 2), f"{_M}::A": torch.ones(2, D)}
DELTA_CASES = {
    "truncated": (_cut, "cannot be read as safetensors"),
    "header_only": (lambda d: _cut(d, lambda n: 40), "cannot be read as safetensors"),
    "not_safetensors": (lambda d: (d / DELTA_FILE).write_bytes(b"PK\x03\x04 not a tensor file at all"),
                        "cannot be read as safetensors"),
    "shape_differs_from_record": (_with_shapes({m: [D, D + 1] for m in MODULES}),
                                  f"holds ΔW of shape ({D}, {D}) for {_M}; its record.json says ({D}, {D + 1})"),
    "module_missing": (_with_shapes({**{m: [D, D] for m in MODULES}, "bert.pooler.dense": [D, D]}),
                       "lacks ΔW of 1 module(s) its record.json lists, e.g. bert.pooler.dense"),
    "module_extra": (_with_shapes({m: [D, D] for m in MODULES[1:]}),
                     f"holds ΔW of 1 module(s) its record.json does not list, e.g. {_M}"),
    "factors_do_not_multiply": (_rewrite({f"{_M}::B": torch.ones(D, 2), f"{_M}::A": torch.ones(3, D)}),
                                f"holds factors of {_M} that do not multiply: B ({D}, 2), A (3, {D})"),
    "base_of_another_shape": (_rewrite({**_OK, f"{_M}::base": torch.ones(D, D + 1)}),
                              f"holds W0 of shape ({D}, {D + 1}) for {_M} but ΔW of shape ({D}, {D})"),
    "only_one_factor": (_rewrite({f"{_M}::B": torch.ones(D, 2)}), "holds neither a dense ΔW nor both factors"),
    "dense_and_factors": (_rewrite({**_OK, f"{_M}::dense": torch.ones(D, D)}), "holds both a dense ΔW and factors"),
    "foreign_tensor_name": (_rewrite({**_OK, "optimizer.state": torch.ones(3)}),
                            "holds a tensor named 'optimizer.state'"),
    "not_a_matrix": (_rewrite({**_OK, f"{_M}::base": torch.ones(D, D, 1)}), "ΔW parts are floating-point matrices"),
    "integer_tensor": (_rewrite({**_OK, f"{_M}::base": torch.ones(D, D, dtype=torch.int64)}),
                       "as a I64 tensor"),
    "bad_kinds": (_rewrite(_OK, {"kinds": "[1"}), "'kinds' entry in its metadata"),
    "non_finite": (_rewrite({f"{_M}::B": torch.full((D, 2), float("nan")), f"{_M}::A": torch.ones(2, D)}),
                   f"holds non-finite values in {_M}::B"),
}


@pytest.mark.parametrize("case", sorted(DELTA_CASES))
def test_a_bad_delta_w_file_is_refused_naming_it(case, tmp_path, capsys):
    damage, message = DELTA_CASES[case]
    good = make_run(tmp_path / "good", seed=0)
    bad = make_run(tmp_path / "bad", seed=1)
    damage(bad)
    assert report_main([str(good), str(bad), "--out", str(tmp_path / "rep"), "--no-progress"]) == 2
    _one_line_error(capsys, "lora-lab-subspace: error: delta_w=", bad / DELTA_FILE, message)
    assert not (tmp_path / "rep" / "report.md").exists()
    record = load_record(bad)
    with pytest.raises(ConfigError, match="^delta_w="):
        load_delta_weights(bad / DELTA_FILE, record["delta_w_shapes"])


def test_internal_checks_apply_to_version_1_files_too(tmp_path, capsys):
    v1 = make_run(tmp_path / "v1", version=1)
    _rewrite({f"{_M}::B": torch.ones(D, 2), f"{_M}::A": torch.ones(3, D)})(v1)
    assert report_main([str(v1), "--analyses", "spectra", "--out", str(tmp_path / "rep"), "--no-progress"]) == 2
    _one_line_error(capsys, "lora-lab-subspace: error: delta_w=", v1 / DELTA_FILE, "do not multiply")


def test_a_delta_w_file_the_record_does_not_list_is_refused(tmp_path, capsys):
    """Version 2: a ΔW beside a record that lists none is of an unknown epoch (e.g. left by an earlier run)."""
    run = make_run(tmp_path / "run")
    edit_record(run, lambda r: (r["files"].pop(DELTA_FILE), r.pop("delta_w_shapes")))
    assert report_main([str(run), "--analyses", "spectra", "--out", str(tmp_path / "rep"), "--no-progress"]) == 2
    _one_line_error(capsys, "lora-lab-subspace: error: record=", run / RECORD_FILE, f"does not list the {DELTA_FILE} beside it")
    (run / DELTA_FILE).unlink()
    assert report_main([str(run), "--analyses", "spectra", "--out", str(tmp_path / "rep"), "--no-progress"]) == 2
    assert f"has no {DELTA_FILE}" in capsys.readouterr().err


class _Marker:
    """Unpickling this would create a file: proof that a reader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_in_place_of_delta_w_is_refused_without_unpickling(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    marker = tmp_path / "unpickled"
    (run / DELTA_FILE).write_bytes(pickle.dumps({"m::B": _Marker(marker)}))
    torch.save({f"{_M}::B": torch.ones(D, 2)}, tmp_path / "torch_save.pt")
    assert report_main([str(run), "--analyses", "spectra", "--out", str(tmp_path / "rep"), "--no-progress"]) == 2
    assert "cannot be read as safetensors" in capsys.readouterr().err
    (run / DELTA_FILE).write_bytes((tmp_path / "torch_save.pt").read_bytes())  # torch.save: a zip of pickles
    with pytest.raises(ConfigError, match="cannot be read as safetensors"):
        load_delta_weights(run / DELTA_FILE)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# The command lines, as processes: exit status 2
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["tables", "compare", "subspace_report"])
def test_commands_exit_2_on_a_truncated_record(module, tmp_path):
    run = make_run(tmp_path / "sweep" / "0_run")
    _truncate(run)
    argv = [str(tmp_path / "sweep")] if module != "subspace_report" else [str(run), "--analyses", "spectra",
                                                                          "--out", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-m", f"lora_lab.analysis.{module}", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(run / RECORD_FILE) in proc.stderr


# ----------------------------------------------------------------------------------------------
# What the trainer writes
# ----------------------------------------------------------------------------------------------
def test_the_trainers_records_pass_every_check(tmp_path, capsys):
    """A two-epoch smoke run: its version 3 record, files and derived ΔW are accepted by every tool."""
    from test_train import smoke_cfg

    from lora_lab.runtime.rebuild import load_run_deltas
    from lora_lab.trainer.train import run_training

    run_dir = tmp_path / "sweep" / "0_run"
    run_training(smoke_cfg(tmp_path, "method=lora", "method.r=2", "trainer.epochs=2", "trainer.keep_last=true"), run_dir)
    record = load_record(run_dir)
    assert record["schema_version"] == records.SCHEMA_VERSION == 3
    assert record["files"][STATE_FILE] == {"epoch": record["best"]["epoch"], "holds": "best",
                                           "sha256": records.file_sha256(run_dir / STATE_FILE)}
    assert DELTA_FILE not in record["files"] and not (run_dir / DELTA_FILE).exists()
    assert (LAST_STATE_FILE in record["files"]) == (record["best"]["epoch"] != record["last"]["epoch"])
    deltas = load_run_deltas(run_dir)
    assert records.delta_shapes(deltas) == record["delta_w_shapes"]
    assert records.base_fingerprints(deltas) == record["base_sha256"]
    out = tmp_path / "rep"
    assert report_main([str(run_dir), "--analyses", "spectra", "--out", str(out), "--no-progress"]) == 0
    assert f"| epoch {record['best']['epoch']} (best) | {run_dir} |" in (out / "report.md").read_text()
    assert tables.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "t")]) == 0
    assert compare.main([str(tmp_path / "sweep")]) == 0
    capsys.readouterr()
