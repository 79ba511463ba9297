import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONF, batch, compose_config, method_cfg, tiny_bert, tiny_distilbert, tiny_roberta
from omegaconf import OmegaConf
from torch.nn import functional as F

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.models.architectures import head_parameter_names, layer_stack, resolve_targets
from lora_lab.models.files import embedded_model_path
from lora_lab.models.loading import load_model, pooling_of
from lora_lab.models.pooling import PooledClassifier, declared_pooling, resolve_pooling
from lora_lab.runtime.measure import parameter_counts

MINILM = "all-MiniLM-L6-v2"
CLASSIFIER = {"classifier.weight", "classifier.bias"}


def tiny(pooling: str, num_labels: int = 2, task: str = "sequence", seed: int = 0):
    cfg = compose_config("model=tiny", f"model.pooling={pooling}")
    torch.manual_seed(seed)
    return load_model(cfg.model, num_labels, task=task).eval()


def masked_mean(hidden, mask):
    return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


# ---------------------------------------------------------------- what each pooling computes

def test_mean_pooling_is_the_mean_over_the_attention_mask(inputs):
    model = tiny("mean", num_labels=3)
    assert isinstance(model, PooledClassifier)
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = model.bert(**inputs).last_hidden_state
        expected = model.classifier(masked_mean(hidden, inputs["attention_mask"]))
        unmasked = model.classifier(hidden.mean(1))
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits[0], unmasked[0], atol=1e-4)  # row 0 is padded from position 7


def test_mean_pooling_ignores_padded_tokens(inputs):
    model = tiny("mean")
    changed_pad, changed_word = dict(inputs), dict(inputs)
    changed_pad["input_ids"] = inputs["input_ids"].clone()
    changed_pad["input_ids"][0, 8] += 1  # a padded position of row 0
    changed_word["input_ids"] = inputs["input_ids"].clone()
    changed_word["input_ids"][0, 3] += 1
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(model(**changed_pad).logits, logits)
        assert not torch.allclose(model(**changed_word).logits[0], logits[0], atol=1e-5)


def test_cls_pooling_is_the_first_token(inputs):
    model = tiny("cls", num_labels=3)
    with torch.no_grad():
        hidden = model.bert(**inputs).last_hidden_state
        torch.testing.assert_close(model(**inputs).logits, model.classifier(hidden[:, 0]))
        assert not torch.allclose(model(**inputs).logits, model.classifier(hidden[:, 1]), atol=1e-4)


def test_pooler_is_the_hugging_face_classifier_as_before(inputs):
    from transformers import BertConfig, BertForSequenceClassification

    for pooling in ("pooler", "auto"):  # a random model declares no pooling
        model = tiny(pooling, num_labels=3)
        assert type(model) is BertForSequenceClassification
        t = compose_config("model=tiny").model
        torch.manual_seed(0)
        before = BertForSequenceClassification(BertConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_positions, num_labels=3)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, before(**inputs).logits, rtol=0, atol=0)


def test_pooled_classifier_builds_on_a_hugging_face_backbone(inputs):
    hf = tiny_bert(num_labels=3)
    model = PooledClassifier(hf.bert, "cls").eval()
    model.classifier.load_state_dict(hf.classifier.state_dict())
    with torch.no_grad():
        hidden = hf.bert(**inputs).last_hidden_state
        torch.testing.assert_close(model(**inputs).logits, hf.classifier(hidden[:, 0]))


def test_regression_uses_mean_squared_error(inputs):
    model = tiny("mean", num_labels=1)
    targets = torch.tensor([0.5, 1.0, 4.0, 2.5])
    out = model(**inputs, labels=targets)
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), targets))


def test_classification_uses_cross_entropy(inputs):
    model = tiny("cls", num_labels=3)
    labels = torch.tensor([0, 2, 1, 2])
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_classifier_is_initialised_like_hugging_face():
    model = PooledClassifier(tiny_bert(hidden=64).bert, "mean")
    assert torch.count_nonzero(model.classifier.bias) == 0
    assert abs(model.classifier.weight.std().item() - model.config.initializer_range) < 0.01
    assert model.dropout.p == model.config.hidden_dropout_prob


def test_labels_are_in_the_config():
    cfg = compose_config("model=tiny", "model.pooling=mean")
    model = load_model(cfg.model, 3, ["neg", "neutral", "pos"])
    assert model.config.num_labels == 3 and model.num_labels == 3
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert model.config.label2id == {"neg": 0, "neutral": 1, "pos": 2}


# ---------------------------------------------------------------- parameters and methods

@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_no_pooler_parameters(pooling):
    model = tiny(pooling)
    names = {n for n, _ in model.named_parameters()}
    assert not any("pooler" in n for n in names)
    hf_names = {n for n, _ in tiny_bert().named_parameters()}
    assert names == {n for n in hf_names if ".pooler." not in n}  # the same names as HF's classifier


@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta, tiny_distilbert])
def test_architecture_helpers_work_on_pooled_classifiers(make, inputs):
    hf = make()
    prefix = hf.base_model_prefix
    model = PooledClassifier(getattr(hf, prefix), "mean").eval()
    assert model.base_model_prefix == prefix and model.config is getattr(hf, prefix).config
    assert head_parameter_names(model) == CLASSIFIER
    stack_name, layers = layer_stack(model)
    assert stack_name.startswith(prefix + ".") and len(layers) == 2
    targets = resolve_targets(model, ["q", "v"])
    assert all(n.startswith(prefix + ".") for names in targets.values() for n in names)
    assert len(targets["q"]) == 2
    with torch.no_grad():
        assert model(**inputs).logits.shape == (4, 2)


def test_head_only_trains_the_classifier_alone(inputs):
    model = tiny("mean", num_labels=3)
    method = build_method(method_cfg("head"))
    method.apply(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == CLASSIFIER
    assert sum(trainable.values()) == 32 * 3 + 3
    assert parameter_counts(model, method)["trainable"] == 32 * 3 + 3
    model.train()
    model(**inputs, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == CLASSIFIER


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_every_method_trains_a_mean_pooled_model(name, inputs):
    model = tiny("mean")
    method = build_method(method_cfg(name))
    method.apply(model)
    model.train()
    model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and {n for n, p in params.items() if p.grad is not None} == trained
    counts = parameter_counts(model, method)
    assert counts["trainable"] == sum(params[n].numel() for n in trained)
    method_names, head_names = method.method_parameter_names(model), head_parameter_names(model)
    assert head_names == CLASSIFIER
    assert counts["trainable_method"] == sum(params[n].numel() for n in trained & method_names)
    assert counts["trainable_head"] == sum(params[n].numel() for n in trained & head_names - method_names)


# ---------------------------------------------------------------- what auto resolves to

def copy_model_config(folder: Path, with_pooling: bool) -> Path:
    source = Path(embedded_model_path(MINILM))
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    if with_pooling:
        shutil.copy(source / "modules.json", folder / "modules.json")
        shutil.copytree(source / "1_Pooling", folder / "1_Pooling")
    return folder


def hub_cfg(folder: Path, pooling: str = "auto"):
    return compose_config("model=hub", f"model.name={folder}", f"model.pooling={pooling}").model


def test_auto_is_mean_for_the_embedded_minilm():
    assert declared_pooling(embedded_model_path(MINILM)) == "mean"
    cfg = compose_config("model=minilm").model
    assert cfg.pooling == "auto"
    assert resolve_pooling(cfg) == "mean" and pooling_of(cfg) == "mean"


def test_auto_reads_only_the_pooling_config(tmp_path):
    folder = copy_model_config(tmp_path / "m", with_pooling=True)  # no weights
    assert resolve_pooling(hub_cfg(folder)) == "mean"


def test_auto_without_a_pooling_config_is_the_model_head(tmp_path):
    folder = copy_model_config(tmp_path / "m", with_pooling=False)
    assert declared_pooling(folder) is None
    assert resolve_pooling(hub_cfg(folder)) == "pooler"
    assert resolve_pooling(compose_config("model=hub", "model.name=org/some-model").model) == "pooler"
    assert resolve_pooling(compose_config("model=tiny").model) == "pooler"


def test_pooling_config_found_through_modules_json(tmp_path):
    folder = copy_model_config(tmp_path / "m", with_pooling=True)
    (folder / "1_Pooling").rename(folder / "pool")
    assert declared_pooling(folder) is None  # modules.json still names 1_Pooling
    modules = json.loads((folder / "modules.json").read_text())
    for entry in modules:
        if entry["path"] == "1_Pooling":
            entry["path"] = "pool"
    (folder / "modules.json").write_text(json.dumps(modules))
    config = json.loads((folder / "pool" / "config.json").read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "pool" / "config.json").write_text(json.dumps(config))
    assert declared_pooling(folder) == "cls"


@pytest.mark.parametrize("modes,shown", [({"pooling_mode_max_tokens": True}, "max"),
                                         ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len"),
                                         ({"pooling_mode_cls_token": True}, "cls + mean")])
def test_unsupported_declared_pooling_is_refused(tmp_path, modes, shown):
    folder = copy_model_config(tmp_path / "m", with_pooling=True)
    path = folder / "1_Pooling" / "config.json"
    config = json.loads(path.read_text())
    config.update(pooling_mode_mean_tokens="cls" in shown, **modes)
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"model\.pooling='auto': .*declares {re.escape(shown)} pooling;.*"
                                          r"model\.pooling=cls\|mean\|pooler") as error:
        resolve_pooling(hub_cfg(folder))
    assert error.value.key == "model.pooling"
    assert resolve_pooling(hub_cfg(folder, "mean")) == "mean"  # an explicit choice needs no declaration


def test_explicit_pooling_passes_through():
    for pooling in ("cls", "mean", "pooler"):
        assert resolve_pooling(compose_config(f"model.pooling={pooling}").model) == pooling


def test_bad_pooling_value():
    cfg = compose_config("model=tiny", "model.pooling=max").model
    with pytest.raises(ConfigError, match=r"model\.pooling='max': must be one of \['auto', 'cls', 'mean', 'pooler'\]"):
        resolve_pooling(cfg)
    with pytest.raises(ConfigError, match=r"model\.pooling='max'"):
        load_model(cfg, 2)


def test_bad_pooling_value_is_caught_before_loading():
    from lora_lab.config.validate import check_config

    with pytest.raises(ConfigError, match=r"model\.pooling='first'"):
        check_config(compose_config("model=tiny", "model.pooling=first"))


def test_config_without_the_key_keeps_the_model_head():
    cfg = OmegaConf.create({k: v for k, v in compose_config().model.items() if k != "pooling"})
    assert resolve_pooling(cfg) == "pooler"


# ---------------------------------------------------------------- token classification

def test_token_classifier_labels_every_token(inputs):
    from transformers import BertForTokenClassification

    model = tiny("auto", num_labels=5, task="token")
    assert isinstance(model, BertForTokenClassification)
    with torch.no_grad():
        assert model(**inputs).logits.shape == (4, 10, 5)
    assert pooling_of(compose_config("model=tiny").model, "token") is None


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_pooling_does_not_apply_to_token_classification(pooling):
    cfg = compose_config("model=tiny", f"model.pooling={pooling}").model
    with pytest.raises(ConfigError, match=rf"model\.pooling='{pooling}': applies to sequence classification only"):
        load_model(cfg, 5, task="token")


# ---------------------------------------------------------------- the real checkpoint

def test_embedded_minilm_loads_mean_pooled_with_its_weights():
    from safetensors import safe_open

    cfg = compose_config("model=minilm").model
    model = load_model(cfg, 3, ["a", "b", "c"]).eval()
    assert isinstance(model, PooledClassifier) and model.pooling == "mean"
    assert not any("pooler" in n for n, _ in model.named_parameters())
    assert model.classifier.weight.shape == (3, 384) and model.config.id2label[2] == "c"
    with safe_open(str(Path(embedded_model_path(MINILM)) / "model.safetensors"), "pt") as f:
        for name in ("encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight",
                     "encoder.layer.5.output.LayerNorm.bias"):
            torch.testing.assert_close(model.get_parameter("bert." + name), f.get_tensor(name), rtol=0, atol=0)
    inputs = batch(size=2, length=12)
    with torch.no_grad():
        hidden = model.bert(**inputs).last_hidden_state
        torch.testing.assert_close(model(**inputs).logits,
                                   model.classifier(masked_mean(hidden, inputs["attention_mask"])))
