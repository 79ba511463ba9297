"""Each task type declares its metrics, its main metric and its baseline in one place."""
import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from lora_lab.errors import ConfigError
from lora_lab.tasks.task_types import TASK_TYPES, describe, main_metric, task_type


def data(**keys):
    return OmegaConf.create(keys)


@pytest.mark.parametrize("kind, metric", [("classification", "accuracy"), ("regression", "pearson"),
                                          ("token_classification", "entity_f1")])
def test_the_main_metric_defaults_to_the_types_own(kind, metric):
    assert main_metric(data(task_type=kind)) == metric
    assert TASK_TYPES[kind].metrics[0] == metric


def test_a_data_set_may_choose_another_metric_of_its_type():
    assert main_metric(data(task_type="classification", main_metric="mcc")) == "mcc"
    assert main_metric(compose_config("data=sms_spam").data) == "macro_f1"
    assert main_metric(compose_config("data=wnut16").data) == "entity_f1"
    assert main_metric(compose_config("task=cola").data) == "mcc"
    with pytest.raises(ConfigError, match=r"data.main_metric='entity_f1': must be one of \['accuracy'"):
        main_metric(data(main_metric="entity_f1"))


def test_unknown_task_type():
    with pytest.raises(ConfigError, match="data.task_type='ner'"):
        task_type(data(task_type="ner"))


def test_majority_class_baseline():
    kind = TASK_TYPES["classification"]
    gold = [0, 1, 1, 2, 1]
    metrics, _ = kind.score(gold, kind.baseline_predictions(gold, ["a", "b", "c"]), ["a", "b", "c"])
    assert metrics["accuracy"] == 0.6 and metrics["mcc"] == 0.0


def test_constant_baseline_has_no_correlation():
    kind = TASK_TYPES["regression"]
    gold = [0.5, 1.0, 4.0]
    metrics, _ = kind.score(gold, kind.baseline_predictions(gold, ["score"]), ["score"])
    assert metrics == {"pearson": 0.0, "spearman": 0.0}


def test_the_record_block_names_the_task():
    block = describe(compose_config("data=trec6").data, ["ABBR", "DESC"])
    assert block == {"name": "trec6", "type": "classification", "metrics": ["accuracy", "macro_f1", "mcc"],
                     "main_metric": "accuracy", "label_names": ["ABBR", "DESC"]}
    assert describe(compose_config("task=mrpc").data, ["0", "1"])["name"] == "mrpc"
