import pytest
from conftest import method_cfg, tiny_bert, tiny_distilbert, tiny_roberta

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.models.architectures import head_parameter_names, layer_stack, resolve_targets


@pytest.mark.parametrize("make,query,ffn_out", [
    (tiny_bert, "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.dense"),
    (tiny_roberta, "roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.output.dense"),
    (tiny_distilbert, "distilbert.transformer.layer.0.attention.q_lin", "distilbert.transformer.layer.0.ffn.lin2"),
])
def test_aliases_resolve_per_architecture(make, query, ffn_out):
    model = make()
    resolved = resolve_targets(model, ["q", "v", "o", "ffn_out"])
    assert all(len(hits) == 2 for hits in resolved.values())
    assert query in resolved["q"] and ffn_out in resolved["ffn_out"]
    assert not set(resolved["o"]) & set(resolved["ffn_out"])


def test_long_names_and_regexes():
    model = tiny_bert()
    assert resolve_targets(model, ["query"])["query"] == resolve_targets(model, ["q"])["q"]
    assert resolve_targets(model, [r"layer\.1\.attention\.self\.key"])[r"layer\.1\.attention\.self\.key"] == [
        "bert.encoder.layer.1.attention.self.key"]


def test_head_is_never_a_target():
    model = tiny_roberta()
    with pytest.raises(ConfigError, match="out_proj"):
        resolve_targets(model, ["out_proj"])  # classifier.out_proj lives in the head


@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta, tiny_distilbert])
def test_layer_stack_and_head(make):
    model = make()
    name, layers = layer_stack(model)
    assert len(layers) == 2
    assert head_parameter_names(model)
    assert not any(n.startswith(name + ".") for n in head_parameter_names(model))


@pytest.mark.parametrize("make", [tiny_roberta, tiny_distilbert])
def test_lora_on_other_architectures(make, inputs):
    import torch

    expected = make()(**inputs).logits
    model = make()
    build_method(method_cfg("lora")).apply(model)
    torch.testing.assert_close(model.eval()(**inputs).logits, expected)
