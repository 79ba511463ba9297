"""The paper-table builder on hand-made run records: medians, tuning on validation, formats."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest

from lora_lab.analysis import tables
from lora_lab.analysis.tables import build_table, collect_runs, record_from_wandb, to_csv, to_latex, to_markdown
from lora_lab.runtime.records import write_json

LORA = {"name": "lora", "r": 8, "alpha": 8, "targets": ["q", "v"], "rslora": False, "init": "kaiming"}
FULL = {"name": "full"}


def record(method, seed, val, test, *, lr=1e-3, task="rotten_tomatoes", last=None, trainable=1000,
           total=100000, status="completed", memory=1000.0, speed=20.0):
    config = {"method": method, "seed": seed, "trainer": {"lr": lr, "epochs": 2, "threads": None},
              "data": {"name": task, "subset": None}, "logger": {"mode": "disabled"}}
    if status != "completed":
        return {"status": status, "config": config, "error": "FloatingPointError: training loss is nan"}
    best = {"epoch": 1, "validation/accuracy": val, "test/accuracy": test}
    last_val, last_test = last or (val, test)
    return {"status": "completed", "config": config, "best": best,
            "last": {"epoch": 2, "validation/accuracy": last_val, "test/accuracy": last_test},
            "parameters": {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total},
            "measurements": {"peak_memory_mb": memory, "train_samples_per_s": speed}}


def write_runs(root, records):
    for i, rec in enumerate(records):
        write_json(root / f"{i}_job" / "record.json", rec)
    return root


def table_from(tmp_path, records, **kwargs):
    runs = collect_runs([write_runs(tmp_path / "sweep", records)], kwargs.pop("metric", "accuracy"),
                        kwargs.get("epoch", "best"))
    return build_table(runs, **kwargs)


def test_median_over_seeds_and_percent_of_total(tmp_path):
    t = table_from(tmp_path, [record(LORA, 0, .70, .60), record(LORA, 1, .71, .90), record(LORA, 2, .72, .65),
                              record(FULL, 0, .80, .80, trainable=100000)])
    lora = "LoRA r=8 α=8 (q+v)"
    assert t.rows == ["Full FT", lora]  # family order, not file order
    assert t.cells[(lora, "rotten_tomatoes")].value == pytest.approx(.65)  # median, not mean (.7167)
    assert t.cells[(lora, "rotten_tomatoes")].seeds == 3
    md = to_markdown(t)
    assert f"| {lora} | 1.0K | 1.00 | 65.0 |" in md and "| Full FT | 100.0K | 100.00 | **80.0** |" in md


def test_mean_std_option(tmp_path):
    t = table_from(tmp_path, [record(LORA, s, .7, v) for s, v in enumerate((.60, .70, .80))], agg="mean_std")
    cell = t.cells[("LoRA r=8 α=8 (q+v)", "rotten_tomatoes")]
    assert cell.value == pytest.approx(.70) and cell.spread == pytest.approx(.10)
    assert "70.0 ± 10.0" in to_markdown(t)


def test_best_vs_last_epoch(tmp_path):
    runs = [record(LORA, s, .7, .70, last=(.6, .50)) for s in range(3)]
    best = table_from(tmp_path / "a", runs, epoch="best")
    last = table_from(tmp_path / "b", runs, epoch="last")
    key = ("LoRA r=8 α=8 (q+v)", "rotten_tomatoes")
    assert best.cells[key].value == pytest.approx(.70) and last.cells[key].value == pytest.approx(.50)
    assert "last epoch" in to_markdown(last)


def test_tuning_picks_lr_on_validation_and_reports_test(tmp_path):
    runs = []
    for seed in range(3):
        runs.append(record(LORA, seed, .60, .95, lr=1e-4))   # best test, worse validation: must not win
        runs.append(record(LORA, seed, .75, .70, lr=1e-3))
        runs.append(record(LORA, seed, 0, 0, lr=1e-2, status="failed"))
    t = table_from(tmp_path, runs, tune=["trainer.lr"])
    cell = t.cells[("LoRA r=8 α=8 (q+v)", "rotten_tomatoes")]
    assert cell.chosen == {"trainer.lr": 1e-3} and cell.value == pytest.approx(.70)
    chosen = [e for e in t.selection if e.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["trainer.lr"] == 1e-3
    failed = [e for e in t.selection if e["trainer.lr"] == 1e-2][0]
    assert failed["failed"] == 3 and failed["seeds"] == 0
    assert "chosen trainer.lr" in to_markdown(t) and "| 0.001 |" in to_markdown(t)


def test_runs_differing_in_an_untuned_key_are_an_error_naming_both_or_rows_of_their_own(tmp_path, capsys):
    runs = [record(LORA, 0, .7, .7, lr=1e-4), record(LORA, 1, .7, .6, lr=1e-3)]
    with pytest.raises(tables.TableError, match="differ in trainer.lr.*pass --by trainer.lr .*--tune trainer.lr"):
        table_from(tmp_path / "a", runs)
    sweep = write_runs(tmp_path / "b", runs)
    assert tables.main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err == (f"lora-lab-table: error: the runs of 'LoRA r=8 α=8 (q+v)' differ in trainer.lr: 0.0001 in "
                   f"{sweep / '0_job'}, 0.001 in {sweep / '1_job'}; pass --by trainer.lr to show them as rows of "
                   "their own, or --tune trainer.lr to choose it on validation\n")
    t = table_from(tmp_path / "c", runs, by=["trainer.lr"])
    assert t.rows == ["LoRA r=8 α=8 (q+v), lr=0.0001", "LoRA r=8 α=8 (q+v), lr=0.001"]
    assert t.cells[("LoRA r=8 α=8 (q+v), lr=0.001", "rotten_tomatoes")].value == pytest.approx(.6)
    with pytest.raises(tables.TableError, match="--by trainer.nope: is not a key"):
        table_from(tmp_path / "d", runs, by=["trainer.nope"])


def test_runs_of_one_method_on_other_models_or_data_are_rows_labelled_with_them(tmp_path):
    def on(model, max_eval, seed):
        rec = record(LORA, seed, .7, .5 + seed / 10)
        rec["config"]["model"] = {"name": model, "hidden_size": 32 if model == "tiny" else 768}
        rec["config"]["data"]["max_eval"] = max_eval
        return rec

    t = table_from(tmp_path / "a", [on("tiny", 32, 0), on("tiny", 32, 1), on("tiny", 64, 2), on("bert", 64, 3)])
    assert t.rows == ["LoRA r=8 α=8 (q+v), bert, max_eval=64", "LoRA r=8 α=8 (q+v), tiny, max_eval=32",
                      "LoRA r=8 α=8 (q+v), tiny, max_eval=64"]
    assert t.cells[("LoRA r=8 α=8 (q+v), tiny, max_eval=32", "rotten_tomatoes")].seeds == 2
    assert "| LoRA r=8 α=8 (q+v), tiny, max_eval=32 |" in to_markdown(t)
    same = table_from(tmp_path / "b", [on("tiny", 32, 0), on("tiny", 32, 1)])
    assert same.rows == ["LoRA r=8 α=8 (q+v)"]  # nothing differs: the label stays short


def test_compare_and_table_of_tiny_runs_name_their_run_folders(tmp_path, capsys):
    """Two real runs on the tiny model that differ in data.max_eval: the comparison lists each run's
    folder and writes no file unless asked; the table gives them rows of their own."""
    from test_train import smoke_cfg

    from lora_lab.analysis import compare
    from lora_lab.trainer.train import run_training

    sweep = tmp_path / "sweep"
    run_training(smoke_cfg(tmp_path, "method=lora", "data.max_eval=16"), sweep / "0_lora_r8_s0")
    run_training(smoke_cfg(tmp_path, "method=lora", "data.max_eval=32"), sweep / "1_lora_r8_s0")
    capsys.readouterr()  # what training printed
    assert compare.main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    header, _, *rows = out.strip().splitlines()[:4]
    assert header.startswith("| method | seed |") and "| epoch | run |" in header
    assert [r.split(" | ")[-1].rstrip(" |") for r in rows] == ["0_lora_r8_s0", "1_lora_r8_s0"]
    assert err == "" and not (sweep / "comparison.md").exists()
    assert compare.main([str(sweep), "--out", str(tmp_path / "cmp.md")]) == 0
    out, err = capsys.readouterr()
    assert err == f"lora-lab-compare: written to {tmp_path / 'cmp.md'}\n"
    assert (tmp_path / "cmp.md").read_text().strip() == out.strip()

    assert tables.main([str(sweep), "--out", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| LoRA r=8 α=8 (q+v), max_eval=16 |" in md and "| LoRA r=8 α=8 (q+v), max_eval=32 |" in md


@pytest.mark.parametrize("tool", ["compare", "tables"])
def test_help_examples_run_as_written(tool, tmp_path, monkeypatch, capsys):
    """Every example of --help but W&B's, on a sweep at outputs/multirun/<hash> and single runs in
    outputs/runs, runs and exits 0."""
    import shlex

    from lora_lab.analysis import compare

    main = {"compare": compare.main, "tables": tables.main}[tool]
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    command = {"compare": "lora-lab-compare", "tables": "lora-lab-table"}[tool]
    assert f"usage: {command} " in text
    examples = [line.strip() for line in text.splitlines() if line.strip().startswith(command + " ")]
    assert len(examples) >= 3
    monkeypatch.chdir(tmp_path)
    write_runs(tmp_path / "outputs" / "multirun" / "7c01e2aa",
               [record(m, s, .7, .6 + s / 10) for m in (LORA, FULL) for s in range(3)])
    write_runs(tmp_path / "outputs" / "runs", [record(LORA, 5, .7, .7)])
    for example in examples:
        if "--wandb" in example:
            continue
        args = shlex.split(example.replace("<hash>", "7c01e2aa"), comments=True)[1:]
        assert main(args) == 0, (example, capsys.readouterr().err)


def test_several_tasks_give_an_average_column(tmp_path):
    t = table_from(tmp_path, [record(LORA, 0, .7, .80, task="sst2"), record(LORA, 0, .7, .60, task="mrpc"),
                              record(FULL, 0, .7, .90, task="sst2")])
    assert t.tasks == ["mrpc", "sst2"]
    assert t.average("LoRA r=8 α=8 (q+v)") == pytest.approx(.70)
    assert math.isnan(t.average("Full FT"))  # a missing task is not averaged as if it were there
    header = to_markdown(t).splitlines()[0]
    assert header.startswith("| Method | Trainable params | % of total | mrpc | sst2 | Avg. |")


def test_latex_is_booktabs_and_escaped(tmp_path):
    t = table_from(tmp_path, [record(LORA, 0, .7, .7), record(FULL, 0, .8, .8)])
    tex = to_latex(t)
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1
    body = tex[tex.index(r"\midrule"):tex.index(r"\bottomrule")].strip().splitlines()[1:]
    columns = tex.split(r"\begin{tabular}{")[1].split("}")[0]
    assert len(body) == 2 and all(line.endswith(r"\\") for line in body)
    assert all(line.count("&") == len(columns) - 1 for line in body)
    assert r"\% of total" in tex and r"rotten\_tomatoes" in tex and r"$\alpha$" in tex
    assert r"\textbf{80.0}" in tex


def test_csv_has_raw_numbers(tmp_path):
    t = table_from(tmp_path, [record(LORA, 0, .7, .61), record(LORA, 1, .7, .63)])
    rows = list(csv.DictReader(io.StringIO(to_csv(t))))
    assert len(rows) == 1 and float(rows[0]["rotten_tomatoes_accuracy"]) == pytest.approx(.62)
    assert int(float(rows[0]["trainable"])) == 1000 and rows[0]["rotten_tomatoes_seeds"] == "2"


def test_command_writes_all_formats_and_plots(tmp_path, capsys):
    lora = [dict(LORA, r=r) for r in (1, 4, 16)]
    runs = [record(m, s, .6 + .01 * m["r"], .6 + .01 * m["r"] + .001 * s, trainable=100 * m["r"])
            for m in lora for s in range(2)]
    runs += [record(FULL, s, .8, .8, trainable=100000) for s in range(2)]
    sweep = write_runs(tmp_path / "sweep", runs)
    assert tables.main([str(sweep), "--out", str(tmp_path / "out"), "--plot"]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["table.csv", "table.md", "table.tex", "table_selection.csv", "table_vs_params.png",
                       "table_vs_rank.png"]
    assert all((tmp_path / "out" / p).stat().st_size > 0 for p in written)
    assert (tmp_path / "out" / "table_vs_rank.png").read_bytes()[:4] == b"\x89PNG"


def test_command_errors_are_one_line(tmp_path, capsys):
    assert tables.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    write_runs(tmp_path / "s", [record(LORA, 0, .7, .7)])
    assert tables.main([str(tmp_path / "s"), "--metric", "pearson"]) == 2
    assert "--metric='pearson': is not in the records (have: ['accuracy'])" in capsys.readouterr().err


def test_wandb_runs_become_records():
    summary = {"best/epoch": 2, "best/validation/accuracy": .7, "best/test/accuracy": .68,
               "last/epoch": 3, "last/validation/accuracy": .69, "last/test/accuracy": .66,
               "parameters/trainable": 10, "parameters/total": 100, "measure/peak_memory_mb": 900.0,
               "measure/train_samples_per_s": 12.0}
    rec = record_from_wandb({"method": LORA, "seed": 0}, summary, "finished")
    run = tables.run_from_record(rec, "accuracy", "best")
    assert (run.val, run.test, run.trainable, run.peak_memory_mb) == (.7, .68, 10, 900.0)
    assert tables.run_from_record(rec, "accuracy", "last").test == .66
    assert record_from_wandb({}, {}, "crashed")["status"] == "failed"


def test_records_written_by_the_trainer_are_read(tmp_path):
    """The builder reads the keys the trainer actually writes (same-named fields, not assumed ones)."""
    from test_train import smoke_cfg

    from lora_lab.trainer.train import run_training

    run_training(smoke_cfg(tmp_path, "method=lora", "method.r=2"), tmp_path / "sweep" / "0_run")
    t = build_table(collect_runs([tmp_path / "sweep"], "accuracy", "best"))
    (row,) = t.rows
    assert row.startswith("LoRA r=2") and t.cells[(row, "rotten_tomatoes")].seeds == 1
    assert t.metrics == {"rotten_tomatoes": "accuracy"}
    assert t.params[row][0] > 0 and t.efficiency[row][0] > 0
    assert json.loads((tmp_path / "sweep" / "0_run" / "record.json").read_text())["method_resolved"]["r"] == 2


def test_table_is_logged_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = write_runs(tmp_path / "sweep", [record(LORA, 0, .7, .7), record(FULL, 0, .8, .8)])
    assert tables.main([str(sweep), "--out", str(tmp_path / "out"), "--log-wandb", "lora_lab_tests"]) == 0
    (run,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb"))


def test_expected_rows_are_shown_below_ours_and_never_bolded(tmp_path):
    from pathlib import Path

    runs = [record(LORA, 0, .9, .95, task="sst2"), record(LORA, 0, .9, .80, task="mrpc")]
    sweep = write_runs(tmp_path / "sweep", runs)
    expected = Path(__file__).resolve().parent.parent / "experiments" / "paper_table2" / "expected.csv"
    assert tables.main([str(sweep), "--out", str(tmp_path / "out"), "--expected", str(expected)]) == 0
    md = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert md[0] == "| Method | Trainable params | % of total | mrpc | sst2 | Avg. | Peak memory (MB) | Train samples/s |"
    # one seed per cell: the dagger says so (the command adds it; no interval without per-example results)
    assert md[2] == "| LoRA r=8 α=8 (q+v) | 1.0K | 1.00 | **80.0†** | **95.0†** | **87.5†** | 1000 | 20.0 |"
    assert md[3] == "| FT (paper) | 125.0M | - | 90.2 | 94.8 | 92.5 | - | - |"
    assert md[4] == "| LoRA r=8 (paper) | 0.3M | - | 89.7 | 95.1 | 92.4 | - | - |"  # 95.1 > ours, not bold


def test_committed_study_table_is_what_its_committed_records_give(tmp_path):
    """experiments/embedded_study_quick: the table files are regenerated, byte for byte, from the run
    records committed beside them, so every number there traces back to a run."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "experiments" / "embedded_study_quick"
    records = list((root / "records").rglob("record.json"))
    assert len(records) == 180  # 2 tasks x 10 arms x 3 learning rates x 3 seeds
    assert tables.main([str(root / "records"), "--tune", "trainer.lr", "--out", str(tmp_path), "--name", "study"]) == 0
    for name in ("study.md", "study.tex", "study.csv", "study_selection.csv"):
        assert (tmp_path / name).read_text() == (root / name).read_text(), name


def test_runs_are_read_from_a_wandb_project(monkeypatch):
    """--wandb: runs come from the W&B API (faked here: the real one needs the network)."""
    import sys
    import types

    summary = {"best/epoch": 1, "best/validation/accuracy": .7, "best/test/accuracy": .66,
               "last/epoch": 1, "last/validation/accuracy": .7, "last/test/accuracy": .66,
               "parameters/trainable": 10, "parameters/total": 100}

    class FakeRun:
        def __init__(self, seed, state):
            self.config = {"method": LORA, "seed": seed, "data": {"name": "rt"}, "_wandb": {"x": 1}}
            self.summary, self.state, self.path = summary, state, ["team", "proj", f"run{seed}"]

    calls = []

    class FakeApi:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            return [FakeRun(0, "finished"), FakeRun(1, "finished"), FakeRun(2, "crashed")]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=FakeApi))
    runs = collect_runs([], "accuracy", "best", "team/proj", "sweep-1")
    assert calls == [("team/proj", {"group": "sweep-1"})]
    t = build_table(runs)
    cell = t.cells[("LoRA r=8 α=8 (q+v)", "rt")]
    assert (cell.seeds, cell.failed, cell.value) == (2, 1, .66)


def test_budget_runs_are_labelled_with_the_rank_they_chose(tmp_path):
    from lora_lab.analysis.compare import write_comparison

    budget = dict(LORA, budget=36864, targets=["q", "k"])
    rec = record(budget, 0, .7, .7)
    rec["method_resolved"] = {"r": 4, "lora_parameters": 36864}
    sweep = write_runs(tmp_path / "sweep", [rec])
    label = "LoRA r=4 α=8 (q+k) [budget 36,864]"
    assert build_table(collect_runs([sweep], "accuracy", "best")).rows == [label]
    assert f"| {label} |" in write_comparison(sweep)


def test_a_missing_directory_is_named(tmp_path, capsys):
    assert tables.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"lora-lab-table: error: runs='{tmp_path / 'nope'}': does not exist"


def test_a_record_the_table_cannot_trust_is_named(tmp_path, capsys):
    """A sweep with one unreadable record: no table from the rest, the file named in one line, exit 2."""
    sweep = write_runs(tmp_path / "sweep", [record(LORA, 0, .7, .7), record(LORA, 1, .7, .7)])
    bad = sweep / "1_job" / "record.json"
    bad.write_text(bad.read_text()[:-20])
    assert tables.main([str(sweep), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lora-lab-table: error: record='{bad}': is not valid JSON") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    write_json(bad, {**record(LORA, 1, .7, .7), "schema_version": 4})
    assert tables.main([str(sweep)]) == 2
    assert "has schema_version 4; this lora_lab reads versions 1, 2, 3" in capsys.readouterr().err


def test_runs_that_did_not_complete_are_counted_by_status(tmp_path):
    runs = [record(LORA, 0, .7, .7), record(LORA, 1, 0, 0, status="failed"),
            {**record(LORA, 2, 0, 0, status="diverged"), "schema_version": 2, "error_kind": "diverged"}]
    t = table_from(tmp_path, runs)
    cell = t.cells[("LoRA r=8 α=8 (q+v)", "rotten_tomatoes")]
    assert (cell.seeds, cell.failed) == (1, 2)
    assert "2 run(s) left out (1 diverged, 1 failed; listed in the selection CSV)." in to_markdown(t)
    assert [r.error for r in t.members["LoRA r=8 α=8 (q+v)"]][1:] == ["FloatingPointError: training loss is nan"] * 2


# ---------------------------------------------------------------- tasks with their own main metric

NER = {"name": "wnut16", "type": "token_classification",
       "metrics": ["entity_f1", "entity_precision", "entity_recall", "token_accuracy"],
       "main_metric": "entity_f1", "label_names": ["O", "B-company", "I-company", "B-person", "I-person"]}
TREC = {"name": "trec6", "type": "classification", "metrics": ["accuracy", "macro_f1", "mcc"],
        "main_metric": "accuracy", "label_names": ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]}
BASELINES = {"wnut16": {"name": "all O", "test": {"entity_f1": 0.0, "entity_precision": 0.0, "entity_recall": 0.0,
                                                  "token_accuracy": .91}},
             "trec6": {"name": "majority class", "test": {"accuracy": .224, "macro_f1": .061, "mcc": 0.0}}}


def task_record(task, method, seed, val, test, *, other=(.11, .22), **kwargs):
    """A record that declares its task: ``val``/``test`` are its main metric's, ``other`` those of
    every other metric of the task (so a table reading the wrong metric shows it)."""
    rec = record(method, seed, val, test, task=task["name"], **kwargs)
    rec["task"] = task
    if rec["status"] != "completed":
        return rec
    for key in ("best", "last"):
        row = {"epoch": rec[key]["epoch"], "step": 10 * rec[key]["epoch"], "train_loss": .3}
        for metric in task["metrics"]:
            main = metric == task["main_metric"]
            row[f"validation/{metric}"] = rec[key]["validation/accuracy"] if main else other[0]
            row[f"test/{metric}"] = rec[key]["test/accuracy"] if main else other[1]
        rec[key] = row
    rec["baseline"] = BASELINES[task["name"]]
    if task["type"] == "classification":
        rec["majority_class_test_accuracy"] = BASELINES[task["name"]]["test"]["accuracy"]
    return rec


def mixed_runs():
    return [task_record(TREC, LORA, 0, .80, .90), task_record(TREC, FULL, 0, .85, .95, trainable=100000),
            task_record(NER, LORA, 0, .40, .30), task_record(NER, LORA, 1, .42, .34),
            task_record(NER, FULL, 0, .50, .44, trainable=100000)]


def test_each_task_is_shown_in_its_own_main_metric(tmp_path):
    runs = collect_runs([write_runs(tmp_path / "sweep", mixed_runs())], None, "best")
    t = build_table(runs)
    lora = "LoRA r=8 α=8 (q+v)"
    assert t.metrics == {"trec6": "accuracy", "wnut16": "entity_f1"} and t.metric is None
    assert t.cells[(lora, "wnut16")].value == pytest.approx(.32)  # entity F1, not token accuracy (.22)
    assert t.cells[(lora, "trec6")].value == pytest.approx(.90)
    assert t.average(lora) == pytest.approx(.61)
    md = to_markdown(t).splitlines()
    assert md[0].startswith("| Method | Trainable params | % of total | trec6 (accuracy) | wnut16 (entity F1) | Avg. |")
    assert md[2] == "| Full FT | 100.0K | 100.00 | **95.0** | **44.0** | **69.5** | 1000 | 20.0 |"
    caption = md[-1]
    assert caption.startswith("Test metric: trec6 accuracy x100, wnut16 entity F1 x100; median over seeds, best epoch")
    assert caption.endswith(" Baselines (test): trec6 majority class 22.4, wnut16 all O 0.0.")
    assert r"wnut16 (entity F1)" in to_latex(t)
    header = next(csv.reader(io.StringIO(to_csv(t))))
    assert header[3:5] == ["trec6_accuracy", "wnut16_entity_f1"]


def test_a_single_task_table_names_its_metric_in_the_caption_not_the_header(tmp_path):
    t = table_from(tmp_path, [task_record(NER, LORA, s, .4, .3 + .01 * s) for s in range(3)], metric=None)
    assert t.metric == "entity_f1" and t.baselines == {"wnut16": ("all O", 0.0)}
    md = to_markdown(t)
    assert md.startswith("| Method | Trainable params | % of total | wnut16 | Peak memory (MB) |")
    assert "Test entity F1 (x100), median over seeds" in md and "Baselines (test): wnut16 all O 0.0." in md
    from lora_lab.analysis import table_plots

    assert table_plots._ylabel(t) == "test entity F1 (wnut16)"
    assert table_plots._ylabel(table_from(tmp_path / "b", mixed_runs(), metric=None)) == \
        "test main metric (average of 2 tasks)"


def test_tuning_chooses_on_validation_of_each_tasks_own_metric(tmp_path):
    runs = []
    for seed in range(2):
        # NER: lr 1e-4 has the better token accuracy on validation, lr 1e-3 the better entity F1
        runs.append(task_record(NER, LORA, seed, .40, .45, lr=1e-4, other=(.95, .95)))
        runs.append(task_record(NER, LORA, seed, .60, .50, lr=1e-3, other=(.90, .90)))
        runs.append(task_record(TREC, LORA, seed, .80, .85, lr=1e-4))
        runs.append(task_record(TREC, LORA, seed, .70, .90, lr=1e-3))
    sweep = write_runs(tmp_path / "sweep", runs)
    t = build_table(collect_runs([sweep], None, "best"), tune=["trainer.lr"])
    lora = "LoRA r=8 α=8 (q+v)"
    assert t.cells[(lora, "wnut16")].chosen == {"trainer.lr": 1e-3} and t.cells[(lora, "wnut16")].value == .50
    assert t.cells[(lora, "trec6")].chosen == {"trainer.lr": 1e-4} and t.cells[(lora, "trec6")].value == .85
    assert "chosen per row and task by median validation value of each task's metric" in to_markdown(t)

    assert tables.main([str(sweep), "--tune", "trainer.lr", "--out", str(tmp_path / "out"), "--plot"]) == 0
    selection = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table_selection.csv").read_text())))
    assert list(selection[0]) == ["row", "task", "trainer.lr", "seeds", "failed", "validation_accuracy",
                                  "test_accuracy", "validation_entity_f1", "test_entity_f1", "chosen", "runs"]
    ner = {float(e["trainer.lr"]): e for e in selection if e["task"] == "wnut16"}
    folders = {p.name for p in sweep.iterdir() if (p / "record.json").exists()}
    assert all(len(e["runs"].split()) == 2 and set(e["runs"].split()) <= folders for e in selection)  # 2 seeds
    assert ner[1e-3]["chosen"] == "True" and ner[1e-4]["chosen"] == "False"
    assert float(ner[1e-3]["validation_entity_f1"]) == pytest.approx(.60) and ner[1e-3]["validation_accuracy"] == ""
    assert (tmp_path / "out" / "table_vs_params.png").exists()


def test_metric_option_shows_one_metric_for_every_task(tmp_path, capsys):
    sweep = write_runs(tmp_path / "sweep", [task_record(NER, LORA, 0, .4, .3, other=(.9, .93))])
    t = build_table(collect_runs([sweep], "token_accuracy", "best"), "token_accuracy")
    assert t.metrics == {"wnut16": "token_accuracy"} and t.cells[("LoRA r=8 α=8 (q+v)", "wnut16")].value == .93
    assert "Test token accuracy (x100)" in to_markdown(t)
    assert t.baselines == {"wnut16": ("all O", .91)}
    mixed = write_runs(tmp_path / "mixed", mixed_runs())
    assert tables.main([str(mixed), "--metric", "macro_f1"]) == 2
    err = capsys.readouterr().err
    assert err == ("lora-lab-table: error: --metric='macro_f1': is not in the records (have: ['entity_f1', "
                   "'entity_precision', 'entity_recall', 'token_accuracy'])\n")


def test_runs_of_one_task_with_different_main_metrics_are_an_error(tmp_path, capsys):
    other = dict(NER, main_metric="token_accuracy")
    sweep = write_runs(tmp_path / "sweep", [task_record(NER, LORA, 0, .4, .3), task_record(other, LORA, 1, .9, .9)])
    with pytest.raises(tables.TableError, match=r"the runs of 'wnut16' have different main metrics "
                                                r"\(entity_f1 vs token_accuracy, .*1_job\); pass --metric"):
        build_table(collect_runs([sweep], None, "best"))
    assert tables.main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-lab-table: error: the runs of 'wnut16'") and err.count("\n") == 1
    assert tables.main([str(sweep), "--metric", "entity_f1"]) == 0  # one metric asked for: no ambiguity


def test_records_without_a_task_fall_back_to_the_monitor_then_accuracy(tmp_path):
    old = record(LORA, 0, .7, .6)
    assert tables.main_metric(old) == "accuracy" and tables.record_task(old) == "rotten_tomatoes"
    monitored = record(LORA, 1, .7, .6)
    monitored["config"]["trainer"]["monitor"] = "macro_f1"
    for key in ("best", "last"):
        monitored[key].update({"validation/macro_f1": .55, "test/macro_f1": .44})
    assert tables.main_metric(monitored) == "macro_f1"
    assert tables.main_metric(task_record(NER, LORA, 0, .4, .3)) == "entity_f1"  # the declaration wins
    t = table_from(tmp_path, [monitored], metric=None)
    assert t.metrics == {"rotten_tomatoes": "macro_f1"}
    assert t.cells[("LoRA r=8 α=8 (q+v)", "rotten_tomatoes")].value == .44
    assert "Baselines" not in to_markdown(t)  # old records carry no baseline


def test_wandb_runs_carry_their_task_and_baseline():
    summary = {"best/epoch": 2, "best/validation/entity_f1": .4, "best/test/entity_f1": .35,
               "best/validation/token_accuracy": .9, "best/test/token_accuracy": .92,
               "last/epoch": 2, "last/validation/entity_f1": .4, "last/test/entity_f1": .35,
               "parameters/trainable": 10, "parameters/total": 100,
               "task/main_metric": "entity_f1", "task/type": "token_classification", "task/name": "wnut16",
               "baseline/entity_f1": 0.0, "baseline/token_accuracy": .91}
    rec = record_from_wandb({"method": LORA, "seed": 0, "data": {"name": "wnut_16"}}, summary, "finished")
    assert rec["task"] == {"main_metric": "entity_f1", "type": "token_classification", "name": "wnut16"}
    assert rec["baseline"]["test"] == {"entity_f1": 0.0, "token_accuracy": .91}
    run = tables.run_from_record(rec, None, "best")
    assert (run.task, run.metric, run.val, run.test) == ("wnut16", "entity_f1", .4, .35)
    assert run.baseline == ("all O", 0.0)
    crashed = record_from_wandb({}, {"task/main_metric": "entity_f1", "task/name": "wnut16"}, "crashed")
    assert crashed["status"] == "failed" and tables.run_from_record(crashed, None, "best").metric == "entity_f1"


def test_comparison_is_one_table_per_task_with_its_metric_and_baseline(tmp_path):
    from lora_lab.analysis.compare import comparison_row, write_comparison

    sweep = write_runs(tmp_path / "mixed", mixed_runs())
    text = write_comparison(sweep)
    assert text == (sweep / "comparison.md").read_text()
    trec, ner = text.split("### wnut16\n\n")
    assert trec.startswith("### trec6\n\n| method | seed |") and "| val accuracy | test accuracy | epoch |" in trec
    assert "\nMajority class (test): 0.2240. Metric: accuracy, best epoch on validation.\n" in trec
    assert "| val entity_f1 | test entity_f1 | epoch |" in ner and "| 0.4000 | 0.3000 |" in ner
    assert "\nBaseline (test, all O): entity_f1 0.0000. Metric: entity_f1, best epoch on validation.\n" in ner
    assert comparison_row(task_record(NER, LORA, 0, .4, .3))[6:8] == ["0.4000", "0.3000"]
    assert comparison_row(task_record(NER, LORA, 0, .4, .3), "token_accuracy")[6:8] == ["0.1100", "0.2200"]

    single = write_runs(tmp_path / "ner", [task_record(NER, LORA, s, .4, .3) for s in range(2)])
    text = write_comparison(single, metric="token_accuracy")
    assert "###" not in text and "Baseline (test, all O): token_accuracy 0.9100." in text
    old = write_runs(tmp_path / "old", [{**record(LORA, 0, .7, .6), "majority_class_test_accuracy": .576}])
    assert "\nMajority class (test): 0.5760. Metric: accuracy, best epoch on validation.\n" in write_comparison(old)


def test_comparison_command_errors_are_one_line(tmp_path, capsys):
    from lora_lab.analysis import compare

    sweep = write_runs(tmp_path / "mixed", mixed_runs())
    assert compare.main([str(sweep), "--metric", "mcc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-lab-compare: error: record=") and "has no validation/mcc in 'best'" in err
    assert err.count("\n") == 1
    other = dict(NER, main_metric="token_accuracy")
    clash = write_runs(tmp_path / "clash", [task_record(NER, LORA, 0, .4, .3), task_record(other, LORA, 1, .9, .9)])
    assert compare.main([str(clash)]) == 2
    err = capsys.readouterr().err
    assert err == (f"lora-lab-compare: error: record='{clash / '1_job' / 'record.json'}': has main metric token_accuracy, "
                   "other runs of wnut16 have entity_f1; pass --metric to choose one\n")
    assert compare.main([str(clash), "--metric", "token_accuracy"]) == 0


def test_a_setting_added_after_some_runs_is_its_default_in_them():
    """Runs recorded before trainer.strategy existed are runs of its default (ddp): one row with the
    newer runs; another value is still a difference, and a study's bookkeeping (study.*) never is."""
    from lora_lab.analysis.runs import Run
    from lora_lab.analysis.table_build import TableError, check_same_settings

    old = Run({"method": {"name": "lora"}, "trainer": {"lr": 1e-3}, "study": {"chosen": {}}}, "completed")
    new = Run({"method": {"name": "lora"}, "trainer": {"lr": 1e-3, "strategy": "ddp"}}, "completed")
    check_same_settings([old, new], "LoRA", [])
    sharded = Run({"method": {"name": "lora"}, "trainer": {"lr": 1e-3, "strategy": "fsdp"}}, "completed")
    with pytest.raises(TableError, match="differ in trainer.strategy"):
        check_same_settings([old, sharded], "LoRA", [])
