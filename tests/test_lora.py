import math

import pytest
import torch
from conftest import method_cfg, tiny_bert

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.methods.lora import LoRALinear, merge_and_unload


def lora(model, **overrides):
    method = build_method(method_cfg("lora", **overrides))
    method.apply(model)
    return method


def randomise_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "svd"])
def test_outputs_unchanged_at_init(init, inputs):
    base = tiny_bert()
    expected = base(**inputs).logits
    model = tiny_bert()
    lora(model, init=init, r=4)
    torch.testing.assert_close(model.eval()(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["kaiming", "svd"])
def test_merged_matches_unmerged(init, inputs):
    model = tiny_bert()
    method = lora(model, r=4, alpha=16, init=init)
    randomise_b(model)
    unmerged = model(**inputs).logits
    method.prepare_inference(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)
    method.undo_inference(model)
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_update_changes_outputs(inputs):
    model = tiny_bert()
    before = model(**inputs).logits
    lora(model)
    randomise_b(model)
    assert not torch.allclose(model(**inputs).logits, before, atol=1e-4)


def test_only_lora_factors_and_head_get_gradients(inputs):
    model = tiny_bert().train()
    lora(model, targets=["q", "v"])
    model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n, _ in model.named_parameters()
                if n.endswith(("lora_A", "lora_B")) or n.startswith("classifier.") or ".pooler." in n}
    assert with_grad == expected
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n and n not in expected)
    # A gets no gradient signal through B = 0 at step 0, but B does.
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


@pytest.mark.parametrize("targets,r", [(["q", "v"], 8), (["q", "k", "v", "o"], 2), (["q"], 1)])
def test_parameter_count_matches_paper_formula(targets, r):
    layers, d = 3, 32
    model = tiny_bert(layers=layers, hidden=d)
    method = lora(model, targets=targets, r=r)
    count = sum(model.get_parameter(n).numel() for n in method.method_parameter_names(model))
    assert count == 2 * layers * d * r * len(targets)


def test_roberta_base_count_is_the_papers_0_3m():
    # 12 layers x 2 matrices (q, v) x 2 factors x 768 x 8 = 294,912
    assert 12 * 2 * 2 * 768 * 8 == 294_912


def test_ffn_targets_count_rectangular():
    d, layers, r = 32, 2, 4
    model = tiny_bert(layers=layers, hidden=d)
    method = lora(model, targets=["ffn_in", "ffn_out"], r=r)
    count = sum(model.get_parameter(n).numel() for n in method.method_parameter_names(model))
    assert count == layers * 2 * r * (d + 2 * d)  # (in + out) * r per matrix, ffn is d <-> 2d


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(rslora, expected):
    model = tiny_bert()
    lora(model, r=4, alpha=16, rslora=rslora)
    assert all(math.isclose(m.scaling, expected) for m in model.modules() if isinstance(m, LoRALinear))


def test_delta_w_is_scaled_product():
    model = tiny_bert()
    method = lora(model, r=4, alpha=8)
    randomise_b(model)
    deltas = method.delta_weights(model)
    assert len(deltas) == 2 * 2  # 2 layers x (q, v)
    name = "bert.encoder.layer.1.attention.self.value"
    m = model.get_submodule(name)
    torch.testing.assert_close(deltas[name].to_dense(), 2.0 * m.lora_B @ m.lora_A)
    torch.testing.assert_close(deltas[name].base, m.base.weight)


def test_delta_w_zero_at_svd_init_and_base_is_original():
    original = tiny_bert().bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model = tiny_bert()
    method = lora(model, r=4, init="svd")
    delta = method.delta_weights(model)["bert.encoder.layer.0.attention.self.query"]
    assert delta.to_dense().abs().max() < 1e-6
    torch.testing.assert_close(delta.base, original, atol=1e-5, rtol=1e-5)
    # the frozen residual has lost the top-4 singular directions
    layer = model.bert.encoder.layer[0].attention.self.query
    s_res = torch.linalg.svdvals(layer.base.weight)
    s_orig = torch.linalg.svdvals(original)
    torch.testing.assert_close(s_res[: 32 - 4], s_orig[4:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value,message", [
    ("r", 0, "method.r=0: must be a positive integer"),
    ("r", -2, "method.r=-2"),
    ("alpha", 0, "method.alpha=0: must be > 0"),
    ("init", "orthogonal", "method.init='orthogonal'"),
    ("dropout", 1.0, "method.dropout=1.0"),
])
def test_bad_settings_raise_before_loading(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_method(method_cfg("lora", **{key: value}))


def test_unknown_target_lists_linear_layers():
    model = tiny_bert()
    with pytest.raises(ConfigError) as info:
        lora(model, targets=["q", "gate_proj"])
    text = str(info.value)
    assert "method.targets='gate_proj'" in text and "bert.encoder.layer.N.attention.self.query" in text
    assert "\n" not in text



def test_budget_chooses_r_per_target_set():
    """2 layers; q is 32x32 (64 parameters per rank and layer), ffn_in 64x32 (96)."""
    for targets, r in ((["q"], 8), (["q", "ffn_in"], 3)):
        model = tiny_bert(layers=2, hidden=32)
        method = build_method(method_cfg("lora", budget=1024, targets=targets, r=None))
        method.apply(model)
        count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert method.resolved == {"r": r, "lora_parameters": count}
        assert abs(count - 1024) <= count // r  # within one rank step
    with pytest.raises(ConfigError, match="method.budget=-5: must be a positive number"):
        build_method(method_cfg("lora", budget=-5))


def test_init_from_starts_a_b_from_an_earlier_run(tmp_path):
    from lora_lab.runtime import records

    first = tiny_bert(seed=0)
    method = build_method(method_cfg("lora", r=4))
    method.apply(first)
    with torch.no_grad():
        for n, p in first.named_parameters():
            if "lora_B" in n:
                p.normal_()
    state = {n: p for n, p in first.named_parameters() if p.requires_grad}
    records.save_tensors(tmp_path / "trainable.safetensors", state)

    second = tiny_bert(seed=1)
    build_method(method_cfg("lora", r=4, init_from=str(tmp_path))).apply(second)
    for name, p in second.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, state[name])
    assert not torch.equal(dict(second.named_parameters())["classifier.weight"], state["classifier.weight"])
    with pytest.raises(ConfigError, match="method.init_from=.*another r"):
        build_method(method_cfg("lora", r=2, init_from=str(tmp_path))).apply(tiny_bert())
    with pytest.raises(ConfigError, match="is neither a run directory nor a .safetensors file"):
        build_method(method_cfg("lora", init_from=str(tmp_path / "nope"))).apply(tiny_bert())
