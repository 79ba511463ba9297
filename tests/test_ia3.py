import pytest
import torch
from conftest import batch, compose_config, method_cfg, tiny_bert

from lora_lab.bench.peft_twin import build_peft_twin
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method, describe_method
from lora_lab.methods.ia3 import IA3, IA3Linear
from lora_lab.models.architectures import head_parameter_names
from lora_lab.runtime import measure
from lora_lab.runtime.rebuild import load_run_deltas


def ia3(model, **overrides):
    method = build_method(method_cfg("ia3", **overrides))
    method.apply(model)
    return method


def randomise_vectors(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IA3Linear):
                m.ia3_l.copy_(1 + 0.1 * torch.randn(m.ia3_l.shape, generator=g))


def outputs(model, inputs):
    """Logits and the last hidden state (order 1, so output differences are not hidden by tiny logits)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def wrapped(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def vector_count(model, method):
    return sum(model.get_parameter(n).numel() for n in method.method_parameter_names(model))


def test_outputs_unchanged_at_init():
    inputs = batch()
    expected = tiny_bert()(**inputs).logits
    model = tiny_bert()
    ia3(model)
    assert len(wrapped(model)) == 3 * 2
    torch.testing.assert_close(model.eval()(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_randomised_vectors_change_outputs():
    inputs = batch()
    model = tiny_bert()
    before = model(**inputs).logits
    ia3(model)
    randomise_vectors(model)
    assert (model(**inputs).logits - before).abs().max() > 1e-5  # float noise is ~1e-7; tiny logits are ~1e-2


def test_vectors_sit_where_the_paper_puts_them():
    model = tiny_bert(layers=1, hidden=32)
    ia3(model)
    layer = "bert.encoder.layer.0."
    sides = {n[len(layer):]: (m.feedforward, m.ia3_l.numel()) for n, m in wrapped(model).items()}
    assert sides == {"attention.self.key": (False, 32), "attention.self.value": (False, 32),
                     "output.dense": (True, 64)}


@pytest.mark.parametrize("layers,hidden", [(2, 32), (3, 16)])
def test_parameter_count_is_2d_plus_dff_per_layer(layers, hidden):
    model = tiny_bert(layers=layers, hidden=hidden)
    method = ia3(model)
    expected = layers * (2 * hidden + 2 * hidden)  # tiny_bert's intermediate size is 2 * hidden
    assert vector_count(model, method) == expected
    assert method.resolved == {"ia3_parameters": expected}
    counts = measure.parameter_counts(model, method)
    assert counts["trainable_method"] == expected
    assert counts["trainable_head"] == sum(model.get_parameter(n).numel() for n in head_parameter_names(model))
    assert counts["trainable_other"] == 0


def test_parameter_count_on_minilm_dims():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)
    method = ia3(model)
    assert vector_count(model, method) == 6 * (2 * 384 + 1536) == 13_824
    assert measure.parameter_counts(model, method)["trainable_method"] == 13_824


def test_only_vectors_and_head_get_gradients():
    model = tiny_bert().train()
    method = ia3(model)
    model(**batch(), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = method.method_parameter_names(model) | head_parameter_names(model)
    assert expected == {n for n, _ in model.named_parameters()
                        if n.endswith(".ia3_l") or n.startswith("classifier.") or ".pooler." in n}
    assert with_grad == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in method.method_parameter_names(model))


def test_no_head_training_when_switched_off():
    model = tiny_bert()
    method = ia3(model, train_head=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == method.method_parameter_names(model)


def test_merge_unmerge_and_delta_weights():
    inputs = batch()
    model = tiny_bert()
    method = ia3(model)
    randomise_vectors(model)
    layers = wrapped(model)
    original = {n: (m.base.weight.detach().clone(), m.base.bias.detach().clone()) for n, m in layers.items()}
    unmerged = outputs(model, inputs)
    delta_unmerged = method.delta_weights(model)

    method.prepare_inference(model)
    method.prepare_inference(model)  # merging twice is merging once
    assert all(m.merged for m in layers.values())
    merged_weights = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    merged = outputs(model, inputs)
    torch.testing.assert_close(merged[0], unmerged[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[1], unmerged[1], atol=1e-5, rtol=1e-5)
    delta_merged = method.delta_weights(model)

    assert set(delta_unmerged) == set(delta_merged) == set(layers)
    assert "bert.encoder.layer.0.attention.self.key" in delta_unmerged
    for name, m in layers.items():
        w0, b0 = original[name]
        expected = merged_weights[name] - w0
        assert expected.abs().max() > 1e-3  # the vectors do change the matrix
        for deltas in (delta_unmerged, delta_merged):
            d = deltas[name]
            assert d.kind == "ia3" and d.shape == tuple(w0.shape)
            torch.testing.assert_close(d.to_dense(), expected, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(d.base, w0, atol=0, rtol=0)
        l = m.ia3_l.detach()
        side = l[None, :] if m.feedforward else l[:, None]
        torch.testing.assert_close(merged_weights[name], w0 * side)
        expected_bias = b0 if m.feedforward else b0 * l
        torch.testing.assert_close(m.base.bias.detach(), expected_bias)

    method.undo_inference(model)
    assert not any(m.merged for m in layers.values())
    for name, m in layers.items():
        torch.testing.assert_close(m.base.weight.detach(), original[name][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(m.base.bias.detach(), original[name][1], atol=1e-6, rtol=0)
    restored = outputs(model, inputs)
    torch.testing.assert_close(restored[0], unmerged[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(restored[1], unmerged[1], atol=1e-6, rtol=0)


def test_peft_parity():
    inputs = batch()
    base_copy = tiny_bert()
    model = tiny_bert()
    method = ia3(model)
    randomise_vectors(model)
    config = method.peft_config(model)
    assert config.target_modules == set(method.adapted)
    assert config.feedforward_modules == {f"bert.encoder.layer.{i}.output.dense" for i in range(2)}
    twin = build_peft_twin(method, model, base_copy).eval()
    model.eval()
    ours = outputs(model, inputs)
    base_hidden = outputs(base_copy, inputs)[1]
    assert (ours[1] - base_hidden).abs().max() > 1e-3  # the vectors matter (100x the tolerance below)
    theirs = outputs(twin, inputs)
    torch.testing.assert_close(theirs[0], ours[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs[1], ours[1], atol=1e-5, rtol=1e-5)
    twin_vectors = sum(p.numel() for n, p in twin.named_parameters() if "ia3_l" in n and p.requires_grad)
    assert twin_vectors == vector_count(model, method) == method.resolved["ia3_parameters"]
    # the state dict shapes are PEFT's: (out, 1) on the output side, (1, in) on the input side
    state = method.peft_state_dict(model)
    key = "base_model.model.bert.encoder.layer.0.output.dense.ia3_l.default"
    assert state[key].shape == (1, 64)
    assert state["base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l.default"].shape == (32, 1)
    # merged, ours still agrees with PEFT
    method.prepare_inference(model)
    merged = outputs(model, inputs)
    torch.testing.assert_close(merged[0], theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[1], theirs[1], atol=1e-5, rtol=1e-5)


def test_feedforward_outside_targets_is_a_config_error():
    with pytest.raises(ConfigError, match=r"method.feedforward='ffn_in': is not one of method.targets"):
        build_method(method_cfg("ia3", feedforward=["ffn_in"]))
    # also caught when applied without check()
    with pytest.raises(ConfigError, match=r"method.feedforward=.*which method.targets does not"):
        IA3(method_cfg("ia3", feedforward=["ffn_in"])).apply(tiny_bert())


def test_target_matching_nothing_is_a_config_error():
    method = build_method(method_cfg("ia3", targets=["k", "gate_proj"], feedforward=[]))
    with pytest.raises(ConfigError, match=r"method.targets='gate_proj': matches no linear layer"):
        method.apply(tiny_bert())


def test_other_bad_settings():
    with pytest.raises(ConfigError, match="method.targets"):
        build_method(method_cfg("ia3", targets=[]))
    with pytest.raises(ConfigError, match="method.train_head"):
        build_method(method_cfg("ia3", train_head="yes"))


def test_compose_and_describe():
    cfg = compose_config("arm=ia3")
    assert cfg.method.name == "ia3"
    assert list(cfg.method.targets) == ["k", "v", "ffn_out"] and list(cfg.method.feedforward) == ["ffn_out"]
    assert cfg.trainer.lr == pytest.approx(3e-3)
    method = build_method(cfg.method)
    assert method.label() == "(IA)³ (k+v+ffn_out)" and method.run_tag() == "ia3"
    assert method.supports_merge and method.order == 5
    assert describe_method(cfg.method).label() == "(IA)³ (k+v+ffn_out)"


def test_smoke_run(tmp_path):
    from lora_lab.trainer.train import run_training

    cfg = compose_config("experiment=smoke", "method=ia3", "trainer.threads=1",
                         f"data.cache_dir={tmp_path / 'cache'}")
    run_dir = tmp_path / "run"
    record = run_training(cfg, run_dir)
    assert record["status"] == "completed" and record["method"] == "ia3"
    m = record["measurements"]
    assert m["inference_merged_ms"] > 0 and "merged_over_unmerged" in m
    # the tiny model: 2 layers, hidden 32, intermediate 64
    assert record["parameters"]["trainable_method"] == 2 * (2 * 32 + 64) == record["method_resolved"]["ia3_parameters"]
    deltas = load_run_deltas(run_dir)
    assert len(deltas) == 6 and all(d.dense is not None and d.base is not None for d in deltas.values())
    assert any(d.to_dense().abs().max() > 0 for d in deltas.values())  # training moved the vectors
