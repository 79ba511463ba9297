"""Prefix tuning (PreLayer): trained keys and values before the input's own in every attention layer.
Counts 2 x L x d_kv x l_p on BERT, GPT-2 and Llama (and the MLP's when reparameterised), gradients on
the prefixes and the head only, prefixes that act exactly as a real context's keys and values (the
real tokens after them), heads that read the real tokens, the saved state (only plain prefixes after
the MLP is folded), parity with PEFT's PREFIX_TUNING on decoders, and runs through the trainer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, compose_config, method_cfg, tiny_bert
from test_decoder_methods import tiny
from test_prompt import decoder_batch, pooled, tiny_token_classifier

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method, describe_method
from lora_lab.methods.prefix import MODULE
from lora_lab.methods.prompt import backbone_of
from lora_lab.models.architectures import head_parameter_names
from lora_lab.runtime import checkpoint, records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, L, D_KV = 32, 2, 16  # the tiny models' width and depth; tiny Llama's 2 key/value heads of 8

MODELS = {"bert": tiny_bert, "gpt2": lambda: tiny("gpt2", "cls"), "gpt2-lm": lambda: tiny("gpt2"),
          "llama": lambda: tiny("llama", "cls"), "llama-lm": lambda: tiny("llama")}


def prefix(model, **overrides):
    method = build_method(method_cfg("prefix", **overrides))
    method.apply(model)
    return method


def prefixes(model):
    return getattr(backbone_of(model), MODULE)


def inputs_for(arch):
    return batch() if arch == "bert" else decoder_batch()


def labels_for(arch, inputs):
    if arch.endswith("-lm"):
        return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return torch.tensor([0, 1, 0, 1])[: inputs["input_ids"].shape[0]]


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("hidden", [None, 8])
def test_count_and_gradients_only_on_the_prefixes_and_head(arch, hidden):
    model = MODELS[arch]()
    head = sum(p.numel() for n, p in model.named_parameters() if n in head_parameter_names(model))
    method = prefix(model, prefix_length=3, reparameterize=hidden is not None, mlp_hidden=hidden or 512)
    d_kv = D_KV if arch.startswith("llama") else D
    own = method.method_parameter_names(model)
    if hidden is None:
        expected = 2 * L * d_kv * 3
        assert own == {f"{model.base_model_prefix}.{MODULE}.prefix"}
    else:
        expected = 3 * d_kv + (d_kv * hidden + hidden) + (hidden * 2 * L * d_kv + 2 * L * d_kv)
    assert sum(model.get_parameter(n).numel() for n in own) == expected
    assert method.expected_trainable(MODELS[arch]()) == expected + head
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == own | head_parameter_names(model)
    inputs = inputs_for(arch)
    model.train()(**inputs, labels=labels_for(arch, inputs)).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in own)
    assert method.delta_weights(model) == {} and not method.adapts_matrices() and not method.supports_merge


def test_training_moves_the_outputs_and_no_backbone_weight():
    inputs = batch()
    model = tiny_bert()
    prefix(model, prefix_length=3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = model(**inputs, output_hidden_states=True).hidden_states[-1].detach()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model(**inputs, output_hidden_states=True).hidden_states[-1].detach()
    assert after.shape == before.shape == (4, 10, D) and (after - before).abs().max() > 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def context_keys_values(base, context: torch.Tensor, size: int) -> torch.Tensor:
    """L x 2 x l_p x d_kv: the keys and values the base model computes for ``context`` (the cache of
    a decoder; the key and value layers' outputs of a one-layer encoder, which see the context alone)."""
    backbone = backbone_of(base)
    if base.config.model_type == "bert":
        seen = {}
        attention = backbone.encoder.layer[0].attention.self
        hooks = [getattr(attention, k).register_forward_hook(lambda m, a, out, k=k: seen.update({k: out}))
                 for k in ("key", "value")]
        with torch.no_grad():
            backbone(input_ids=context[None])
        for hook in hooks:
            hook.remove()
        return torch.stack([seen["key"][0], seen["value"][0]])[None]
    with torch.no_grad():
        cache = backbone(input_ids=context[None], use_cache=True).cache
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]).transpose(1, 2).flatten(2)
                        for layer in cache.layers])


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_prefixes_act_as_a_real_contexts_keys_and_values(arch):
    """With a context's own keys and values as prefixes, the real tokens' states are those of the base
    model on context + input: the prefixes sit before the input and the real tokens at positions l_p.."""
    make = {"bert": lambda: tiny_bert(layers=1), "gpt2": lambda: tiny("gpt2", "cls"),
            "llama": lambda: tiny("llama", "cls")}[arch]
    base, model = make(), make()
    prefix(model, prefix_length=3)
    context = torch.tensor([7, 8, 9])
    inputs = inputs_for(arch)
    size = inputs["input_ids"].shape[0]
    with torch.no_grad():
        prefixes(model).prefix.copy_(context_keys_values(base, context, size))
        ours = backbone_of(model)(**inputs).last_hidden_state
        full = backbone_of(base)(input_ids=torch.cat([context.expand(size, -1), inputs["input_ids"]], dim=1),
                                 attention_mask=torch.cat([torch.ones(size, 3, dtype=torch.long),
                                                           inputs["attention_mask"]], dim=1)).last_hidden_state
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], full[:, 3:][mask], atol=1e-5, rtol=1e-5)


def test_mean_pooling_and_token_labels_see_the_real_tokens():
    inputs = batch()
    model = pooled("mean")
    prefix(model, prefix_length=3)
    seen = {}
    model.classifier.register_forward_hook(lambda m, args, out: seen.update(pooled=args[0]))
    with torch.no_grad():
        model(**inputs)
        hidden = backbone_of(model)(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(seen["pooled"], (hidden * mask).sum(1) / mask.sum(1), atol=1e-6, rtol=0)
    labels = torch.randint(0, 3, (4, 10), generator=torch.Generator().manual_seed(2))
    labels[inputs["attention_mask"] == 0] = -100
    tagger = tiny_token_classifier()
    prefix(tagger, prefix_length=3)
    with torch.no_grad():
        out = tagger(**inputs, labels=labels)
    assert out.logits.shape == (4, 10, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.view(-1, 3), labels.view(-1), ignore_index=-100))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_loss_is_over_the_real_tokens(kind):
    inputs = decoder_batch()
    labels = labels_for("lm-lm", inputs)
    model = tiny(kind)
    prefix(model, prefix_length=4)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape == (3, 7, 100)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_generation_with_the_cache_matches_full_forwards():
    model = tiny("gpt2")
    prefix(model, prefix_length=4)
    with torch.no_grad():
        prefixes(model).prefix.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
        manual = ids
        for _ in range(4):
            logits = model(input_ids=manual, attention_mask=torch.ones_like(manual)).logits
            manual = torch.cat([manual, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)


def test_gpt2_refuses_gradient_checkpointing_in_one_line():
    """GPT-2's checkpointed layers run without a cache, where the prefixes are."""
    inputs = decoder_batch()
    model = tiny("gpt2")
    prefix(model, prefix_length=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ConfigError, match="trainer.gradient_checkpointing=True: makes gpt2 run its layers without"):
        model.train()(**inputs, labels=labels_for("lm-lm", inputs))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    inputs = batch() if kind == "bert" else decoder_batch()
    labels = labels_for("bert" if kind == "bert" else "lm-lm", inputs)

    def gradients(checkpointing: bool) -> dict:
        model = tiny_bert() if kind == "bert" else tiny(kind)
        prefix(model, prefix_length=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()(**inputs, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=0)


def moved(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("arch", ["bert", "llama-lm"])
def test_saved_state_loads_back_bit_exact(arch, tmp_path):
    inputs = inputs_for(arch)
    model = MODELS[arch]()
    prefix(model, prefix_length=3)
    moved(model)
    path = tmp_path / records.STATE_FILE
    records.save_tensors(path, checkpoint.trainable_state(model))
    fresh = MODELS[arch]()
    prefix(fresh, prefix_length=3)
    with torch.no_grad():
        assert not torch.equal(fresh(**inputs).logits, model(**inputs).logits)
        checkpoint.load_trainable_state(fresh, records.load_file(str(path)))
        assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


def test_the_mlp_folds_into_plain_prefixes_that_save_and_load_alone(tmp_path):
    inputs = batch()
    model = tiny_bert()
    method = prefix(model, prefix_length=3, reparameterize=True, mlp_hidden=8)
    moved(model)
    with torch.no_grad():
        before = model(**inputs).logits
    method.finish_training(model)
    state = checkpoint.trainable_state(model)
    assert set(state) - head_parameter_names(model) == {f"bert.{MODULE}.prefix"}
    assert state[f"bert.{MODULE}.prefix"].shape == (L, 2, 3, D)
    path = tmp_path / records.STATE_FILE
    records.save_tensors(path, state)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, atol=1e-6, rtol=0)
    for reparameterize in (False, True):  # a rebuilt run: applied, then finished, then loaded
        fresh = tiny_bert()
        again = prefix(fresh, prefix_length=3, reparameterize=reparameterize, mlp_hidden=8)
        again.finish_training(fresh)
        checkpoint.load_trainable_state(fresh, records.load_file(str(path)))
        with torch.no_grad():
            assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


# ---------------------------------------------------------------- PEFT's PREFIX_TUNING

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("hidden", [None, 8])
def test_peft_parity_on_a_causal_lm(kind, hidden):
    """PEFT passes the prefixes as the cache of a decoder, with the real tokens after them; the same
    logits and loss. (Transformers 5's BERT classifiers take no cache in their forward, so PEFT's
    prefix tuning does not run on them: no encoder parity.)"""
    pytest.importorskip("peft")
    from lora_lab.bench.peft_twin import build_peft_twin

    inputs = decoder_batch()
    labels = labels_for("lm-lm", inputs)
    base, model = tiny(kind), tiny(kind)
    method = prefix(model, prefix_length=4, reparameterize=hidden is not None, mlp_hidden=hidden or 512)
    moved(model)
    twin = build_peft_twin(method, model, base).eval()
    assert twin.get_nb_trainable_parameters()[0] == method.expected_trainable(base)
    with torch.no_grad():
        theirs = twin(**inputs, labels=labels)
        ours = model(**inputs, labels=labels)
        plain = base(**inputs).logits
    assert (ours.logits - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.loss, ours.loss, atol=1e-5, rtol=1e-5)


def test_peft_config_only_on_a_causal_lm():
    """PEFT's prefix tuning needs a forward that takes a cache: transformers 5's classifiers take none."""
    pytest.importorskip("peft")
    for make in (tiny_bert, tiny_token_classifier, lambda: tiny("llama", "cls")):
        model = make()
        assert prefix(model).peft_config(model) is None
    model = tiny("llama")
    config = prefix(model, prefix_length=5).peft_config(model)
    assert (config.num_virtual_tokens, config.token_dim, config.num_attention_heads) == (5, D_KV, 2)


# ---------------------------------------------------------------- settings and the trainer

@pytest.mark.parametrize("key,value", [("prefix_length", 0), ("mlp_hidden", 0), ("reparameterize", "yes"),
                                       ("train_head", 1)])
def test_bad_settings_are_one_line(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}="):
        build_method(method_cfg("prefix", **{key: value}))


def test_compose_and_describe():
    cfg = compose_config("arm=prefix")
    assert cfg.method.name == "prefix" and cfg.trainer.lr == pytest.approx(1e-2)
    method = describe_method(cfg.method)
    assert method.label() == "Prefix tuning l_p=10" and method.run_tag() == "prefix-10"
    assert describe_method(method_cfg("prefix", reparameterize=True)).label() == "Prefix tuning l_p=10 (MLP 512)"


@pytest.mark.parametrize("model_cfg,mlp", [("tiny", False), ("tiny_gpt2", False), ("tiny", True)])
def test_three_steps_through_the_trainer(tmp_path, model_cfg, mlp):
    from lora_lab.runtime.rebuild import rebuild_trained
    from lora_lab.trainer.train import run_training

    cfg = compose_config("experiment=smoke", f"model={model_cfg}", "method=prefix", "method.prefix_length=4",
                         f"method.reparameterize={str(mlp).lower()}", "method.mlp_hidden=8", "data.max_train=24",
                         "trainer.threads=1", f"data.cache_dir={tmp_path / 'cache'}")
    run_dir = tmp_path / "run"
    record = run_training(cfg, run_dir)
    assert record["status"] == "completed" and record["last"]["step"] == 3 and record["delta_w"].startswith("none:")
    p = record["parameters"]
    assert p["trainable_method"] == (4 * D + (D + 1) * 8 + 9 * 2 * L * D if mlp else 2 * L * D * 4)
    state = records.load_file(str(run_dir / records.STATE_FILE))
    own = {n: t for n, t in state.items() if MODULE in n}
    assert len(own) == 1 and next(iter(own)).endswith(f".{MODULE}.prefix")
    assert next(iter(own.values())).shape == (L, 2, 4, D)  # plain prefixes, also after training through the MLP
    rebuilt = rebuild_trained(run_dir)
    assert torch.equal(prefixes(rebuilt.model).prefix.detach(), next(iter(own.values())))
