"""lora-lab-predict: a trained run's model on a file of new rows gives back the run's own per-example test
predictions on its test split (classification, regression, token classification); bad input is one line."""
import csv
import json
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_causal_lm import absl_logs_to_the_real_stderr, smoke_config  # noqa: F401 - the fixture applies here too
from test_token_classification import ner_cfg
from test_train import smoke_cfg

from lora_lab.cli.predict import main
from lora_lab.data.columns import column_values
from lora_lab.data.loading import build_splits
from lora_lab.runtime import records
from lora_lab.runtime.predictions import entity_counts, read_predictions
from lora_lab.trainer.train import run_training


def run_test_split(run_dir):
    """The run's test split as the trainer built it (columns text [text_pair] label; label ids), its label names."""
    record = records.load_record(run_dir)
    splits, names, _ = build_splits(OmegaConf.create(record["config"]).data)
    return splits["test"], names


def write_csv(path, columns: dict):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(columns))
        writer.writerows(zip(*columns.values()))
    return path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classifier")
    run_dir = tmp / "run"
    run_training(smoke_cfg(tmp, "method=lora", "trainer.epochs=2"), run_dir)
    return run_dir


def test_classification_gives_back_the_runs_test_predictions(classifier, tmp_path, capsys):
    test, names = run_test_split(classifier)
    labels = [names[i] for i in column_values(test, "label")]
    file = write_csv(tmp_path / "test.csv", {"text": column_values(test, "text"), "label": labels})
    assert main([str(classifier), str(file)]) == 0
    out = tmp_path / "test.predictions.csv"
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"[lora_lab] wrote {len(test)} classification predictions to {out}") and "\n" not in line
    rows = read_csv(out)
    assert list(rows[0]) == ["text", "label", "prediction", *(f"probability_{n}" for n in names)]
    assert [r["label"] for r in rows] == labels  # the input's columns are kept
    saved = read_predictions(classifier / records.PREDICTIONS_FILE)
    assert saved.epoch == records.load_record(classifier)["best"]["epoch"]
    predicted = np.array([names.index(r["prediction"]) for r in rows])
    np.testing.assert_array_equal(predicted, saved.fields["prediction"])
    probabilities = np.array([[float(r[f"probability_{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(1), predicted)


def test_unlabelled_json_lines_out(classifier, tmp_path):
    file = tmp_path / "new.jsonl"
    file.write_text('{"text": "a fine film", "id": 7}\n{"text": "dull", "id": 8}\n')
    out = tmp_path / "sub" / "p.jsonl"
    out.parent.mkdir()
    assert main([str(classifier), str(file), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [7, 8] and all(r["prediction"] in ("rotten", "fresh") for r in rows)


def test_regression_gives_back_the_runs_test_predictions(tmp_path, capsys):
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    texts = [f"{words[i % 6]} {words[(i // 6) % 6]} film {i}" for i in range(80)]
    train = write_csv(tmp_path / "train.csv", {"review": texts, "score": [float(i % 5) / 2 for i in range(80)]})
    run_dir = tmp_path / "run"
    run_training(smoke_cfg(tmp_path, "method=head", "data=files", "data.task_type=regression", f"data.files.train={train}",
                           "data.text_column=review", "data.label_column=score"), run_dir)
    test, _ = run_test_split(run_dir)
    file = write_csv(tmp_path / "test.csv", {"review": column_values(test, "text")})
    assert main([str(run_dir), str(file)]) == 0
    assert "regression predictions" in capsys.readouterr().out
    predicted = np.array([float(r["prediction"]) for r in read_csv(tmp_path / "test.predictions.csv")], dtype=np.float32)
    np.testing.assert_array_equal(predicted, read_predictions(run_dir / records.PREDICTIONS_FILE).fields["prediction"])


def test_token_classification_gives_back_the_runs_test_predictions(tmp_path):
    run_dir = tmp_path / "run"
    run_training(ner_cfg(tmp_path, "method=full", "trainer.epochs=3", "trainer.lr=3e-3", n=90), run_dir)
    test, names = run_test_split(run_dir)
    sentences = column_values(test, "text")
    file = tmp_path / "new.conll"  # words alone, no tags
    file.write_text("\n\n".join("\n".join(words) for words in sentences) + "\n")
    out = tmp_path / "tags.jsonl"
    assert main([str(run_dir), str(file), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == sentences
    assert all(len(r["prediction"]) == len(r["text"]) for r in rows)
    gold = column_values(test, "label")
    counts = np.array([entity_counts(g, [names.index(t) for t in r["prediction"]], names) + (len(g),)
                       for g, r in zip(gold, rows)])
    saved = read_predictions(run_dir / records.PREDICTIONS_FILE).fields
    for column, field in enumerate(("tp", "fp", "fn", "correct_tokens", "tokens")):
        np.testing.assert_array_equal(counts[:, column], saved[field])
    # the same words as a CSV of sentences (split on whitespace): the same tags, as JSON arrays
    table = write_csv(tmp_path / "new.csv", {"text": [" ".join(s) for s in sentences]})
    assert main([str(run_dir), str(table)]) == 0
    tagged = read_csv(tmp_path / "new.predictions.csv")
    assert [r["text"] for r in tagged] == [" ".join(s) for s in sentences]  # the input as it was given
    assert [json.loads(r["prediction"]) for r in tagged] == [r["prediction"] for r in rows]


def test_causal_lm_plain_text_gives_back_the_runs_test_losses(tmp_path):
    run_dir = tmp_path / "run"
    run_training(smoke_cfg(tmp_path, "model=tiny_gpt2", "data.task_type=causal_lm", "method=lora"), run_dir)
    test, _ = run_test_split(run_dir)
    file = write_csv(tmp_path / "test.csv", {"text": column_values(test, "text")})
    assert main([str(run_dir), str(file)]) == 0
    rows = read_csv(tmp_path / "test.predictions.csv")
    saved = read_predictions(run_dir / records.PREDICTIONS_FILE).fields
    np.testing.assert_array_equal(np.array([float(r["nll"]) for r in rows], dtype=np.float32), saved["nll"])
    np.testing.assert_array_equal([int(r["tokens"]) for r in rows], saved["tokens"])
    assert all(float(r["perplexity"]) == pytest.approx(np.exp(float(r["nll"]) / int(r["tokens"]))) for r in rows)


def test_causal_lm_prompts_are_generated_as_the_run_generated_them(tmp_path):
    run_dir = tmp_path / "run"
    record = run_training(smoke_config(tmp_path), run_dir)
    test, _ = run_test_split(run_dir)
    prompts, responses = column_values(test, "prompt"), column_values(test, "response")
    file = tmp_path / "prompts.jsonl"  # the last row without its response: generated, not scored
    file.write_text("".join(json.dumps({"prompt": p, **({"response": r} if i < len(prompts) - 1 else {})}) + "\n"
                            for i, (p, r) in enumerate(zip(prompts, responses))))
    out = tmp_path / "out.jsonl"
    assert main([str(run_dir), str(file), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    generated = {r["prompt"]: r["generation"] for r in rows}
    for example in record["generations"]["best"]["test"]:
        assert generated[example["prompt"]] == example["generation"]
    saved = read_predictions(run_dir / records.PREDICTIONS_FILE).fields
    np.testing.assert_array_equal(np.array([r["nll"] for r in rows[:-1]], dtype=np.float32), saved["nll"][:-1])
    assert rows[-1]["nll"] is None and rows[-1]["tokens"] is None and rows[-1]["generation"] == generated[prompts[-1]]


def error_line(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("lora-lab-predict: error: ")
    return captured.err.strip()


def test_bad_input_is_one_line_and_exit_2(classifier, tmp_path, capsys):
    good = write_csv(tmp_path / "good.csv", {"text": ["a film"]})
    assert error_line(capsys, tmp_path / "nowhere", good).endswith(f"run='{tmp_path / 'nowhere'}': does not exist")
    (tmp_path / "empty").mkdir()
    assert "has no record.json" in error_line(capsys, tmp_path / "empty", good)
    assert "does not exist" in error_line(capsys, classifier, tmp_path / "missing.csv")
    review = write_csv(tmp_path / "review.csv", {"review": ["a film"]})
    assert "has no column 'text'" in error_line(capsys, classifier, review)
    empty = write_csv(tmp_path / "blank.csv", {"text": [""]})
    assert "row 1: no text in column 'text'" in error_line(capsys, classifier, empty)
    assert "--device='gpu': must be auto, cpu, cuda or cuda:N" in error_line(capsys, classifier, good, "--device", "gpu")
    assert "must end in .csv or .jsonl" in error_line(capsys, classifier, good, "--out", tmp_path / "p.parquet")
    (tmp_path / "good.predictions.csv").write_text("keep")
    assert "exists (--force replaces it)" in error_line(capsys, classifier, good)
    assert (tmp_path / "good.predictions.csv").read_text() == "keep"
    (tmp_path / "good.predictions.csv").unlink()
    conll = tmp_path / "x.conll"
    conll.write_text("a\nfilm\n")
    assert "CoNLL" in error_line(capsys, classifier, conll)
    # a run folder whose trained state is missing, or whose record did not complete
    broken = tmp_path / "broken"
    shutil.copytree(classifier, broken)
    (broken / records.STATE_FILE).unlink()
    assert "has no trainable.safetensors" in error_line(capsys, broken, good)
    record = json.loads((broken / records.RECORD_FILE).read_text())
    (broken / records.RECORD_FILE).write_text(json.dumps({**record, "status": "failed", "error": "x",
                                                          "error_kind": "exception"}))
    assert "did not complete" in error_line(capsys, broken, good)
    schema_1 = tmp_path / "schema_1"
    shutil.copytree(classifier, schema_1)
    record.pop("schema_version")
    (schema_1 / records.RECORD_FILE).write_text(json.dumps(record))
    assert "has a record of schema 1" in error_line(capsys, schema_1, good)


def test_force_replaces_and_help_shows_a_runnable_example(classifier, tmp_path, capsys):
    good = write_csv(tmp_path / "good.csv", {"text": ["a film"]})
    (tmp_path / "good.predictions.csv").write_text("old")
    assert main([str(classifier), str(good), "--force"]) == 0
    assert read_csv(tmp_path / "good.predictions.csv")[0]["text"] == "a film"
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "lora-lab-predict outputs/smoke-run reviews.csv" in capsys.readouterr().out


def test_conll_without_tags_reads_tokens_only(tmp_path):
    from lora_lab.data.conll import read_conll
    from lora_lab.errors import ConfigError

    words = tmp_path / "w.conll"
    words.write_text("we\nmet\n\nBob\n")
    assert read_conll(words, "file", require_tags=False).to_dict() == {"tokens": [["we", "met"], ["Bob"]]}
    with pytest.raises(ConfigError, match="line 1: expected a token and a tag"):
        read_conll(words, "file")
    mixed = tmp_path / "m.conll"
    mixed.write_text("we\tO\nmet\n")
    with pytest.raises(ConfigError, match="line 2: a token alone, unlike line 1; tag every token or none"):
        read_conll(mixed, "file", require_tags=False)
