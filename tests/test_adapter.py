import pytest
import torch
from conftest import method_cfg, tiny_bert, tiny_distilbert

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.methods.adapter import WithAdapter
from lora_lab.models.architectures import head_parameter_names, layer_norm_parameter_names


def adapter(model, **overrides):
    method = build_method(method_cfg("adapter", **overrides))
    method.apply(model)
    return method


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_adapter_starts_as_identity(variant, inputs):
    expected = tiny_bert()(**inputs).logits
    model = tiny_bert()
    adapter(model, variant=variant)
    torch.testing.assert_close(model.eval()(**inputs).logits, expected)


@pytest.mark.parametrize("variant,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_parameter_count_and_placement(variant, per_layer):
    layers, d, m = 3, 32, 8
    model = tiny_bert(layers=layers, hidden=d)
    method = adapter(model, variant=variant, bottleneck=m)
    count = sum(model.get_parameter(n).numel() for n in method.method_parameter_names(model))
    assert count == layers * per_layer * (2 * d * m + m + d)
    wrapped = sorted(n for n, mod in model.named_modules() if isinstance(mod, WithAdapter))
    expected = [f"bert.encoder.layer.{i}.output.dense" for i in range(layers)]
    if variant == "houlsby":
        expected += [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(layers)]
    assert wrapped == sorted(expected)


def test_reduction_factor():
    model = tiny_bert(hidden=32)
    method = adapter(model, bottleneck=None, reduction_factor=4, variant="pfeiffer")
    down = model.bert.encoder.layer[0].output.dense.adapter.down
    assert down.out_features == 8
    assert method.method_parameter_names(model)


@pytest.mark.parametrize("variant,train_ln", [("houlsby", True), ("pfeiffer", False)])
def test_gradients_reach_adapters_head_and_layer_norms_only(variant, train_ln, inputs):
    model = tiny_bert().train()
    method = adapter(model, variant=variant)
    model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = method.method_parameter_names(model) | head_parameter_names(model)
    if train_ln:
        expected |= layer_norm_parameter_names(model)
    assert with_grad == expected


def test_distilbert_placement():
    model = tiny_distilbert()
    adapter(model, variant="houlsby")
    wrapped = sorted(n for n, mod in model.named_modules() if isinstance(mod, WithAdapter))
    assert wrapped == sorted([f"distilbert.transformer.layer.{i}.{p}" for i in range(2)
                              for p in ("attention.out_lin", "ffn.lin2")])


def test_delta_w_linearised_update():
    model = tiny_bert()
    method = adapter(model, variant="pfeiffer", activation="identity")
    name = "bert.encoder.layer.0.output.dense"
    wrapped = model.get_submodule(name)
    with torch.no_grad():
        wrapped.adapter.up.weight.normal_()
        wrapped.adapter.up.bias.zero_()
        wrapped.adapter.down.bias.zero_()
    x = torch.randn(5, wrapped.base.in_features)
    delta = method.delta_weights(model)[name]
    # with an identity activation and zero biases the adapter is exactly W -> W + ΔW
    torch.testing.assert_close(wrapped(x), x @ (wrapped.base.weight + delta.to_dense()).T + wrapped.base.bias,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value", [("variant", "compacter"), ("activation", "swish2"), ("bottleneck", 0)])
def test_bad_settings(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}="):
        build_method(method_cfg("adapter", **{key: value}))


# ---------------------------------------------------------------- Adapter^L and AdapterDrop

def tiny_decoder(kind: str):
    from test_decoder_methods import tiny

    return tiny(kind, "cls")


MODELS = {"bert": lambda: tiny_bert(layers=3, hidden=32), "gpt2": lambda: tiny_decoder("gpt2"),
          "llama": lambda: tiny_decoder("llama")}
BLOCKS = {"bert": "bert.encoder.layer.{}.output", "gpt2": "transformer.h.{}.mlp", "llama": "model.layers.{}.mlp"}


def decoder_inputs(model):
    return {"input_ids": torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("variant,drop", [("lin", 0), ("lin", 1), ("drop", 1), ("houlsby", 1)])
def test_lin_and_drop_count_the_papers_formula_start_as_identity_and_train_only_themselves(arch, variant, drop):
    reference = MODELS[arch]()
    ids = decoder_inputs(reference)
    with torch.no_grad():
        expected = reference.eval()(**ids).logits
    model = MODELS[arch]()
    m = 8
    method = adapter(model, variant=variant, bottleneck=m, drop_layers=drop)
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    kept = range(drop, layers)
    wrapped = sorted(n for n, mod in model.named_modules() if isinstance(mod, WithAdapter))
    if variant == "lin":  # after each kept layer's feed-forward block, with the adapter's own LayerNorm
        assert wrapped == sorted(BLOCKS[arch].format(i) for i in kept)
        per_adapter = 2 * d * m + m + d + 2 * d  # L_adpt x (2 d r + r + d) + 2 x L_LN x d, L_LN = L_adpt
    else:
        per_adapter = (2 if variant == "houlsby" else 1) * (2 * d * m + m + d)
        assert all(any(f".{i}." in n for i in kept) for n in wrapped) and len(wrapped) == len(kept) * (
            2 if variant == "houlsby" else 1)
    own = sum(model.get_parameter(n).numel() for n in method.method_parameter_names(model))
    assert own == len(kept) * per_adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(model.get_parameter(n).numel() for n in trainable) == method.expected_trainable(MODELS[arch]())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**ids).logits, expected)  # every adapter starts as the identity
    model.train()
    model(**ids).logits.float().pow(2).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert bool(method.delta_weights(model)) is method.adapts_matrices() is (variant != "lin")


def test_lin_adapter_normalises_its_input_and_dropped_layers_stay_plain(inputs):
    model = tiny_bert(layers=3)
    adapter(model, variant="lin", bottleneck=4, drop_layers=1)
    assert not isinstance(model.bert.encoder.layer[0].output, WithAdapter)  # dropped: the plain block
    block = model.bert.encoder.layer[1].output
    with torch.no_grad():
        block.adapter.up.weight.normal_()
        h, residual = torch.randn(2, 5, 64), torch.randn(2, 5, 32)  # the intermediate, the residual
        out = block.base(h, residual)
        a = block.adapter
        torch.testing.assert_close(block(h, residual), out + a.up(a.act(a.down(a.norm(out)))))


@pytest.mark.parametrize("overrides,message", [
    ({"variant": "drop"}, "method.drop_layers=0: variant=drop"),
    ({"variant": "pfeiffer", "drop_layers": 2}, "method.drop_layers=2: would drop every adapter: the model has 2"),
    ({"variant": "lin", "insert_after": ["o"]}, "method.insert_after=.*variant=lin places one adapter"),
])
def test_lin_and_drop_refuse_bad_settings_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        adapter(tiny_bert(), **overrides)
