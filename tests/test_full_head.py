import pytest
import torch
from conftest import method_cfg, tiny_bert

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.models.architectures import head_parameter_names
from lora_lab.runtime.measure import parameter_counts


def apply(name, model, **overrides):
    method = build_method(method_cfg(name, **overrides))
    method.apply(model)
    return method


def grads(model, inputs):
    model.train()
    model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_full_trains_everything(inputs):
    model = tiny_bert()
    apply("full", model)
    assert grads(model, inputs) == {n for n, _ in model.named_parameters()}


def test_head_only_trains_head(inputs):
    model = tiny_bert()
    apply("head", model)
    assert grads(model, inputs) == head_parameter_names(model)
    assert head_parameter_names(model) == {"classifier.weight", "classifier.bias",
                                           "bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def test_top_k_trains_top_layers(inputs):
    model = tiny_bert(layers=3)
    apply("head", model, top_layers=2)
    got = grads(model, inputs)
    layer_params = {n for n in got if ".encoder.layer." in n}
    assert layer_params and all(".layer.1." in n or ".layer.2." in n for n in layer_params)
    assert not any(".layer.0." in n or "embeddings" in n for n in got)
    assert head_parameter_names(model) <= got


def test_top_k_out_of_range():
    with pytest.raises(ConfigError, match="method.top_layers=5"):
        apply("head", tiny_bert(layers=2), top_layers=5)


@pytest.mark.parametrize("name,overrides,expected_count", [("full", {}, 2 * 6), ("head", {"top_layers": 1}, 6),
                                                          ("head", {}, 0)])
def test_delta_w_is_weight_difference(name, overrides, expected_count):
    model = tiny_bert()
    method = apply(name, model, **overrides)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    deltas = method.delta_weights(model)
    assert len(deltas) == expected_count
    for module, delta in deltas.items():
        w = model.get_submodule(module).weight
        torch.testing.assert_close(delta.to_dense(), w - before[module + ".weight"])
        torch.testing.assert_close(delta.base, before[module + ".weight"])
        assert torch.allclose(delta.to_dense(), torch.full_like(w, 0.5))


def test_parameter_breakdown_sums():
    model = tiny_bert()
    method = apply("adapter", model)
    counts = parameter_counts(model, method)
    assert counts["trainable"] == counts["trainable_method"] + counts["trainable_head"] + counts["trainable_other"]
    assert counts["trainable_other"] > 0  # Houlsby trains LayerNorms
    assert counts["total"] == sum(p.numel() for p in model.parameters())
