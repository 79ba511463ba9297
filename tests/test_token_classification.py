"""Token classification (NER): sub-token label alignment, seqeval entity metrics against hand-computed
values, data checks, and every method training a tiny token classifier end to end."""
import pytest
import torch
from conftest import compose_config

from lora_lab.analysis.example_metrics import metric_values
from lora_lab.data.loading import Collator, load_task_data
from lora_lab.data.token_data import IGNORED, align_labels, tag_names
from lora_lab.errors import ConfigError
from lora_lab.methods import available_methods, describe_method
from lora_lab.models.loading import load_tokenizer
from lora_lab.runtime import records
from lora_lab.runtime.predictions import read_predictions
from lora_lab.runtime.rebuild import load_run_deltas
from lora_lab.tasks.metrics import entity_metrics
from lora_lab.tasks.task_types import TASK_TYPES
from lora_lab.trainer.train import run_training

NER = TASK_TYPES["token_classification"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config().model)


def write_conll(path, sentences):
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sentences) + "\n")
    return path


def ner_sentences(n=60):
    """Sentences where a capitalised name after "met" is a person and after "in" a location."""
    people, places = ["Alice", "Bob", "Carol Smith"], ["Paris", "New York", "Oslo"]
    out = []
    for i in range(n):
        person, place = people[i % 3].split(), places[(i // 3) % 3].split()
        words = ["we", "met"] + person + ["in"] + place + ["on", f"day{i}"]
        tags = (["O", "O"] + ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O"] + ["B-LOC"]
                + ["I-LOC"] * (len(place) - 1) + ["O", "O"])
        out.append(list(zip(words, tags)))
    return out


def ner_cfg(tmp_path, *overrides, n=60):
    train = write_conll(tmp_path / "train.conll", ner_sentences(n))
    return compose_config("experiment=smoke", "logger=disabled", f"data.cache_dir={tmp_path / 'cache'}", "data=files",
                          "data.task_type=token_classification", f"data.files.train={train}", *overrides)


def test_first_sub_token_carries_the_label(tokenizer):
    words = ["Hello", "Washingtonians", "!"]
    enc = tokenizer(words, is_split_into_words=True)
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert pieces[:4] == ["[CLS]", "hello", "washington", "##ians"]  # the hand-made example's split
    labels = align_labels(enc.word_ids(), [0, 3, 0])
    assert labels == [IGNORED, 0, 3, IGNORED, 0, IGNORED]


def test_align_labels_by_hand():
    assert align_labels([None, 0, 0, 1, 2, 2, 2, None], [5, 6, 7]) == [IGNORED, 5, IGNORED, 6, 7, IGNORED, IGNORED,
                                                                        IGNORED]


def test_entity_metrics_against_hand_computed_values():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-LOC"]]
    metrics, report = entity_metrics(gold, pred)
    # gold entities: PER(0-1), LOC(3), LOC(s2 0), PER(s2 2) = 4; predicted: PER, LOC, LOC = 3; correct: PER, LOC = 2
    assert metrics["entity_precision"] == pytest.approx(2 / 3)
    assert metrics["entity_recall"] == pytest.approx(2 / 4)
    assert metrics["entity_f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert metrics["token_accuracy"] == pytest.approx(5 / 7)
    assert report["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["LOC"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}


def test_a_wrong_boundary_is_a_wrong_entity():
    metrics, _ = entity_metrics([["B-PER", "I-PER"]], [["B-PER", "O"]])
    assert metrics["entity_f1"] == 0.0 and metrics["token_accuracy"] == 0.5


def test_words_cut_by_max_length_count_as_o():
    gold = [[TAGS.index("B-PER"), 0, TAGS.index("B-LOC")]]
    metrics, _ = NER.score(gold, [[TAGS.index("B-PER")]], TAGS)  # the last two words were truncated
    assert metrics["entity_recall"] == 0.5 and metrics["entity_precision"] == 1.0
    assert metrics["token_accuracy"] == pytest.approx(2 / 3)


def test_all_o_baseline_scores_zero_f1():
    gold = [[1, 2, 0], [0, 3]]
    metrics, _ = NER.score(gold, NER.baseline_predictions(gold, TAGS), TAGS)
    assert metrics["entity_f1"] == 0.0 and metrics["token_accuracy"] == pytest.approx(2 / 5)


def test_tag_order():
    assert tag_names({"I-PER", "O", "B-LOC", "B-PER"}) == ["O", "B-LOC", "B-PER", "I-PER"]


def test_conll_file_is_tokenised_with_aligned_labels(tmp_path, tokenizer):
    cfg = ner_cfg(tmp_path)
    data = load_task_data(cfg.data, tokenizer)
    assert data.label_names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"] and data.task.head == "token"
    row = data.splits["train"][0]
    words = [w for w in row["word_labels"]]
    labelled = [label for label in row["labels"] if label != IGNORED]
    assert labelled == words  # one label per word, in order (no word was cut at this length)
    assert len(row["labels"]) == len(row["input_ids"]) and row["labels"][0] == IGNORED
    batch = Collator(data.pad_token_id)([data.splits["train"][i] for i in range(4)])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORED).all()


@pytest.mark.parametrize("sentences, names, problem", [
    ([[("a", "O"), ("b", "PER")]] * 30, None, "data.label_column='label': tag 'PER' is not in BIO form"),
    ([[("a", "B-X"), ("b", "I-X")]] * 30, "[B-X,I-X]", "data.label_names=.*has no 'O' tag"),
    ([[("a", "O"), ("b", "B-Y")]] * 30, "[O,B-X,I-X]", "tag 'B-Y' is not one of the 3 tags"),
])
def test_bad_tags(tmp_path, tokenizer, sentences, names, problem):
    train = write_conll(tmp_path / "t.conll", sentences)
    cfg = compose_config("data=files", "data.task_type=token_classification", f"data.files.train={train}",
                         f"data.cache_dir={tmp_path / 'c'}", "data.dedupe=false",
                         *([f"data.label_names={names}"] if names else []))
    with pytest.raises(ConfigError, match=problem):
        load_task_data(cfg.data, tokenizer)


def test_conll_file_needs_the_token_task(tmp_path, tokenizer):
    train = write_conll(tmp_path / "t.conll", ner_sentences(5))
    cfg = compose_config("data=files", f"data.files.train={train}")
    with pytest.raises(ConfigError, match="needs data.task_type=token_classification"):
        load_task_data(cfg.data, tokenizer)


def test_a_classification_file_is_not_token_data(tmp_path, tokenizer):
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(30)))
    cfg = compose_config("data=files", "data.task_type=token_classification", f"data.files.train={tmp_path / 't.csv'}",
                         f"data.cache_dir={tmp_path / 'c'}")
    with pytest.raises(ConfigError, match="not a list of words"):
        load_task_data(cfg.data, tokenizer)


def test_main_metric_must_belong_to_the_task():
    with pytest.raises(ConfigError, match=r"data.main_metric='accuracy': must be one of \['entity_f1'"):
        run_training(compose_config("data.task_type=token_classification", "data.main_metric=accuracy"), "unused")


def test_pooling_does_not_apply_to_tagging(tmp_path):
    with pytest.raises(ConfigError, match="model.pooling='mean'"):
        run_training(ner_cfg(tmp_path, "model.pooling=mean"), tmp_path / "run")


@pytest.mark.parametrize("method", [*available_methods(), "head method.top_layers=1",
                                    "adapter method.variant=pfeiffer"])
def test_every_method_trains_a_token_classifier(tmp_path, method):
    name, *extra = method.split()
    run_dir = tmp_path / "run"
    record = run_training(ner_cfg(tmp_path, f"method={name}", *extra), run_dir)
    assert record["task"]["type"] == "token_classification" and record["task"]["main_metric"] == "entity_f1"
    assert record["baseline"] == {"name": "all O", "test": {**record["baseline"]["test"], "entity_f1": 0.0}}
    best = record["best"]
    assert set(best) >= {"validation/entity_f1", "test/entity_f1", "test/token_accuracy"}
    assert set(record["reports"]["best"]["test"]) >= {"PER", "LOC", "micro avg"}
    p = record["parameters"]
    assert p["trainable"] == p["trainable_method"] + p["trainable_head"] + p["trainable_other"]
    hidden, tags = 32, 5
    assert p["trainable_head"] == hidden * tags + tags  # the token head: one linear layer, no pooler
    state = records.load_file(str(run_dir / records.STATE_FILE))
    assert sum(t.numel() for t in state.values()) == p["trainable"]
    deltas = load_run_deltas(run_dir)
    assert bool(deltas) is describe_method(record["config"]["method"]).adapts_matrices()


def test_lora_learns_the_toy_entities(tmp_path):
    """A tiny random model learns the toy pattern well enough to beat the all-O baseline."""
    cfg = ner_cfg(tmp_path, "method=full", "trainer.epochs=6", "trainer.lr=3e-3", n=120)
    record = run_training(cfg, tmp_path / "run")
    assert record["best"]["test/entity_f1"] > 0.5 > record["baseline"]["test"]["entity_f1"]
    assert record["best"]["test/token_accuracy"] > record["baseline"]["test"]["token_accuracy"]
    # the per-sentence entity counts give back the best epoch's test scores
    found = read_predictions(tmp_path / "run" / records.PREDICTIONS_FILE)
    assert found.task_type == "token_classification" and found.epoch == record["best"]["epoch"]
    entry = record["files"][records.PREDICTIONS_FILE]
    assert {k: entry[k] for k in ("epoch", "holds")} == {"epoch": record["best"]["epoch"], "holds": "best"}
    assert entry["sha256"] == records.file_sha256(tmp_path / "run" / records.PREDICTIONS_FILE)
    for metric in ("entity_f1", "token_accuracy"):
        assert float(metric_values(found.task_type, metric, found.fields)) == pytest.approx(record["best"][f"test/{metric}"])


def test_same_seed_same_entity_metrics(tmp_path):
    a = run_training(ner_cfg(tmp_path, "method=lora", "seed=2"), tmp_path / "a")
    b = run_training(ner_cfg(tmp_path, "method=lora", "seed=2"), tmp_path / "b")
    assert a["epochs"] == b["epochs"] and a["reports"] == b["reports"]


def test_token_head_gradients_only_where_trained(tmp_path):
    from lora_lab.methods import build_method
    from lora_lab.models.loading import load_model

    cfg = compose_config("model=tiny", "method=lora")
    model = load_model(cfg.model, 5, TAGS, task="token")
    method = build_method(cfg.method)
    method.apply(model)
    ids = torch.randint(5, 1000, (2, 7))
    labels = torch.full((2, 7), IGNORED)
    labels[:, 1:4] = torch.tensor([1, 2, 0])
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora" in n or n.startswith("classifier.") for n in trained)
    assert {"classifier.weight", "classifier.bias"} <= trained


def test_json_lines_with_word_and_tag_lists(tmp_path, tokenizer):
    import json

    rows = [{"words": [w for w, _ in s], "tags": [t for _, t in s]} for s in ner_sentences(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config("data=files", "data.task_type=token_classification", f"data.files.train={path}",
                         "data.text_column=words", "data.label_column=tags", f"data.cache_dir={tmp_path / 'c'}")
    data = load_task_data(cfg.data, tokenizer)
    assert data.label_names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert sum(len(v) for v in data.splits.values()) == 40


def test_hub_style_class_label_tags(tmp_path, tokenizer, monkeypatch):
    """conll2003-style data: a column of word lists and a sequence of ClassLabel tag ids."""
    import datasets

    from lora_lab.data import loading as data_module

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    sentences = ner_sentences(40)
    table = {"tokens": [[w for w, _ in s] for s in sentences],
             "ner_tags": [[names.index(t) for _, t in s] for s in sentences]}
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features)})
    monkeypatch.setattr(data_module, "_load_raw", lambda cfg: (raw, None))
    cfg = compose_config("data=hub", "data.path=eriktks/conll2003", "data.task_type=token_classification",
                         "data.text_column=tokens", "data.label_column=ner_tags", "data.splits.test=null",
                         f"data.cache_dir={tmp_path / 'c'}")
    data = load_task_data(cfg.data, tokenizer)
    assert data.label_names == names  # the ClassLabel's own order, ids kept
    row = data.splits["train"][0]
    assert [x for x in row["labels"] if x != IGNORED] == row["word_labels"]
    assert set(t for s in data.splits["train"]["word_labels"] for t in s) <= set(range(5))


def test_tag_ids_without_names_are_refused(tmp_path, tokenizer):
    import json

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"tokens": ["a", "b"], "label": [0, i % 2]}) + "\n" for i in range(30)))
    cfg = compose_config("data=files", "data.task_type=token_classification", f"data.files.train={path}",
                         "data.text_column=tokens", f"data.cache_dir={tmp_path / 'c'}", "data.dedupe=false")
    with pytest.raises(ConfigError, match="data.label_names=None: must name the tags"):
        load_task_data(cfg.data, tokenizer)


def test_a_train_split_without_entities_is_refused(tmp_path):
    train = write_conll(tmp_path / "t.conll", [[("a", "O"), (f"w{i}", "O")] for i in range(40)])
    cfg = compose_config("experiment=smoke", "logger=disabled", "data=files", "data.task_type=token_classification",
                         f"data.files.train={train}", f"data.cache_dir={tmp_path / 'c'}")
    with pytest.raises(ConfigError, match="the train split has no entity: every tag is O"):
        run_training(cfg, tmp_path / "run")
