"""Every method on decoders: GPT-2 (Conv1D layers, fused q/k/v), Llama (GQA, gated MLP) and Qwen2, as
``*ForCausalLM`` and ``*ForSequenceClassification``; OPT, Mistral and Gemma for the target aliases.

The traps checked: a Conv1D stores W^T (ΔW must be out x in, merges must add its transpose), GPT-2's
c_attn holds q, k and v (targets [q, v] adapt only those rows), a language model's output layer is no
fresh task head (often tied to the input embeddings), and a 4-bit base cannot take a merge."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import method_cfg
from torch import nn

from lora_lab.errors import ConfigError
from lora_lab.methods import available_methods, build_method, registered_methods
from lora_lab.methods.lora import LoRALinear, merge_and_unload
from lora_lab.models import linear_layers
from lora_lab.models.architectures import head_parameter_names, resolve_matrices, resolve_targets
from lora_lab.models.linear_layers import FusedParts, dense_weight

D, L, D_FF, VOCAB = 32, 2, 64, 100
D_KV = 2 * (D // 4)  # 2 key/value heads of head_dim 8 (GQA)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(kind: str, head: str = "lm") -> nn.Module:
    """A tiny random decoder: ``head`` "lm" (the causal LM class) or "cls" (2-label sequence classifier)."""
    import transformers as T
    from transformers.utils import logging

    logging.set_verbosity_error()  # out-of-vocabulary bos/eos ids of the default configs
    common = dict(vocab_size=VOCAB, pad_token_id=0, num_labels=2)
    gated = dict(hidden_size=D, intermediate_size=D_FF, num_hidden_layers=L, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=D // 4, **common)
    configs = {
        "gpt2": (T.GPT2Config(n_embd=D, n_layer=L, n_head=4, n_positions=64, n_inner=D_FF, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0, **common), "GPT2"),
        "opt": (T.OPTConfig(hidden_size=D, ffn_dim=D_FF, num_hidden_layers=L, num_attention_heads=4,
                            word_embed_proj_dim=D, max_position_embeddings=64, dropout=0.0, **common), "OPT"),
        "llama": (T.LlamaConfig(**gated), "Llama"),
        "mistral": (T.MistralConfig(**gated), "Mistral"),
        "qwen2": (T.Qwen2Config(**gated), "Qwen2"),
        "gemma": (T.GemmaConfig(**gated), "Gemma"),
    }
    config, prefix = configs[kind]
    name = "GPT2LMHeadModel" if (kind, head) == ("gpt2", "lm") else prefix + (
        "ForCausalLM" if head == "lm" else "ForSequenceClassification")
    torch.manual_seed(0)
    return getattr(T, name)(config).eval()


IDS = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def apply(name: str, model: nn.Module, **overrides):
    method = build_method(method_cfg(name, **overrides))
    method.apply(model)
    return method


def randomise(model, method, seed: int = 3) -> None:
    """Move every trainable method parameter off its start (B, magnitudes, vectors, adapters)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in method.method_parameter_names(model):
            p = params[name]
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("kind,q,ffn_in,ffn_out", [
    ("gpt2", "transformer.h.0.attn.c_attn.q", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"),
    ("opt", "model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"),
    ("llama", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"),
    ("mistral", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"),
    ("qwen2", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"),
    ("gemma", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"),
])
def test_aliases_resolve_on_decoders(kind, q, ffn_in, ffn_out):
    model = tiny(kind)
    resolved = resolve_targets(model, ["q", "k", "v", "o", "ffn_in", "ffn_out"] if kind != "gpt2" else
                               ["q", "v", "o", "ffn_in", "ffn_out"])
    assert all(len(hits) == L for hits in resolved.values())
    assert q in resolved["q"] and ffn_in in resolved["ffn_in"] and ffn_out in resolved["ffn_out"]
    assert len({n for hits in resolved.values() for n in hits}) == L * len(resolved)
    if kind in ("llama", "mistral", "qwen2", "gemma"):
        assert resolve_targets(model, ["gate"])["gate"] == [f"model.layers.{i}.mlp.gate_proj" for i in range(L)]
    else:  # no gated MLP: the one-line error lists the model's linear layers, Conv1D ones included
        layer = "transformer.h.N.mlp.c_fc" if kind == "gpt2" else "model.decoder.layers.N.fc1"
        with pytest.raises(ConfigError, match=rf"method.targets='gate': matches no linear layer;.*{layer}") as error:
            resolve_targets(model, ["gate"])
        assert "\n" not in str(error.value) and "lm_head" not in str(error.value)
    with pytest.raises(ConfigError, match="lm_head"):  # the output layer is never a target
        resolve_targets(model, ["lm_head"])


def test_score_head_is_never_a_target_and_is_the_head():
    model = tiny("qwen2", "cls")
    with pytest.raises(ConfigError, match="'score'"):
        resolve_targets(model, ["score"])
    assert head_parameter_names(model) == {"score.weight"}


def test_gpt2_fused_parts_resolve_to_rows_unless_all_are_named():
    model = tiny("gpt2")
    parts = resolve_matrices(model, ["q", "v"])
    q, v = parts["q"][0], parts["v"][0]
    assert (q.module, q.part, q.rows, q.name) == ("transformer.h.0.attn.c_attn", "q", (0, D),
                                                   "transformer.h.0.attn.c_attn.q")
    assert v.rows == (2 * D, 3 * D)
    whole = resolve_targets(model, ["q", "k", "v"])
    assert whole["q"] == whole["k"] == whole["v"] == [f"transformer.h.{i}.attn.c_attn" for i in range(L)]
    assert resolve_targets(model, ["c_attn"])["c_attn"] == whole["q"]
    assert resolve_targets(model, ["q", "c_attn"])["q"] == whole["q"]  # the whole layer wins over its part


def test_whole_layer_settings_refuse_parts_of_a_fused_layer_in_one_line():
    with pytest.raises(ConfigError, match=r"method.insert_after=\['q'\]: names transformer.h.0.attn.c_attn.q, a part"):
        apply("adapter", tiny("gpt2"), insert_after=["q"])
    with pytest.raises(ConfigError, match=r"method.feedforward=\['v'\]: .*input scaling applies to whole layers"):
        apply("ia3", tiny("gpt2"), targets=["k", "v"], feedforward=["v"])


# ---------------------------------------------------------------- every method, counts and gradients

# what a method refuses on a tiny decoder, with the words of its one-line error
REFUSED = {
    ("bitfit", "llama"): "no bias terms",  # RMSNorm and bias-free projections: nothing to train
    ("head", "gpt2"): "method.top_layers=0: .*tied to its input embeddings",  # the output layer is wte
}
MERGING = [name for name, cls in registered_methods().items() if cls.supports_merge]
EXPORTING = [name for name, cls in registered_methods().items() if cls.exports_peft]


CASES = [(kind, head) for kind, head in [("gpt2", "lm"), ("llama", "cls"), ("qwen2", "lm")]]


@pytest.mark.parametrize("kind,head", CASES)
def test_every_method_applies_unchanged_with_the_formula_counts_and_gradients(kind, head):
    reference = tiny(kind, head)
    expected_logits = logits(reference)
    assert set(available_methods()) >= {"adapter", "bitfit", "dora", "full", "head", "ia3", "lora"}
    for name in available_methods():
        model = copy.deepcopy(reference)
        if (name, kind) in REFUSED:
            with pytest.raises(ConfigError, match=REFUSED[name, kind]):
                apply(name, model)
            continue
        method = apply(name, model)
        if method.preserves_outputs_at_init:  # virtual tokens (prompt, prefix) change outputs from the start
            torch.testing.assert_close(logits(model), expected_logits, atol=1e-6, rtol=0, msg=name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert method.method_parameter_names(model) <= trainable, name
        assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == \
            method.expected_trainable(reference), name
        if head == "lm" and not method.trains_every_weight:  # no output layer or embeddings trained as a "head"
            assert not any("lm_head" in n or "wte" in n or "embed_tokens" in n for n in trainable) or \
                trainable == method.method_parameter_names(model) == {"lm_head.weight"}, name
        model.train()
        model(input_ids=IDS).logits.float().pow(2).mean().backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == trainable, name


def test_head_on_an_untied_causal_lm_trains_its_output_layer_only():
    model = tiny("llama")
    method = apply("head", model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"lm_head.weight"}
    assert method.method_parameter_names(model) == {"lm_head.weight"} and not head_parameter_names(model)
    tied = tiny("gpt2")
    apply("head", tied, top_layers=1)  # FT-top-K on a tied LM: the top layer, the embeddings frozen
    trainable = {n for n, p in tied.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.h.1.") for n in trainable)


def test_decoder_classifier_trains_its_score_head():
    model = tiny("gpt2", "cls")
    apply("lora", model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and not any("wte" in n for n in trainable)


# ---------------------------------------------------------------- merging

@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_merged_equals_unmerged_and_unmerge_restores(kind):
    reference = tiny(kind)
    weights = {n: p.detach().clone() for n, p in reference.named_parameters()}
    for name in MERGING:
        model = copy.deepcopy(reference)
        method = apply(name, model)
        randomise(model, method)
        unmerged = logits(model)
        assert (unmerged - logits(reference)).abs().max() > 1e-3, name  # the update matters
        method.prepare_inference(model)
        torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0, msg=name)
        method.undo_inference(model)
        torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0, msg=name)
        base_weights = {n.replace(".base.", "."): p for n, p in model.named_parameters() if ".base." in n}
        for n, w in base_weights.items():
            torch.testing.assert_close(w, weights[n], atol=1e-6, rtol=0, msg=n)


def test_merge_and_unload_of_gpt2_parts_gives_a_plain_model():
    model = tiny("gpt2")
    method = apply("lora", model, alpha=16)
    randomise(model, method)
    expected = logits(model)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, FusedParts)) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- ΔW orientation on Conv1D

def test_lora_delta_w_on_conv1d_is_out_by_in_against_dense_references():
    model = tiny("gpt2")
    fused = "transformer.h.0.attn.c_attn"
    w_stored = model.get_submodule(fused).weight.detach().clone()  # in x out
    method = apply("lora", model, targets=["q", "v", "ffn_in"], alpha=16)
    randomise(model, method)
    deltas = method.delta_weights(model)
    assert set(deltas) >= {f"{fused}.q", f"{fused}.v", "transformer.h.0.mlp.c_fc"}
    assert f"{fused}.k" not in deltas
    layer = model.get_submodule(fused)
    x = torch.randn(5, D)
    with torch.no_grad():
        change = layer(x) - layer.base(x)  # f(x) - f0(x): q and v rows move, k rows do not
        method.prepare_inference(model)
        stored_change = (layer.base.weight - w_stored).T  # the Conv1D's own change, made out x in
        method.undo_inference(model)
    assert torch.equal(change[:, D:2 * D], torch.zeros(5, D))
    for part, (start, stop) in (("q", (0, D)), ("v", (2 * D, 3 * D))):
        d = deltas[f"{fused}.{part}"]
        assert d.shape == (D, D) and d.kind == "lora"
        torch.testing.assert_close(x @ d.to_dense().T, change[:, start:stop], atol=1e-6, rtol=0)
        torch.testing.assert_close(d.to_dense(), stored_change[start:stop], atol=1e-6, rtol=0)
        torch.testing.assert_close(d.base, w_stored.T[start:stop])  # W0's rows, out x in
    c_fc = model.get_submodule("transformer.h.0.mlp.c_fc")
    d = deltas["transformer.h.0.mlp.c_fc"]
    assert d.shape == (D_FF, D) == d.base.shape
    with torch.no_grad():
        torch.testing.assert_close(c_fc(x) - c_fc.base(x), x @ d.to_dense().T, atol=1e-6, rtol=0)


def test_other_methods_report_conv1d_delta_w_out_by_in():
    x = torch.randn(5, D_FF)
    # (IA)³ scales the input of mlp.c_proj (d_ff -> d): ΔW = W0 (diag(l) - I), with W0 out x in
    model = tiny("gpt2")
    name = "transformer.h.0.mlp.c_proj"
    stored0 = model.get_submodule(name).weight.detach().clone()
    method = apply("ia3", model)
    randomise(model, method)
    d = method.delta_weights(model)[name]
    layer = model.get_submodule(name)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base(x), x @ d.to_dense().T, atol=1e-6, rtol=0)
        method.prepare_inference(model)
        torch.testing.assert_close((layer.base.weight - stored0).T, d.to_dense(), atol=1e-6, rtol=0)
    assert d.shape == (D, D_FF) and torch.equal(d.base, stored0.T)
    # adapters: with the identity activation ΔW = U D W is exact
    model = tiny("gpt2")
    method = apply("adapter", model, activation="identity")
    randomise(model, method)
    wrapped = model.get_submodule(name)
    with torch.no_grad():
        wrapped.adapter.up.bias.zero_()
        wrapped.adapter.down.bias.zero_()
        d = method.delta_weights(model)[name]
        torch.testing.assert_close(wrapped(x) - wrapped.base(x), x @ d.to_dense().T, atol=1e-6, rtol=0)
    # full fine-tuning: the snapshot's ΔW is the stored change transposed
    model = tiny("gpt2")
    method = apply("full", model)
    step = torch.randn(D_FF, D)
    with torch.no_grad():
        model.get_submodule(name).weight.add_(step)
    deltas = method.delta_weights(model)
    assert deltas[name].shape == (D, D_FF)
    torch.testing.assert_close(deltas[name].dense, step.T, atol=1e-6, rtol=0)
    assert deltas["transformer.h.0.attn.c_attn"].shape == (3 * D, D)  # q, k, v named together: whole


def test_dora_and_svd_init_on_gpt2_parts():
    model = tiny("gpt2")
    expected = logits(model)
    method = apply("lora", model, init="svd", r=4)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    assert all(d.to_dense().abs().max() < 1e-6 for d in method.delta_weights(model).values())
    model = tiny("gpt2")
    w0 = dense_weight(model.get_submodule("transformer.h.0.attn.c_attn")).detach().clone()
    method = apply("dora", model)
    randomise(model, method)
    part = model.get_submodule("transformer.h.0.attn.c_attn.v")
    d = method.delta_weights(model)["transformer.h.0.attn.c_attn.v"]
    v = w0[2 * D:] + part.scaling * part.lora_B.detach() @ part.lora_A.detach()
    reference = (part.lora_magnitude.detach() / v.norm(dim=1))[:, None] * v - w0[2 * D:]
    torch.testing.assert_close(d.dense, reference, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- a 4-bit base (bitsandbytes stand-in)

class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes' Linear4bit: its weight is packed bytes, the matrix only comes back
    through ``linear_layers.dequantize`` (patched to read ``dense``)."""

    __module__ = "bitsandbytes.nn.modules"

    def __init__(self, dense: nn.Linear):
        super().__init__(dense.in_features, dense.out_features, bias=dense.bias is not None)
        self.weight = nn.Parameter(torch.zeros(dense.in_features * dense.out_features // 2, 1, dtype=torch.uint8),
                                   requires_grad=False)
        self.bias = dense.bias
        self.register_buffer("dense", dense.weight.detach().to(torch.bfloat16))

    def forward(self, x):
        return F.linear(x, self.dense.to(x.dtype), self.bias)


def test_lora_on_a_4bit_base(monkeypatch):
    monkeypatch.setattr(linear_layers, "dequantize", lambda module: module.dense)
    model = tiny("llama")
    for layer in model.model.layers:
        layer.self_attn.q_proj = Linear4bit(layer.self_attn.q_proj)
        layer.self_attn.v_proj = Linear4bit(layer.self_attn.v_proj)
    with pytest.raises(ConfigError, match=r"method.init='svd': .*q_proj is quantised"):
        apply("lora", copy.deepcopy(model), init="svd")
    method = apply("lora", model)
    assert method.supports_merge is False
    layers = method.lora_modules(model)
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for m in layers.values())
    randomise(model, method)
    expected = logits(model)
    method.prepare_inference(model)  # nothing to merge into: the model stays as it is
    assert not any(m.merged for m in layers.values())
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)
    d = method.delta_weights(model)["model.layers.0.self_attn.q_proj"]
    assert torch.equal(d.base, model.model.layers[0].self_attn.q_proj.base.dense.float())
    model.train()
    model(input_ids=IDS).logits.pow(2).mean().backward()
    assert all(m.lora_A.grad is not None for m in layers.values())
    with pytest.raises(ConfigError, match="quantised"):
        merge_and_unload(model)
    dora = tiny("llama")  # DoRA dequantises W0 for its norms; nothing merges either
    for layer in dora.model.layers:
        layer.self_attn.v_proj = Linear4bit(layer.self_attn.v_proj)
    method = apply("dora", dora)
    expected = logits(dora)
    method.prepare_inference(dora)
    assert method.supports_merge is False and torch.equal(logits(dora), expected)


# ---------------------------------------------------------------- PEFT

def test_peft_twin_on_gpt2_conv1d_layers_and_no_twin_for_parts():
    from lora_lab.bench.peft_twin import build_peft_twin

    base = tiny("gpt2")
    for name, targets in (("lora", ["c_attn", "o", "ffn_out"]), ("ia3", ["c_attn", "ffn_out"])):
        model = copy.deepcopy(base)
        method = apply(name, model, targets=targets)
        randomise(model, method)
        config = method.peft_config(model)
        assert config.fan_in_fan_out is True and config.task_type == "CAUSAL_LM"
        twin = build_peft_twin(method, model, copy.deepcopy(base)).eval()
        torch.testing.assert_close(logits(twin), logits(model), atol=1e-6, rtol=0)
    model = copy.deepcopy(base)
    method = apply("lora", model)  # q and v parts of c_attn
    assert method.peft_config(model) is None
    with pytest.raises(ConfigError, match="no PEFT counterpart"):
        build_peft_twin(method, model, copy.deepcopy(base))


@pytest.mark.parametrize("name", EXPORTING)
def test_gpt2_parts_export_exactly_as_a_block_structured_peft_lora(name):
    import peft

    base = tiny("gpt2", "cls")
    model = copy.deepcopy(base)
    method = apply(name, model, targets=["q", "v", "o"])
    randomise(model, method)
    config, weights = method.peft_adapter(model)
    assert config.task_type == "SEQ_CLS" and config.fan_in_fan_out is True
    assert (config.r, config.lora_alpha) == (16, 16) and config.rank_pattern == {
        re.escape(f"transformer.h.{i}.attn.c_proj"): 8 for i in range(L)} == config.alpha_pattern
    B = weights["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"]
    assert B.shape == (3 * D, 16) and not B[:D, 8:].any() and not B[D:2 * D].any() and not B[2 * D:, :8].any()
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    params = dict(theirs.named_parameters())
    weights["base_model.model.score.modules_to_save.default.weight"] = model.score.weight
    with torch.no_grad():
        for key, tensor in weights.items():
            params[key].copy_(tensor)
    torch.testing.assert_close(logits(theirs.eval()), logits(model), atol=1e-5, rtol=0)


def test_init_from_a_peft_adapter_of_gpt2(tmp_path):
    import peft

    base = tiny("gpt2")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(str(tmp_path), save_embedding_layers=False)
    ours = copy.deepcopy(base)
    apply("lora", ours, r=4, alpha=8, targets=["c_attn", "ffn_in"], init_from=str(tmp_path))
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="adapts parts of fused layers"):
        apply("lora", copy.deepcopy(base), r=4, alpha=8, targets=["q", "v", "ffn_in"], init_from=str(tmp_path))
