from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from warm_cli import WarmCli

import lora_lab.config.compose  # noqa: F401 - registers the resolvers the configs use (${pick:}, ${run_key:}, ...)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # and so do the commands they start
    torch.set_num_threads(1)

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_config(*overrides: str):
    """The job config a run of these overrides gets, without Hydra's own node; ``${hydra:...}``
    interpolations (e.g. the runtime's config choices) resolve as in a run."""
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def method_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture
def one_torch_thread():
    """Small matrices: one thread avoids thread hand-off costs on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bert(layers: int = 2, hidden: int = 32, num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def tiny_roberta(layers: int = 2, hidden: int = 32):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=2 * hidden, max_position_embeddings=70, num_labels=2)
    return RobertaForSequenceClassification(config).eval()


def tiny_distilbert(layers: int = 2, hidden: int = 32):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=hidden, n_layers=layers, n_heads=4, hidden_dim=2 * hidden,
                              max_position_embeddings=64, num_labels=2)
    return DistilBertForSequenceClassification(config).eval()


def batch(seed: int = 1, size: int = 4, length: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def inputs():
    return batch()


def pytest_collection_finish(session):
    """Every test module is imported by now: move what exists (mostly modules) out of the garbage
    collector's reach, so that the trainer's own gc.collect() calls scan only what the tests create."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def warm_cli(tmp_path_factory):
    """``lora-lab`` commands as forked processes of one warm interpreter (tests/warm_cli.py)."""
    cli = WarmCli(tmp_path_factory.mktemp("warm_cli"))
    yield cli
    cli.close()


def pytest_collection_modifyitems(config, items):
    """Modules with slow (real-model) tests first, each module kept together: with ``-n 2`` the longest
    tests start early and the short ones fill in, so the workers finish close together."""
    has_slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in has_slow)
