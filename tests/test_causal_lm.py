"""Causal-LM fine-tuning as a task: prompt/response and plain-text data, packing, token-weighted
perplexity, generation metrics, the direction of minimised metrics, and one trainer run."""
from __future__ import annotations

import contextlib
import json
import math
import sys

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from lora_lab.analysis.example_metrics import metric_values
from lora_lab.config.validate import check_config
from lora_lab.data import lm_data
from lora_lab.data.loading import Collator, build_splits, cache_key, load_task_data
from lora_lab.data.sampling import evaluation_loader
from lora_lab.errors import ConfigError
from lora_lab.runtime.distributed import Distributed
from lora_lab.runtime.predictions import read_predictions
from lora_lab.tasks import generation_eval
from lora_lab.tasks.metrics import is_better
from lora_lab.tasks.task_types import TASK_TYPES, main_metric, objective
from lora_lab.trainer.evaluation import evaluate, gold_labels
from lora_lab.trainer.loop import global_loss

LM = TASK_TYPES["causal_lm"]
TINY_GPT2 = "model=tiny_gpt2"  # a random decoder with the embedded tokenizer
SEP = 102  # the MiniLM WordPiece vocabulary has no EOS: [SEP] ends every example
IGNORED = -100


@pytest.fixture(autouse=True)
def absl_logs_to_the_real_stderr():
    """rouge-score imports absl, whose log handler keeps the sys.stderr it finds at import: under pytest
    the capture's file, which absl closes when a later test's Hydra run reconfigures logging (and the
    capture of every later test with it). Pointed at the process's own stderr, absl closes nothing."""
    yield
    absl = sys.modules.get("absl.logging")
    if absl is not None:
        absl.get_absl_handler().python_handler.setStream(sys.__stderr__)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lora_lab.models.files import embedded_model_path

    return AutoTokenizer.from_pretrained(embedded_model_path("all-MiniLM-L6-v2"))


def jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def lm_config(tmp_path, *overrides, files=None):
    """A causal-LM config on local JSON Lines files (``files``: split -> rows), without a data cache."""
    given = [f"data.files.{split}={jsonl(tmp_path / f'{split}.jsonl', rows)}" for split, rows in (files or {}).items()]
    return compose_config(TINY_GPT2, "data=files", *given, "data.task_type=causal_lm", "data.cache_dir=null",
                          "logger=disabled", *overrides)


PAIRS = {"train": [{"prompt": "name[Aromi]", "response": "The Aromi is a pub."},
                   {"prompt": "name[Zizzi]", "response": "Zizzi is a cafe."}],
         "validation": [{"prompt": "name[Cotto]", "response": "Cotto is near the river."}],
         "test": [{"prompt": "name[Aromi]", "response": "The Aromi is a pub."}]}
PROMPT_IDS = [2171, 1031, 12098, 20936, 1033]  # "name[Aromi]\n"
RESPONSE_IDS = [1996, 12098, 20936, 2003, 1037, 9047, 1012]  # "The Aromi is a pub."


# ---------------------------------------------------------------- data

def test_prompt_tokens_are_masked_and_the_response_ends_with_the_end_of_text_token(tmp_path, tokenizer):
    cfg = lm_config(tmp_path, "data.prompt_column=prompt", "data.response_column=response", "data.dedupe=false",
                    files=PAIRS)
    data = load_task_data(cfg.data, tokenizer)
    example = data.splits["test"][0]
    assert example["input_ids"] == PROMPT_IDS + RESPONSE_IDS + [SEP]  # no [CLS], prompt + response + end
    assert example["labels"] == [IGNORED] * 5 + RESPONSE_IDS + [SEP]
    assert example["attention_mask"] == [1] * 13
    assert example["prompt_length"] == 5 and example["reference"] == "the aromi is a pub."
    assert data.label_names == [] and data.num_labels == 0
    assert data.splits["train"].column_names == ["input_ids", "attention_mask", "labels"]
    assert gold_labels(data.splits["test"], LM) == [8]  # 7 response tokens + the end, none of them first
    [prompt] = generation_eval.prompts_of(data.splits["test"])
    assert (prompt.text, prompt.ids, prompt.references) == ("name[Aromi]", PROMPT_IDS, ["the aromi is a pub."])
    cut = lm_data.encode(PROMPT_IDS, RESPONSE_IDS, SEP, max_length=7)
    assert cut["input_ids"] == PROMPT_IDS + RESPONSE_IDS[:2] and cut["labels"] == [IGNORED] * 5 + RESPONSE_IDS[:2]


def test_plain_text_labels_are_the_input_ids(tmp_path, tokenizer):
    rows = [{"text": f"review number {i} of a film", "label": i % 2} for i in range(10)]
    data = load_task_data(lm_config(tmp_path, "data.text_column=text", files={"train": rows}).data, tokenizer)
    for split in ("train", "validation", "test"):
        for example in data.splits[split]:
            assert example["labels"] == example["input_ids"] and example["input_ids"][-1] == SEP
            assert tokenizer.cls_token_id not in example["input_ids"]


def test_packing_cuts_the_joined_training_examples_into_full_blocks(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12]],
                                     "attention_mask": [[1] * 3, [1] * 4, [1] * 5],
                                     "labels": [[-100, 2, 3], [-100, -100, 6, 7], [8, 9, 10, 11, 12]]})
    packed = lm_data.pack(ds, max_length=5)
    assert packed["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    assert packed["labels"] == [[-100, 2, 3, -100, -100], [6, 7, 8, 9, 10], [11, 12]]
    assert packed["attention_mask"] == [[1] * 5, [1] * 5, [1] * 2]

    rows = [{"prompt": f"name[Place {i}]", "response": f"Place {i} is a pub in the centre."} for i in range(12)]
    overrides = ("data.prompt_column=prompt", "data.response_column=response", "data.max_length=16")
    cfg = lm_config(tmp_path, *overrides, files={"train": rows})
    packing = lm_config(tmp_path, *overrides, "data.packing=true", files={"train": rows})
    splits, _, _ = build_splits(cfg.data)
    plain, packed = lm_data.tokenise(splits, tokenizer, cfg.data), lm_data.tokenise(splits, tokenizer, packing.data)
    blocks = packed["train"]["input_ids"]
    assert all(len(b) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 16
    assert sum(blocks, []) == sum(plain["train"]["input_ids"], [])  # same tokens, same order
    assert sum(packed["train"]["labels"], []) == sum(plain["train"]["labels"], [])
    assert packed["test"][:] == plain["test"][:]  # evaluation splits are never packed
    cached = lm_config(tmp_path, *overrides, f"data.cache_dir={tmp_path}", files={"train": rows}).data
    assert cache_key(cached, tokenizer) != cache_key(OmegaConf.merge(cached, {"packing": True}), tokenizer)


# ---------------------------------------------------------------- perplexity

def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                                      eos_token_id=0)).eval()


def lm_split(lengths=(5, 9, 3, 12, 7), prompt=(2, 0, 1, 4, 3)):
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 100, (n,), generator=g).tolist() for n in lengths]
    labels = [[IGNORED] * p + row[p:] for row, p in zip(ids, prompt)]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
                                       "labels": labels})


def split_metrics(model, ds, batch_size):
    loader = evaluation_loader(ds, batch_size, Collator(0))
    metrics, report, _, _ = evaluate(model, loader, gold_labels(ds, LM), torch.device("cpu"), contextlib.nullcontext,
                                  LM, [])
    assert report == {}
    return metrics


def test_perplexity_is_the_exp_of_the_token_weighted_mean_loss(one_torch_thread):
    model, ds = tiny_gpt2(), lm_split()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in ds:
            logp = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0], -1)
            for t in range(1, len(row["labels"])):
                if row["labels"][t] != IGNORED:
                    nll -= float(logp[t - 1, row["labels"][t]])
                    tokens += 1
    metrics = split_metrics(model, ds, batch_size=2)
    assert tokens == sum(gold_labels(ds, LM)) == 25
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_the_split_loss_does_not_depend_on_the_batch_size(one_torch_thread):
    model, ds = tiny_gpt2(1), lm_split()
    losses = [split_metrics(model, ds, size)["loss"] for size in (1, 2, 5)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)


class TwoRanks(Distributed):
    """Rank 0 of two, whose peer's micro-batch holds ``other`` tokens with mean loss ``other_loss``."""

    def __init__(self, other: int, other_loss: float):
        super().__init__(rank=0, world_size=2)
        object.__setattr__(self, "peer", (other, other_loss))

    def sum(self, values):
        other, loss = self.peer
        return [values[0] + other, values[1] + loss * other, values[2]]


def test_a_ranks_loss_is_weighted_by_its_predicted_tokens():
    labels = torch.tensor([[IGNORED, IGNORED, 5, 6, 7], [8, 9, IGNORED, IGNORED, IGNORED]])  # 3 + 1 predicted
    value, weight = global_loss(torch.tensor(2.0), {"labels": labels}, 2, LM, TwoRanks(other=12, other_loss=1.0))
    assert value == pytest.approx((2.0 * 4 + 1.0 * 12) / 16)
    assert weight == pytest.approx(4 * 2 / 16)


# ---------------------------------------------------------------- generation metrics

def test_identical_text_scores_full_bleu_and_rouge_l():
    text = "the aromi is a pub in the city centre"
    assert generation_eval.score([text], [[text]]) == {"bleu": pytest.approx(100.0), "rouge_l": pytest.approx(1.0)}
    bad = generation_eval.score(["a cafe"], [[text]])
    assert bad["bleu"] < 1 and bad["rouge_l"] < 0.5


def test_examples_sharing_a_prompt_are_generated_once_against_all_their_references():
    references = ["aromi is a pub near the river", "zizzi is a cafe", "the aromi pub is cheap"]
    prompts = generation_eval.group_prompts(["mr a", "mr b", "mr a"], [[1], [2], [1]], references)
    assert [(p.text, p.ids, p.references) for p in prompts] == [
        ("mr a", [1], ["aromi is a pub near the river", "the aromi pub is cheap"]), ("mr b", [2], ["zizzi is a cafe"])]
    assert [p.text for p in generation_eval.group_prompts(["x", "y", "x", "z"], [[1]] * 4, ["r"] * 4, limit=2)] == \
        ["x", "y"]
    # one generation per prompt: matching either reference of a prompt is a perfect score
    refs = [p.references for p in prompts]
    scores = generation_eval.score(["the aromi pub is cheap", "zizzi is a cafe"], refs)
    assert scores["bleu"] == pytest.approx(100.0) and scores["rouge_l"] == pytest.approx(1.0)
    single = generation_eval.score(["the aromi pub is cheap", "zizzi is a cafe"], [refs[0][:1], refs[1]])
    assert single["bleu"] < 100 and single["rouge_l"] < 1


# ---------------------------------------------------------------- errors and direction

def one_line_error(cfg) -> str:
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_prompt_column_needs_a_response_column_and_the_reverse(tmp_path):
    files = {"train": PAIRS["train"]}
    assert one_line_error(lm_config(tmp_path, "data.prompt_column=prompt", files=files)).startswith(
        "data.prompt_column='prompt': needs data.response_column")
    assert one_line_error(lm_config(tmp_path, "data.response_column=response", files=files)).startswith(
        "data.response_column='response': needs data.prompt_column")
    assert "{prompt}" in one_line_error(lm_config(tmp_path, "data.prompt_column=prompt",
                                                  "data.response_column=response", "data.prompt_template='x{y}'",
                                                  files=files))


def test_generation_metrics_need_generation_and_its_libraries(tmp_path, monkeypatch):
    base = ("data.prompt_column=prompt", "data.response_column=response")
    files = {"train": PAIRS["train"]}
    assert one_line_error(lm_config(tmp_path, *base, "data.main_metric=bleu", files=files)).startswith(
        "data.main_metric='bleu': is scored on generated text: it needs trainer.generation.enabled=true")
    check_config(lm_config(tmp_path, *base, "data.main_metric=bleu", "trainer.generation.enabled=true", files=files))
    assert "causal_lm with data.prompt_column" in one_line_error(
        compose_config("logger=disabled", "trainer.generation.enabled=true"))
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # as if not installed
    message = one_line_error(lm_config(tmp_path, *base, "trainer.generation.enabled=true", files=files))
    assert message == ("trainer.generation.enabled=True: needs sacrebleu: "
                       'pip install "lora_lab[generation]"')


def test_lower_perplexity_is_better_and_sweeps_maximise_its_negation():
    assert main_metric(compose_config("data=e2e_nlg").data) == "perplexity"
    assert is_better("perplexity", 12.0, 15.0) and not is_better("perplexity", 15.0, 12.0)
    assert is_better("accuracy", 0.8, 0.7) and not is_better("perplexity", math.nan, 12.0)
    assert is_better("perplexity", 30.0, None) and not LM.higher_is_better("loss") and LM.higher_is_better("bleu")
    assert objective("perplexity", 12.0) == -12.0 and objective("bleu", 30.0) == 30.0


def test_tables_choose_and_bold_the_lowest_perplexity(tmp_path):
    from lora_lab.analysis.tables import build_table, collect_runs, to_markdown
    from lora_lab.runtime.records import write_json

    def record(lr, seed, val, test, method):
        config = {"method": method, "seed": seed, "trainer": {"lr": lr}, "data": {"name": "e2e_nlg"}}
        row = {"epoch": 1, "validation/perplexity": val, "test/perplexity": test}
        return {"status": "completed", "config": config, "best": row, "last": row,
                "task": {"name": "e2e_nlg", "main_metric": "perplexity"},
                "parameters": {"trainable": 10, "total": 100}, "measurements": {}}

    lora = {"name": "lora", "r": 8, "alpha": 8, "targets": ["q", "v"], "rslora": False, "init": "kaiming"}
    records = [record(1e-3, 0, 9.0, 9.5, lora), record(1e-2, 0, 7.0, 7.5, lora), record(1e-3, 0, 8.0, 8.5,
                                                                                           {"name": "full"})]
    for i, rec in enumerate(records):
        write_json(tmp_path / f"{i}_job" / "record.json", rec)
    table = build_table(collect_runs([tmp_path], None, "best"), tune=["trainer.lr"])
    cell = table.cells[("LoRA r=8 α=8 (q+v)", "e2e_nlg")]
    assert cell.chosen == {"trainer.lr": 1e-2} and cell.value == 7.5
    assert "**7.5**" in to_markdown(table) and "**8.5**" not in to_markdown(table)  # perplexity as it is, not x100


# ---------------------------------------------------------------- the trainer

def smoke_config(tmp_path, *overrides):
    rows = [{"prompt": f"name[Place {i % 5}], food[thai]", "response": f"Place {i % 5} serves thai food {i}."}
            for i in range(16)]
    return lm_config(tmp_path, "data.prompt_column=prompt", "data.response_column=response",
                     "data.max_length=32", "trainer.epochs=1", "trainer.batch_size=4", "trainer.progress_bar=false",
                     "trainer.latency_repeats=1", "trainer.generation.enabled=true",
                     "trainer.generation.max_new_tokens=4", "trainer.generation.keep_examples=2", "method=lora",
                     *overrides, files={"train": rows})


def test_a_causal_lm_trains_and_records_perplexity_and_generation_metrics(tmp_path, monkeypatch, one_torch_thread):
    from lora_lab.runtime import records
    from lora_lab.trainer import evaluation, train

    run_dir = tmp_path / "run"
    record = train.run_training(smoke_config(tmp_path, "trainer.keep_checkpoint=true"), run_dir)
    best = records.load_record(run_dir)["best"]
    for split in ("validation", "test"):
        assert math.isfinite(best[f"{split}/perplexity"]) and best[f"{split}/perplexity"] > 1
        assert best[f"{split}/perplexity"] == pytest.approx(math.exp(best[f"{split}/loss"]))
    assert 0 <= best["test/bleu"] <= 100 and 0 <= best["test/rouge_l"] <= 1
    assert "validation/bleu" not in best  # generation.splits=[test] and the main metric is perplexity
    assert record["task"]["main_metric"] == "perplexity" and record["task"]["label_names"] == []
    baseline = record["baseline"]
    assert baseline["name"] == "pre-trained model"
    assert set(baseline["test"]) == {"loss", "perplexity", "bleu", "rouge_l"}
    assert len(record["generations"]["best"]["test"]) == 2 and len(record["generations"]["baseline"]["test"]) == 2
    assert set(record["generations"]["best"]["test"][0]) == {"prompt", "references", "generation"}
    # per-example summed losses and token counts give back the best epoch's test perplexity
    found = read_predictions(run_dir / records.PREDICTIONS_FILE)
    assert found.task_type == "causal_lm" and found.epoch == record["best"]["epoch"]
    assert float(metric_values("causal_lm", "perplexity", found.fields)) == pytest.approx(best["test/perplexity"], rel=1e-5)

    # resumed from its checkpoint, the run reads the pre-trained model's metrics instead of evaluating it again
    monkeypatch.setattr(evaluation, "pretrained_baseline", lambda *a, **k: pytest.fail("baseline evaluated again"))
    again = train.run_training(smoke_config(tmp_path, "trainer.keep_checkpoint=true"), run_dir)
    assert again["baseline"] == baseline
