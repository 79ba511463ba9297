"""Prompt tuning (PreEmbed): virtual token embeddings before the input (l_p) and before its last real
token (l_i). Counts d x (l_p + l_i) on BERT, GPT-2 and Llama, gradients on the virtual tokens and the
head only, heads that read the real tokens only (pooling, token labels, a causal LM's loss), the
saved state, parity with PEFT's PROMPT_TUNING, and a run through the trainer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, compose_config, method_cfg, tiny_bert
from test_decoder_methods import tiny

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method, describe_method
from lora_lab.methods.prompt import MODULE, backbone_of
from lora_lab.models.architectures import head_parameter_names
from lora_lab.models.pooling import PooledClassifier
from lora_lab.runtime import checkpoint, records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, L = 32, 2  # the tiny models' width and depth


def prompt(model, **overrides):
    method = build_method(method_cfg("prompt", **overrides))
    method.apply(model)
    return method


def virtual(model):
    return getattr(backbone_of(model), MODULE)


def tiny_token_classifier(num_labels: int = 3):
    from transformers import BertForTokenClassification

    config = tiny_bert().config
    config.num_labels = num_labels
    torch.manual_seed(0)
    return BertForTokenClassification(config).eval()


def pooled(pooling: str):
    from transformers import BertModel

    config = tiny_bert().config
    torch.manual_seed(0)
    return PooledClassifier(BertModel(config, add_pooling_layer=False), pooling).eval()


def decoder_batch(size: int = 3, length: int = 7):
    ids = torch.randint(1, 100, (size, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding; the decoders' pad id is 0
    ids[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


MODELS = {"bert": tiny_bert, "gpt2": lambda: tiny("gpt2", "cls"), "gpt2-lm": lambda: tiny("gpt2"),
          "llama": lambda: tiny("llama", "cls"), "llama-lm": lambda: tiny("llama")}


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("l_p,l_i", [(4, 0), (3, 2)])
def test_count_is_d_times_lp_plus_li_and_only_the_tokens_and_head_get_gradients(arch, l_p, l_i):
    model = MODELS[arch]()
    if arch.endswith("-lm") and l_i:
        with pytest.raises(ConfigError, match="method.infix_length=2: needs the end of the prompt"):
            prompt(model, prefix_length=l_p, infix_length=l_i)
        return
    head = sum(p.numel() for n, p in model.named_parameters() if n in head_parameter_names(model))
    method = prompt(model, prefix_length=l_p, infix_length=l_i)
    tokens = method.method_parameter_names(model)
    assert sum(model.get_parameter(n).numel() for n in tokens) == D * (l_p + l_i)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == tokens | head_parameter_names(model)
    assert sum(model.get_parameter(n).numel() for n in trained) == method.expected_trainable(MODELS[arch]())
    assert method.expected_trainable(MODELS[arch]()) == D * (l_p + l_i) + head
    inputs = decoder_batch() if arch != "bert" else batch()
    out = model.train()(**inputs, labels=inputs["input_ids"] if arch.endswith("-lm") else torch.tensor([0, 1, 0, 1])[
        :inputs["input_ids"].shape[0]])
    out.loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in tokens)
    assert method.delta_weights(model) == {} and not method.adapts_matrices() and not method.supports_merge


def test_training_moves_the_real_tokens_outputs_and_no_backbone_weight():
    inputs = batch()
    model = tiny_bert()
    method = prompt(model, prefix_length=4, infix_length=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = model(**inputs, output_hidden_states=True).hidden_states[-1].detach()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model(**inputs, output_hidden_states=True).hidden_states[-1].detach()
    assert after.shape == before.shape == (4, 10, D)
    assert (after - before).abs().max() > 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert method.method_parameter_names(model) == {f"bert.{MODULE}.prefix", f"bert.{MODULE}.infix"}


def manual_hidden(base, model, inputs, l_p: int, l_i: int) -> torch.Tensor:
    """The base backbone on the input with the virtual tokens put in by hand, the real positions taken out."""
    tokens = virtual(model)
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    rows = []
    for row, mask in zip(embeds, inputs["attention_mask"]):
        last = int(mask.nonzero().max())  # the infix goes before the last real token
        parts = [tokens.prefix, row[:last]] + ([tokens.infix] if l_i else []) + [row[last:]]
        rows.append(torch.cat(parts))
    masks = []
    for mask in inputs["attention_mask"]:
        last = int(mask.nonzero().max())
        masks.append(torch.cat([torch.ones(l_p, dtype=mask.dtype), mask[:last], torch.ones(l_i, dtype=mask.dtype),
                                mask[last:]]))
    with torch.no_grad():
        hidden = backbone_of(base)(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks)).last_hidden_state
    out = []
    for h, mask in zip(hidden, inputs["attention_mask"]):
        last = int(mask.nonzero().max())
        out.append(torch.cat([h[l_p: l_p + last], h[l_p + last + l_i:]]))
    return torch.stack(out)


@pytest.mark.parametrize("l_i", [0, 2])
def test_virtual_tokens_sit_before_the_input_and_before_its_last_real_token(l_i):
    inputs = batch()
    base, model = tiny_bert(), tiny_bert()
    prompt(model, prefix_length=3, infix_length=l_i)
    with torch.no_grad():
        ours = backbone_of(model)(**inputs).last_hidden_state
    torch.testing.assert_close(ours, manual_hidden(base, model, inputs, 3, l_i), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_heads_read_the_real_tokens_only(pooling):
    inputs = batch()
    base, model = pooled(pooling), pooled(pooling)
    prompt(model, prefix_length=3, infix_length=2)
    seen = {}
    model.classifier.register_forward_hook(lambda m, args, out: seen.update(pooled=args[0]))
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = backbone_of(model)(**inputs).last_hidden_state
    assert hidden.shape == (4, 10, D) and logits.shape == (4, 2)
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1) if pooling == "mean" else hidden[:, 0]
    torch.testing.assert_close(seen["pooled"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden, manual_hidden(base, model, inputs, 3, 2), atol=1e-5, rtol=0)


def test_berts_pooler_reads_the_real_cls():
    inputs = batch()
    model = tiny_bert()
    prompt(model, prefix_length=3)
    with torch.no_grad():
        out = backbone_of(model)(**inputs)
    torch.testing.assert_close(out.pooler_output, model.bert.pooler(out.last_hidden_state), atol=0, rtol=0)


def test_token_labels_stay_aligned():
    inputs = batch()
    labels = torch.randint(0, 3, (4, 10), generator=torch.Generator().manual_seed(2))
    labels[inputs["attention_mask"] == 0] = -100
    model = tiny_token_classifier()
    prompt(model, prefix_length=3, infix_length=1)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape == (4, 10, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.view(-1, 3), labels.view(-1), ignore_index=-100))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_loss_is_over_the_real_tokens(kind):
    inputs = decoder_batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model = tiny(kind)
    prompt(model, prefix_length=4)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape == (3, 7, 100)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_generation_with_the_cache_matches_full_forwards():
    """The virtual tokens enter the cache once; each later step extends the mask by them."""
    model = tiny("gpt2")
    prompt(model, prefix_length=4)
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
        manual = ids
        for _ in range(4):
            logits = model(input_ids=manual, attention_mask=torch.ones_like(manual)).logits
            manual = torch.cat([manual, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_saved_state_loads_back_bit_exact(arch, tmp_path):
    make = MODELS[arch]
    inputs = batch() if arch == "bert" else decoder_batch()
    model = make()
    prompt(model, prefix_length=3, infix_length=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    path = tmp_path / records.STATE_FILE
    records.save_tensors(path, checkpoint.trainable_state(model))
    fresh = make()
    prompt(fresh, prefix_length=3, infix_length=2)
    with torch.no_grad():
        assert not torch.equal(fresh(**inputs).logits, model(**inputs).logits)
        checkpoint.load_trainable_state(fresh, records.load_file(str(path)))
        assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


def test_init_vocab_copies_embedding_rows_and_random_matches_their_scale():
    model = tiny_bert()
    prompt(model, prefix_length=8, init="vocab")
    rows = model.get_input_embeddings().weight
    assert all((rows == token).all(dim=1).any() for token in virtual(model).prefix.detach())
    model = tiny_bert()
    prompt(model, prefix_length=200, init="random")
    assert virtual(model).prefix.std().item() == pytest.approx(rows.std().item(), rel=0.2)


# ---------------------------------------------------------------- PEFT's PROMPT_TUNING

def peft_twin(method, model, base):
    pytest.importorskip("peft")
    from lora_lab.bench.peft_twin import build_peft_twin

    return build_peft_twin(method, model, base).eval()


def test_peft_parity_on_an_encoders_real_tokens():
    """BERT token tagging (TOKEN_CLS): PEFT keeps its l_p virtual positions in the logits; the real ones
    agree. (A pooled head cannot agree: PEFT's pooler and CLS read its first virtual token.)"""
    inputs = batch()
    base, model = tiny_token_classifier(), tiny_token_classifier()
    method = prompt(model, prefix_length=4)
    twin = peft_twin(method, model, base)
    with torch.no_grad():
        theirs = twin(**inputs).logits
        ours = model(**inputs).logits
        plain = base(**inputs).logits
    assert theirs.shape == (4, 14, 3) and (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs[:, 4:], ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_parity_on_a_causal_lm(kind):
    """The logits of the real tokens agree. PEFT's loss also scores the first real token, from its last
    virtual position; ours scores the tokens the base model scores, so the losses agree on those."""
    inputs = decoder_batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    base, model = tiny(kind), tiny(kind)
    method = prompt(model, prefix_length=4)
    twin = peft_twin(method, model, base)
    with torch.no_grad():
        theirs = twin(**inputs, labels=labels)
        ours = model(**inputs, labels=labels)
    torch.testing.assert_close(theirs.logits[:, 4:], ours.logits, atol=1e-5, rtol=1e-5)
    real = F.cross_entropy(theirs.logits[:, 4:-1].reshape(-1, 100), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(real, ours.loss, atol=1e-5, rtol=1e-5)


def test_peft_config_only_where_peft_computes_the_same():
    """None with an infix (PEFT has none) and on a sequence classifier (PEFT's head reads its virtual tokens)."""
    pytest.importorskip("peft")
    tagger = tiny_token_classifier()
    assert prompt(tagger, infix_length=2).peft_config(tagger) is None
    tagger = tiny_token_classifier()
    assert prompt(tagger).peft_config(tagger).num_virtual_tokens == 20
    for model in (tiny_bert(), tiny("gpt2", "cls")):
        assert prompt(model).peft_config(model) is None


# ---------------------------------------------------------------- settings and the trainer

@pytest.mark.parametrize("key,value", [("prefix_length", 0), ("infix_length", -1), ("init", "text"),
                                       ("train_head", "yes")])
def test_bad_settings_are_one_line(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}="):
        build_method(method_cfg("prompt", **{key: value}))


def test_compose_and_describe():
    cfg = compose_config("arm=prompt")
    assert cfg.method.name == "prompt" and cfg.trainer.lr == pytest.approx(3e-2)
    method = describe_method(cfg.method)
    assert method.label() == "Prompt tuning l_p=20" and method.run_tag() == "prompt-20"
    assert describe_method(method_cfg("prompt", infix_length=4)).label() == "Prompt tuning l_p=20 l_i=4"


@pytest.mark.parametrize("model_cfg", ["tiny", "tiny_gpt2"])
def test_three_steps_through_the_trainer(tmp_path, model_cfg):
    from lora_lab.trainer.train import run_training

    cfg = compose_config("experiment=smoke", f"model={model_cfg}", "method=prompt", "method.prefix_length=4",
                         "method.infix_length=1", "data.max_train=24", "trainer.threads=1",
                         f"data.cache_dir={tmp_path / 'cache'}")
    record = run_training(cfg, tmp_path / "run")
    assert record["status"] == "completed" and record["last"]["step"] == 3
    p = record["parameters"]
    assert p["trainable_method"] == D * 5 and p["trainable_other"] == 0
    assert record["delta_w"].startswith("none:")
    state = records.load_file(str(tmp_path / "run" / records.STATE_FILE))
    assert sum(t.numel() for t in state.values()) == p["trainable"]
