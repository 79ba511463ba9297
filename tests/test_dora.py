import pytest
import torch
from conftest import batch, compose_config, method_cfg, tiny_bert

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method, describe_method
from lora_lab.methods.dora import DoRALinear
from lora_lab.methods.lora import LoRALinear, merge_and_unload

LABELS = torch.tensor([0, 1, 0, 1])


def dora(model, **overrides):
    method = build_method(method_cfg("dora", **overrides))
    method.apply(model)
    return method


def dora_layers(model) -> dict[str, DoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}


def randomise(model, seed=3):
    """A trained-looking state: B non-zero and the magnitudes moved off ||W0||_c."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in dora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            m.lora_magnitude.mul_(1 + 0.2 * torch.randn(m.lora_magnitude.shape, generator=g))


def reference_weight(w0, A, B, m, scaling):
    """W' = m * (W0 + s B A) / ||W0 + s B A||, the norm of each output row, written out in float64."""
    w0, A, B, m = (t.detach().double() for t in (w0, A, B, m))
    v = w0 + scaling * B @ A
    row_norm = v.pow(2).sum(dim=1).sqrt()  # one per output feature
    return (m / row_norm)[:, None] * v


def test_outputs_unchanged_at_init(inputs):
    expected = tiny_bert()(**inputs).logits
    model = tiny_bert()
    method = dora(model, r=4, alpha=16)
    layers = dora_layers(model)
    assert len(layers) == 4 and all(isinstance(m, LoRALinear) for m in layers.values())
    for m in layers.values():  # m starts at the row norms of W0
        torch.testing.assert_close(m.lora_magnitude, m.base.weight.norm(dim=1))
    torch.testing.assert_close(model.eval()(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    assert all(d.to_dense().abs().max() < 1e-6 for d in method.delta_weights(model).values())


def test_update_changes_outputs(inputs):
    model = tiny_bert()
    before = model.bert(**inputs).last_hidden_state  # the random head's logits are ~0.01: too flat to tell
    dora(model)
    randomise(model)
    assert not torch.allclose(model.bert(**inputs).last_hidden_state, before, atol=1e-3)


@pytest.mark.parametrize("targets,r", [(["q", "v"], 8), (["q", "k", "v", "o"], 2), (["ffn_in", "ffn_out"], 4)])
def test_parameter_count_is_lora_plus_out_features(targets, r):
    from lora_lab.runtime import measure

    layers, d = 2, 32
    model = tiny_bert(layers=layers, hidden=d)
    method = dora(model, targets=targets, r=r)
    shapes = [(m.base.out_features, m.base.in_features) for m in dora_layers(model).values()]
    assert len(shapes) == layers * len(targets)
    expected = sum(r * (d_in + d_out) + d_out for d_out, d_in in shapes)
    names = method.method_parameter_names(model)
    assert sum(model.get_parameter(n).numel() for n in names) == expected
    assert sum(n.endswith("lora_magnitude") for n in names) == len(shapes)
    counts = measure.parameter_counts(model, method)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier.") or ".pooler." in n)
    assert counts["trainable_method"] == expected
    assert counts["trainable_head"] == head and counts["trainable_other"] == 0
    assert counts["trainable"] == expected + head


def test_minilm_sized_count_is_78_336():
    from transformers import BertConfig, BertForSequenceClassification

    from lora_lab.runtime import measure

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)
    method = dora(model, r=8, targets=["q", "v"])
    # LoRA: 6 layers x 2 matrices x 8 x (384 + 384) = 73,728; magnitudes: 6 x 2 x 384 = 4,608
    assert measure.parameter_counts(model, method)["trainable_method"] == 73_728 + 4_608 == 78_336
    assert method.resolved["r"] == 8


def test_only_factors_magnitudes_and_head_get_gradients(inputs):
    model = tiny_bert().train()
    dora(model, targets=["q", "v"])
    model(**inputs, labels=LABELS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n, _ in model.named_parameters()
                if n.endswith(("lora_A", "lora_B", "lora_magnitude")) or n.startswith("classifier.")
                or ".pooler." in n}
    assert with_grad == expected
    assert sum(n.endswith("lora_magnitude") for n in expected) == 4
    magnitudes = [p for n, p in model.named_parameters() if n.endswith("lora_magnitude")]
    assert all(p.grad.abs().sum() > 0 for p in magnitudes)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_merged_matches_unmerged_and_unmerge_restores(inputs):
    model = tiny_bert()
    method = dora(model, r=4, alpha=16)
    randomise(model)
    layers = dora_layers(model)
    w0 = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    unmerged = model(**inputs).logits
    method.prepare_inference(model)
    assert all(m.merged for m in layers.values())
    assert all(not torch.equal(m.base.weight, w0[n]) for n, m in layers.items())
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)
    merged_deltas = method.delta_weights(model)
    method.undo_inference(model)
    for n, m in layers.items():
        assert not m.merged
        torch.testing.assert_close(m.base.weight, w0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)
    for name, d in method.delta_weights(model).items():  # the same ΔW, merged or not
        torch.testing.assert_close(merged_deltas[name].to_dense(), d.to_dense(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(merged_deltas[name].base, d.base, atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_delta_w_is_the_dense_dora_update():
    original = {n: m.weight.detach().clone() for n, m in tiny_bert().named_modules()
                if isinstance(m, torch.nn.Linear)}
    model = tiny_bert()
    method = dora(model, r=4, alpha=8, rslora=True)
    randomise(model)
    deltas = method.delta_weights(model)
    layers = dora_layers(model)
    assert set(deltas) == set(layers) and len(deltas) == 4
    for name, m in layers.items():
        assert m.scaling == 8 / 2  # rsLoRA: alpha / sqrt(r)
        d = deltas[name]
        assert d.kind == "dora" and d.dense is not None and d.B is None and d.shape == (32, 32)
        expected = reference_weight(original[name], m.lora_A, m.lora_B, m.lora_magnitude, 4.0) - original[name].double()
        torch.testing.assert_close(d.to_dense().double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d.base, original[name])
        # the rescaling makes ΔW full rank, unlike LoRA's s B A of rank r = 4
        assert torch.linalg.matrix_rank(d.to_dense()) > 4


def test_forward_is_the_dora_weight_times_x():
    model = tiny_bert()
    dora(model, r=4, alpha=8)
    randomise(model)
    name, m = next(iter(dora_layers(model).items()))
    x = torch.randn(3, 5, 32)
    w = reference_weight(m.base.weight, m.lora_A, m.lora_B, m.lora_magnitude, m.scaling)
    expected = x.double() @ w.T + m.base.bias.double()
    torch.testing.assert_close(m(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_peft_twin_matches_outputs_and_gradients():
    pytest.importorskip("peft")
    from lora_lab.bench.peft_twin import build_peft_twin

    inputs = batch()
    base_copy = tiny_bert()
    model = tiny_bert()
    method = dora(model, r=4, alpha=16)
    randomise(model)
    twin = build_peft_twin(method, model, base_copy)
    twin.eval(), model.eval()
    twin_params = dict(twin.named_parameters())
    state = method.peft_state_dict(model)
    assert len(state) == 4 * 3
    for key, value in state.items():
        assert twin_params[key].shape == value.shape
        torch.testing.assert_close(twin_params[key], value)
    ours = model(**inputs, labels=LABELS)
    theirs = twin(**inputs, labels=LABELS)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    suffixes = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                "lora_magnitude": "lora_magnitude_vector.default.weight"}
    compared = 0
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if leaf not in suffixes:
            continue
        q = twin_params[f"base_model.model.{module}.{suffixes[leaf]}"]
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
        compared += 1
    assert compared == 4 * 3
    assert method.peft_config(model).use_dora is True


def test_norm_is_detached_in_backward():
    """With the norm a constant, dL/dB equals the gradient of the formula with ||.|| held fixed;
    letting the gradient flow through the norm gives a different one."""
    model = tiny_bert()
    dora(model, r=4, alpha=8)
    randomise(model)
    m = next(iter(dora_layers(model).values()))
    x = torch.randn(6, 32)
    m(x).pow(2).sum().backward()
    B = m.lora_B.detach().clone().requires_grad_(True)
    v = m.base.weight + m.scaling * B @ m.lora_A.detach()
    through_norm = x @ ((m.lora_magnitude.detach() / v.norm(dim=1))[:, None] * v).T + m.base.bias
    through_norm.pow(2).sum().backward()
    assert not torch.allclose(m.lora_B.grad, B.grad, atol=1e-4)


def test_describe_and_arm():
    method = describe_method({"name": "dora", "r": 8, "alpha": 8, "targets": ["q", "v"]})
    assert method.label() == "DoRA r=8 α=8 (q+v)"
    assert method.rank_series() == ["DoRA α=8 (q+v)", "DoRA α=r (q+v)"] and method.run_tag() == "dora-r8"
    assert method.sort_key()[0] == 3 and method.rank() == 8
    cfg = compose_config("arm=dora")
    assert cfg.method.name == "dora" and cfg.method.r == 8 and cfg.method.targets == ["q", "v"]


@pytest.mark.parametrize("key,value,message", [
    ("init", "svd", "method.init='svd': must be one of"),
    ("budget", 1000, "method.budget=1000: is not supported by DoRA"),
    ("r", 0, "method.r=0: must be a positive integer"),
])
def test_bad_settings_raise_before_loading(key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_method(method_cfg("dora", **{key: value}))


def test_smoke_run_saves_dense_delta_w(tmp_path):
    from lora_lab.runtime import records
    from lora_lab.runtime.rebuild import load_run_deltas
    from lora_lab.trainer.train import run_training

    cfg = compose_config("experiment=smoke", "method=dora", "trainer.threads=1", f"data.cache_dir={tmp_path / 'cache'}")
    run_dir = tmp_path / "run"
    record = run_training(cfg, run_dir)
    on_disk = records.load_record(run_dir)
    assert record["status"] == on_disk["status"] == "completed" and on_disk["method"] == "dora"
    p = on_disk["parameters"]
    # tiny model: 2 layers x (q, v), 32 x 32, r = 8: 4 x (8 x 64 + 32)
    assert p["trainable_method"] == 4 * (8 * 64 + 32)
    assert "merged_over_unmerged" in on_disk["measurements"]
    deltas = load_run_deltas(run_dir)
    assert len(deltas) == 4
    for d in deltas.values():
        assert d.kind == "dora" and d.dense is not None and d.base is not None and d.B is None
        assert d.dense.shape == d.base.shape == (32, 32) and d.dense.abs().sum() > 0
