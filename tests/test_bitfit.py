"""BitFit: only the backbone's biases and the task head train; every weight matrix stays as it was."""
import pytest
import torch
from conftest import batch, compose_config, method_cfg, tiny_bert, tiny_distilbert

from lora_lab.errors import ConfigError
from lora_lab.methods import available_methods, build_method, describe_method
from lora_lab.models.architectures import head_parameter_names
from lora_lab.runtime import records
from lora_lab.runtime.measure import parameter_counts
from lora_lab.runtime.rebuild import load_run_deltas

LABELS = torch.tensor([0, 1, 0, 1])
HEAD = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def apply(model, **overrides):
    method = build_method(method_cfg("bitfit", **overrides))
    method.apply(model)
    return method


def bias_formula(hidden: int, intermediate: int, layers: int) -> int:
    """BitFit's count for BERT: per layer q, k, v, o, FFN-out and two LayerNorm betas (7 d) plus the
    FFN-in bias (d_ff), and the embedding LayerNorm's beta (d)."""
    return layers * (7 * hidden + intermediate) + hidden


def bert_head_count(hidden: int, num_labels: int) -> int:
    return hidden * hidden + hidden + hidden * num_labels + num_labels  # pooler.dense + classifier


def backbone_biases(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("bert.") and n.endswith(".bias")} - HEAD


def numel(model, names) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def test_registered_and_described():
    assert "bitfit" in available_methods()
    method = describe_method({"name": "bitfit"})
    assert type(method).__name__ == "BitFit"
    assert method.label() == "BitFit" and method.run_tag() == "bitfit" and method.size() is None
    assert method.order == 4 and method.family == "BitFit" and method.plot_style == ("tab:green", "^")
    assert method.supports_merge is False
    assert method.peft_config(tiny_bert()) is None


def test_bad_train_head_is_a_config_error():
    with pytest.raises(ConfigError, match="method.train_head"):
        build_method(method_cfg("bitfit", train_head="yes"))


def test_outputs_unchanged_after_apply(inputs):
    reference = tiny_bert()
    model = tiny_bert()
    apply(model)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_trainable_count_matches_the_formula_on_tiny_bert():
    model = tiny_bert()  # hidden 32, intermediate 64, 2 layers, 2 labels
    method = apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == backbone_biases(model) | HEAD
    assert method.method_parameter_names(model) == backbone_biases(model)
    assert "bert.embeddings.LayerNorm.bias" in trainable
    assert bias_formula(32, 64, 2) == 608
    assert numel(model, method.method_parameter_names(model)) == bias_formula(32, 64, 2)
    assert numel(model, trainable) == bias_formula(32, 64, 2) + bert_head_count(32, 2)
    assert method.resolved["bias_parameters"] == 608


def test_minilm_shape_has_the_paper_count():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, num_labels=2)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = BertForSequenceClassification(config)
    method = apply(model)
    assert numel(model, method.method_parameter_names(model)) == bias_formula(384, 1536, 6) == 25_728
    counts = parameter_counts(model, method)
    assert counts["trainable_method"] == 25_728
    assert counts["trainable_head"] == bert_head_count(384, 2)
    assert counts["trainable_other"] == 0


def test_without_head_only_biases_train():
    model = tiny_bert()
    method = apply(model, train_head=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == backbone_biases(model)
    assert parameter_counts(model, method)["trainable_head"] == 0


def test_other_architecture_distilbert():
    model = tiny_distilbert()
    method = apply(model)
    names = method.method_parameter_names(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith("distilbert.") and n.endswith(".bias")}
    assert "distilbert.embeddings.LayerNorm.bias" in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names | head_parameter_names(model)


def test_gradients_only_on_biases_and_head(inputs):
    model = tiny_bert()
    apply(model)
    model.train()
    model(**inputs, labels=LABELS).loss.backward()
    expected = backbone_biases(model) | HEAD
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    for name, p in model.named_parameters():
        if name not in expected:
            assert p.grad is None, name
            assert not p.requires_grad, name
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2} - HEAD
    assert matrices and not (matrices & with_grad)  # no Linear weight, no embedding table
    assert "bert.embeddings.word_embeddings.weight" in matrices


def test_training_changes_biases_but_no_weight_matrix():
    model = tiny_bert()
    method = apply(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = model(**batch(seed=step + 1), labels=LABELS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = dict(model.named_parameters())
    trained = backbone_biases(model) | HEAD
    frozen = set(before) - trained
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)
    changed = {n for n in trained if not torch.equal(after[n], before[n])}
    # A key bias adds the same q.b_k to every score of a query, which softmax ignores: its gradient
    # is zero up to rounding, so it need not move. Every other bias and the head must.
    assert changed >= trained - {n for n in trained if n.endswith(".key.bias")}
    assert method.delta_weights(model) == {}


def test_parameter_counts_split_method_and_head():
    model = tiny_bert()
    method = apply(model)
    counts = parameter_counts(model, method)
    assert counts["trainable_method"] == bias_formula(32, 64, 2)
    assert counts["trainable_head"] == bert_head_count(32, 2)
    assert counts["trainable_other"] == 0
    assert counts["trainable"] == counts["trainable_method"] + counts["trainable_head"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("override", ["arm=bitfit", "method=bitfit"])
def test_config_composes(override):
    cfg = compose_config(override)
    assert cfg.method.name == "bitfit" and cfg.method.train_head is True
    assert cfg.trainer.lr == pytest.approx(1e-3)
    assert cfg.trainer.lr > compose_config("method=full").trainer.lr


def test_end_to_end_smoke_run(tmp_path):
    from lora_lab.trainer.train import run_training

    cfg = compose_config("experiment=smoke", "logger=disabled", "method=bitfit", "trainer.threads=1",
                         f"data.cache_dir={tmp_path / 'cache'}")
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        record = run_training(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)  # run_training sets it process-wide
    assert record["status"] == "completed" and record["method"] == "bitfit"
    p = record["parameters"]
    assert p["trainable_method"] == bias_formula(32, 64, 2)  # conf/model/tiny: hidden 32, d_ff 64, 2 layers
    assert p["trainable_head"] == bert_head_count(32, 2) and p["trainable_other"] == 0
    on_disk = records.load_record(run_dir)
    assert on_disk["parameters"] == p and on_disk["method_resolved"]["bias_parameters"] == p["trainable_method"]
    state = records.load_file(str(run_dir / records.STATE_FILE))
    assert sum(t.numel() for t in state.values()) == p["trainable"]
    assert all(n.endswith(".bias") or n.startswith("classifier.") or ".pooler." in n for n in state)
    assert not (run_dir / records.DELTA_FILE).exists() and on_disk["delta_w"].startswith("none:")
    assert on_disk["delta_w_shapes"] == {} and load_run_deltas(run_dir) == {}
