"""How sure a table is: intervals, paired tests, ranking stability, per-example results, cost fronts,
on hand-computable cases and hand-made records."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import sklearn.metrics as skm
from scipy.stats import bootstrap, pearsonr, spearmanr
from test_tables import FULL, LORA, record

from lora_lab.analysis import tables
from lora_lab.analysis.example_metrics import check_against, class_count, metric_values
from lora_lab.analysis.fronts import front
from lora_lab.analysis.statistics import (
    Sample,
    cell_resampled,
    generator,
    interval,
    joint_distributions,
    pairing,
    rank_stability,
)
from lora_lab.analysis.table_build import build_table
from lora_lab.analysis.table_format import to_csv, to_latex, to_markdown
from lora_lab.analysis.table_stats import add_statistics
from lora_lab.errors import ConfigError
from lora_lab.runtime import predictions as preds
from lora_lab.runtime.records import PREDICTIONS_FILE, STATE_FILE
from lora_lab.tasks.metrics import classification_metrics, entity_metrics, lm_metrics, regression_metrics

N = 400
LABELS = np.random.default_rng(0).integers(0, 3, N)


def predicted(accuracy: float, seed: int) -> np.ndarray:
    """Predictions right on about ``accuracy`` of LABELS, wrong (another class) elsewhere."""
    rng = np.random.default_rng(seed)
    wrong = (LABELS + rng.integers(1, 3, N)) % 3
    return np.where(rng.random(N) < accuracy, LABELS, wrong)


def examples(prediction: np.ndarray, labels: np.ndarray = LABELS) -> preds.ExamplePredictions:
    return preds.ExamplePredictions("classification", 1, {"label": labels.astype(np.int32),
                                                          "prediction": prediction.astype(np.int32)}, None)


def accuracy(found: preds.ExamplePredictions) -> float:
    return float(metric_values("classification", "accuracy", found.fields, class_count(found.fields)))


def sample(accuracies, seeds=None, with_examples=True, offset=0) -> Sample:
    found = [examples(predicted(a, offset + i)) for i, a in enumerate(accuracies)]
    return Sample("classification", "accuracy", list(seeds or range(len(found))), [accuracy(f) for f in found],
                  examples=found if with_examples else None)


# ---------------------------------------------------------------- intervals

def test_the_interval_contains_the_known_median_of_a_constructed_sample():
    values = [.60, .62, .64, .66, .68, .70, .72, .74, .76]  # median .68
    s = Sample("classification", "accuracy", list(range(9)), values)
    low, high = interval(cell_resampled(s, "c"), seed=0)
    assert low < .68 < high and .60 <= low and high <= .76


def test_the_seed_bootstrap_is_scipys():
    values = np.array([.61, .70, .64, .73, .69])
    s = Sample("classification", "accuracy", list(range(5)), values)
    ours = interval(cell_resampled(s, "c"), seed=3)
    theirs = bootstrap((values,), np.median, method="percentile", rng=generator(3, "interval", "c"))
    assert ours == pytest.approx((theirs.confidence_interval.low, theirs.confidence_interval.high))


def test_one_seed_gets_an_interval_from_its_test_examples_as_scipy_gives_it():
    one = sample([.8])
    correct = (one.examples[0].fields["label"] == one.examples[0].fields["prediction"]).astype(float)
    ours = interval(cell_resampled(one, "c"), seed=0)
    theirs = bootstrap((correct,), np.mean, method="percentile", rng=generator(0, "interval", "c"))
    assert ours == pytest.approx((theirs.confidence_interval.low, theirs.confidence_interval.high))
    assert ours[0] < one.values[0] < ours[1] and ours[1] - ours[0] > .05  # ~ ±1.96 sqrt(.16 / 400)


def test_the_two_level_bootstrap_is_wider_than_either_level_alone():
    s = sample([.70, .78, .86])
    both = interval(cell_resampled(s, "c"), seed=0)
    seeds_only = interval(cell_resampled(Sample("classification", "accuracy", s.seeds, s.values), "c"), seed=0)
    assert both[0] <= seeds_only[0] + 1e-9 and both[1] >= seeds_only[1] - 1e-9
    assert both[0] < np.median(s.values) < both[1]


def test_nothing_to_resample_gives_no_interval():
    assert cell_resampled(Sample("classification", "accuracy", [0], [.7])) is None


# ---------------------------------------------------------------- paired tests

def test_identical_rows_have_p_one_and_a_zero_difference():
    a = sample([.7, .75, .8])
    paired = pairing(a, a)
    assert paired.examples and paired.units == "seeds and test examples"
    assert paired.p_value(seed=0) == 1.0
    assert interval(paired.difference("d"), seed=0) == (0.0, 0.0)
    seeds_only = Sample("classification", "accuracy", a.seeds, a.values)
    assert pairing(seeds_only, seeds_only).p_value(seed=0) == 1.0


def test_clearly_different_rows_have_p_below_one_percent():
    better, worse = sample([.90, .91, .92], offset=10), sample([.60, .61, .62], offset=20)
    paired = pairing(better, worse)
    assert paired.p_value(seed=0, resamples=2000) < 0.01
    low, high = interval(paired.difference("d"), seed=0)
    assert .2 < low < high < .4


def test_three_seeds_alone_cannot_give_a_p_below_a_quarter():
    """Sign flips of 3 paired seeds: 8 permutations, exact; the two-sided p of a consistent gap is 2/8."""
    a = Sample("classification", "accuracy", [0, 1, 2], [.90, .91, .92])
    b = Sample("classification", "accuracy", [0, 1, 2], [.60, .61, .62])
    assert pairing(a, b).units == "seeds"
    assert pairing(a, b).p_value(seed=0) == pytest.approx(.25)


def test_rows_pair_on_common_seeds_only():
    a, b = sample([.7, .8, .9], seeds=[0, 1, 2]), sample([.7, .8], seeds=[1, 2], offset=1)
    assert pairing(a, b).seeds == [1, 2]
    other_labels = Sample("classification", "accuracy", [5], [.5], examples=[examples(LABELS, (LABELS + 1) % 3)])
    assert pairing(a, other_labels) is None  # no common seed, and not the same test examples


# ---------------------------------------------------------------- ranking

def test_a_clearly_better_row_ranks_first_in_every_resample():
    rows = {"good": sample([.9, .91, .92], offset=1), "bad": sample([.6, .61, .62], offset=2),
            "worse": sample([.3, .31, .32], offset=3)}
    found = rank_stability(joint_distributions(rows, seed=0, resamples=500), higher_is_better=True)
    assert found["good"] == (1.0, 1.0) and found["bad"] == (0.0, 2.0) and found["worse"] == (0.0, 3.0)
    lower = rank_stability(joint_distributions(rows, seed=0, resamples=500), higher_is_better=False)
    assert lower["worse"] == (1.0, 1.0)


def test_identical_rows_share_the_first_place():
    same = sample([.7, .8, .9])
    found = rank_stability(joint_distributions({"a": same, "b": same}, seed=0, resamples=200), True)
    assert found == {"a": (1.0, 1.5), "b": (1.0, 1.5)}


# ---------------------------------------------------------------- per-example metrics equal the task's

def test_classification_metrics_from_examples_equal_scikit_learns():
    rng = np.random.default_rng(1)
    labels, prediction = rng.integers(0, 4, 300), rng.integers(0, 3, 300)
    expected = classification_metrics(labels.tolist(), prediction.tolist())
    fields = preds.example_fields("classification", labels.tolist(), prediction.tolist(), [])
    for metric, value in expected.items():
        assert metric_values("classification", metric, fields, class_count(fields)) == pytest.approx(value)
    idx = rng.integers(0, 300, (5, 300))  # a batch of resamples: each one as scikit-learn scores it
    batch = metric_values("classification", "macro_f1", {k: v[idx] for k, v in fields.items()}, 4)
    assert batch == pytest.approx([skm.f1_score(labels[i], prediction[i], average="macro") for i in idx])
    batch = metric_values("classification", "mcc", {k: v[idx] for k, v in fields.items()}, 4)
    assert batch == pytest.approx([skm.matthews_corrcoef(labels[i], prediction[i]) for i in idx])


def test_regression_metrics_from_examples_equal_scipys():
    rng = np.random.default_rng(2)
    gold = rng.normal(size=200)
    guess = gold + rng.normal(size=200)
    fields = {k: v.astype(np.float32) for k, v in preds.example_fields("regression", gold, guess, []).items()}
    assert metric_values("regression", "pearson", fields) == pytest.approx(pearsonr(gold, guess)[0], abs=1e-5)
    assert metric_values("regression", "spearman", fields) == pytest.approx(spearmanr(gold, guess)[0], abs=1e-5)
    constant = {"label": fields["label"], "prediction": np.ones(200, dtype=np.float32)}
    assert metric_values("regression", "pearson", constant) == regression_metrics(gold, [1.0] * 200)["pearson"] == 0


def test_entity_counts_per_sentence_give_seqevals_scores():
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    rng = np.random.default_rng(3)
    gold = [rng.integers(0, 5, rng.integers(1, 12)).tolist() for _ in range(80)]
    guess = [[t if rng.random() < .7 else int(rng.integers(0, 5)) for t in s][: max(1, len(s) - 1)] for s in gold]
    fields = preds.example_fields("token_classification", gold, guess, names)
    padded = [(p + [0] * len(g))[: len(g)] for g, p in zip(gold, guess)]
    expected, _ = entity_metrics([[names[i] for i in s] for s in gold], [[names[i] for i in s] for s in padded])
    for metric, value in expected.items():
        assert metric_values("token_classification", metric, fields) == pytest.approx(value)


def test_language_model_loss_from_examples_equals_the_token_weighted_loss():
    tokens, nll = [5, 9, 2, 14], [7.5, 10.25, 3.0, 30.5]
    fields = preds.example_fields("causal_lm", tokens, nll, [])
    for metric, value in lm_metrics(tokens, nll).items():
        assert metric_values("causal_lm", metric, fields) == pytest.approx(value)


# ---------------------------------------------------------------- the predictions file

def test_a_predictions_file_is_a_few_bytes_per_example_and_reads_back(tmp_path):
    path = tmp_path / PREDICTIONS_FILE
    preds.save_predictions(path, "classification", preds.example_fields("classification", LABELS,
                                                                        predicted(.8, 0), []), epoch=2)
    assert path.stat().st_size < 8 * N + 400
    found = preds.read_predictions(path)
    assert (found.task_type, found.epoch, len(found)) == ("classification", 2, N)
    assert np.array_equal(found.fields["label"], LABELS)
    check_against(found, "accuracy", accuracy(found))
    with pytest.raises(ConfigError, match="gives test accuracy .* but its record reports 0.5"):
        check_against(found, "accuracy", .5)


def test_a_broken_predictions_file_is_refused_naming_it(tmp_path):
    path = tmp_path / PREDICTIONS_FILE
    path.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match=f"predictions='{path}': cannot be read as safetensors"):
        preds.read_predictions(path)
    import torch

    from lora_lab.runtime.records import save_tensors
    save_tensors(path, {"label": torch.zeros(3, dtype=torch.int32)}, {"task_type": "classification", "epoch": "1"})
    with pytest.raises(ConfigError, match=r"holds \['label'\]; a classification file holds \['label', 'prediction'\]"):
        preds.read_predictions(path)
    save_tensors(path, {"label": torch.zeros(3, dtype=torch.int32), "prediction": torch.zeros(4, dtype=torch.int32)},
                 {"task_type": "classification", "epoch": "1"})
    with pytest.raises(ConfigError, match="different lengths"):
        preds.read_predictions(path)
    save_tensors(path, {"nll": torch.zeros(3)}, {"task_type": "poetry", "epoch": "1"})
    with pytest.raises(ConfigError, match="has task_type 'poetry'"):
        preds.read_predictions(path)


# ---------------------------------------------------------------- tables from records with per-example results

def run_with_examples(root, i, method, seed, acc, *, lr=1e-3, trainable=1000, memory=1000.0, speed=20.0,
                      val=.7, with_examples=True, method_lr=None):
    rec = record(method, seed, val, 0.0, lr=lr, trainable=trainable, memory=memory, speed=speed)
    if method_lr is not None:
        rec["config"]["method"] = dict(method, lr=method_lr)
    found = predicted(acc, 100 * i + seed)
    rec["best"]["test/accuracy"] = float((found == LABELS).mean())
    rec["schema_version"] = 2
    rec["files"] = {STATE_FILE: {"epoch": 1, "holds": "best"}}
    run_dir = root / f"{i}_job"
    if with_examples:
        rec["files"][PREDICTIONS_FILE] = {"epoch": 1, "holds": "best"}
        preds.save_predictions(run_dir / PREDICTIONS_FILE, "classification",
                               preds.example_fields("classification", LABELS, found, []), epoch=1)
    from lora_lab.runtime.records import write_json
    write_json(run_dir / "record.json", rec)
    return rec


def two_methods(root, full=.9, lora=.7, seeds=3, **kwargs):
    for s in range(seeds):
        run_with_examples(root, s, FULL, s, full, trainable=100000, memory=1500.0, speed=10.0, **kwargs)
        run_with_examples(root, 10 + s, LORA, s, lora, **kwargs)
    return root


def test_the_table_shows_intervals_the_paired_column_and_the_ranking(tmp_path, capsys):
    sweep = two_methods(tmp_path / "sweep")
    assert tables.main([str(sweep), "--out", str(tmp_path / "out"), "--compare-to", "full ft",
                        "--resamples", "2000"]) == 0
    md = (tmp_path / "out" / "table.md").read_text()
    lines = md.splitlines()
    assert lines[0] == ("| Method | Trainable params | % of total | rotten_tomatoes | Δ vs Full FT | Peak memory (MB) "
                        "| Train samples/s |")
    full, lora = lines[2], lines[3]
    assert full.startswith("| Full FT | 100.0K | 100.00 | **") and "| ref. |" in full
    assert "[" in lora.split("|")[4] and "p<0.001" in lora.split("|")[5] and lora.split("|")[5].strip().startswith("-")
    assert "two-level bootstrap over seeds and test examples" in md
    assert "permutation_type='samples'" in md and "Tied" not in md
    assert "### Ranking stability" in md and "| Full FT | 1.00 | 1.0 |" in md
    assert "### Cost fronts" in md
    assert r"$\Delta$ vs Full FT" in (tmp_path / "out" / "table.tex").read_text()
    (row,) = [r for r in csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text()))
              if r["method"].startswith("LoRA")]
    assert float(row["rotten_tomatoes_accuracy_low"]) < float(row["rotten_tomatoes_accuracy"]) \
        < float(row["rotten_tomatoes_accuracy_high"])
    assert row["rotten_tomatoes_resampled"] == "seeds+examples"
    assert float(row["rotten_tomatoes_vs_reference_p"]) < 0.001
    assert float(row["rotten_tomatoes_vs_reference_high"]) < 0


def test_close_rows_are_tied_not_bold(tmp_path):
    sweep = two_methods(tmp_path / "sweep", full=.80, lora=.80)
    runs = tables.collect_runs([sweep], None, "best")
    table = build_table(runs)
    add_statistics(table, resamples=500)
    md = to_markdown(table)
    assert "**" not in md.split("\n\n")[0] and "Tied: rotten_tomatoes (" in md


def test_one_seed_with_examples_gets_an_interval_and_a_dagger(tmp_path):
    sweep = two_methods(tmp_path / "sweep", seeds=1)
    table = build_table(tables.collect_runs([sweep], None, "best"))
    add_statistics(table, resamples=500)
    md = to_markdown(table)
    cell = md.splitlines()[3].split("|")[4].strip()
    assert "† [" in cell and "† fewer than 3 seeds." in md
    assert r"$^\dagger$ [" in to_latex(table)


def test_runs_without_examples_get_seed_only_intervals_and_mixed_cells_are_marked(tmp_path):
    sweep = tmp_path / "sweep"
    for s in range(3):
        run_with_examples(sweep, s, FULL, s, .9, trainable=100000)
        run_with_examples(sweep, 10 + s, LORA, s, .7, with_examples=False)
    table = build_table(tables.collect_runs([sweep], None, "best"))
    stats = add_statistics(table, resamples=500)
    assert stats.examples == {("Full FT", "rotten_tomatoes"): True, ("LoRA r=8 α=8 (q+v)", "rotten_tomatoes"): False}
    md = to_markdown(table)
    assert "§ [" in md.splitlines()[3] and "over seeds only in the cells marked §" in md


def test_predictions_that_disagree_with_their_record_are_refused(tmp_path, capsys):
    sweep = two_methods(tmp_path / "sweep", seeds=1)
    path = sweep / "0_job" / PREDICTIONS_FILE
    preds.save_predictions(path, "classification", preds.example_fields("classification", LABELS, LABELS, []), 1)
    assert tables.main([str(sweep), "--resamples", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lora-lab-table: error: predictions='{path}': gives test accuracy 1, but its record reports")
    path.unlink()
    assert tables.main([str(sweep), "--resamples", "100"]) == 2
    assert f"lists {PREDICTIONS_FILE}, which is missing" in capsys.readouterr().err


def test_an_unknown_reference_row_is_one_line(tmp_path, capsys):
    sweep = two_methods(tmp_path / "sweep", seeds=1)
    assert tables.main([str(sweep), "--compare-to", "DoRA", "--resamples", "100"]) == 2
    assert capsys.readouterr().err == ("lora-lab-table: error: --compare-to 'DoRA' is not a row (rows: Full FT, "
                                       "LoRA r=8 α=8 (q+v))\n")


def test_the_table_is_the_same_each_time_and_its_seed_is_an_option(tmp_path):
    sweep = two_methods(tmp_path / "sweep", full=.82, lora=.80)
    texts = []
    for seed in (0, 0, 1):
        table = build_table(tables.collect_runs([sweep], None, "best"))
        add_statistics(table, seed=seed, resamples=300, compare_to="Full FT")
        texts.append(to_markdown(table) + to_csv(table))
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_tuned_vs_default_learning_rate(tmp_path):
    sweep = tmp_path / "sweep"
    for s in range(3):
        run_with_examples(sweep, s, LORA, s, .6, lr=1e-3, val=.6, method_lr=1e-3)
        run_with_examples(sweep, 10 + s, LORA, s, .8, lr=1e-2, val=.8, method_lr=1e-3)
        run_with_examples(sweep, 20 + s, FULL, s, .85, lr=1e-4, val=.8, trainable=100000, method_lr=5e-5)
    assert tables.main([str(sweep), "--tune", "trainer.lr", "--out", str(tmp_path / "out"), "--plot",
                        "--resamples", "300"]) == 0
    md = (tmp_path / "out" / "table.md").read_text()
    section = md.split("### Tuned vs default learning rate")[1]
    lora = next(line for line in section.splitlines() if line.startswith("| LoRA"))
    full = next(line for line in section.splitlines() if line.startswith("| Full FT"))
    assert "(lr 0.01) |" in lora and lora.rstrip(" |").endswith("(lr 0.001)") and " [" in lora.split("|")[3]
    assert "not run (lr 5e-05)" in full
    assert (tmp_path / "out" / "table_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "table_vs_params.png").exists()


def test_mean_std_cells_carry_the_interval_of_the_mean(tmp_path):
    from test_tables import table_from

    t = table_from(tmp_path, [record(LORA, s, .7, v) for s, v in enumerate((.60, .70, .80))], agg="mean_std")
    add_statistics(t, resamples=999)
    low, high = t.stats.intervals[("LoRA r=8 α=8 (q+v)", "rotten_tomatoes")]
    assert .6 - 1e-9 <= low < .7 < high <= .8 + 1e-9
    assert f"70.0 ± 10.0 [{100 * low:.1f}, {100 * high:.1f}]" in to_markdown(t)
    assert "the 95 % interval of the mean" in to_markdown(t)
    assert r"70.0 $\pm$ 10.0 [" in to_latex(t)

# ---------------------------------------------------------------- cost fronts

def test_dominated_rows_are_marked_on_each_cost(tmp_path):
    from test_tables import table_from

    runs = [record(FULL, 0, .8, .80, trainable=100000, memory=2000.0, speed=10.0),
            record(LORA, 0, .8, .78, trainable=1000, memory=1000.0, speed=20.0),
            record(dict(LORA, r=16), 0, .8, .70, trainable=2000, memory=900.0, speed=30.0)]
    t = table_from(tmp_path, runs)
    r16, r8 = "LoRA r=16 α=8 (q+v)", "LoRA r=8 α=8 (q+v)"
    assert front(t, "params") == {"Full FT": None, r8: None, r16: r8}  # more parameters, lower accuracy
    assert front(t, "memory") == {"Full FT": None, r8: None, r16: None}
    add_statistics(t, resamples=100)
    md = to_markdown(t)
    assert f"| {r16} | 70.0† | 2.0K | dominated by {r8} | 900 | yes | 33.3 | yes |" in md


def test_no_interval_without_seeds_or_examples_keeps_the_plain_cell(tmp_path):
    from test_tables import table_from

    t = table_from(tmp_path, [record(LORA, 0, .7, .65)])
    add_statistics(t, resamples=100)
    assert "| **65.0†** |" in to_markdown(t) and "No intervals: every cell has one seed" in to_markdown(t)
    assert next(csv.DictReader(io.StringIO(to_csv(t))))["rotten_tomatoes_accuracy_low"] == ""


# ---------------------------------------------------------------- a real sweep

def test_a_tiny_real_sweep_gives_intervals_the_paired_column_and_the_ranking(tmp_path):
    """2 methods x 3 seeds trained on the tiny model: every run keeps its per-example test results,
    and the table resamples seeds and test examples, pairs LoRA with head-only, ranks them."""
    from test_train import smoke_cfg

    from lora_lab.trainer.train import run_training

    sweep = tmp_path / "sweep"
    for method in ("lora", "head"):
        for seed in range(3):
            cfg = smoke_cfg(tmp_path, f"method={method}", f"seed={seed}", "data.max_train=16",
                            "trainer.latency_repeats=1", "trainer.checkpoint_every=0")
            run_training(cfg, sweep / f"{method}_{seed}")
    found = preds.read_predictions(sweep / "lora_0" / PREDICTIONS_FILE)
    assert found.task_type == "classification" and len(found) == 32 and found.epoch == 1
    assert (sweep / "lora_0" / PREDICTIONS_FILE).stat().st_size < 8 * 32 + 400
    out = tmp_path / "out"
    assert tables.main([str(sweep), "--compare-to", "Head only", "--out", str(out), "--resamples", "999"]) == 0
    md = (out / "table.md").read_text()
    header, _, head, lora = md.splitlines()[:4]
    assert header.startswith("| Method | Trainable params | % of total | rotten_tomatoes | Δ vs Head only |")
    assert head.startswith("| Head only |") and "| ref. |" in head
    cell, difference = lora.split("|")[4].strip(), lora.split("|")[5].strip()
    assert cell.strip("*").count("[") == 1 and "†" not in cell
    assert difference[0] in "+-" and "[" in difference and (" p=" in difference or " p<" in difference)
    assert "two-level bootstrap over seeds and test examples" in md and "permutation_type='samples'" in md
    assert "### Ranking stability" in md and "### Cost fronts" in md
    stats = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert {row["rotten_tomatoes_resampled"] for row in stats} == {"seeds+examples"}
