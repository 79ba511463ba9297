"""The PEFT bridge (``method=peft``): PEFT's tuners inside lora_lab's model and trainer. Every shipped arm trains,
counts its trainable parameters as PEFT does plus the head, merges where PEFT merges, reports ΔW by the bridge's
rule; AdaLoRA reallocates its ranks through the trainer's per-step hook and records them."""
from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from conftest import batch, compose_config, tiny_bert
from omegaconf import open_dict
from test_method_registry import check_delta_weights, check_merge, check_state_round_trip

from lora_lab.config.compose import arm_method
from lora_lab.config.validate import check_config
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.methods.base import head_count
from lora_lab.models.architectures import head_parameter_names
from lora_lab.models.linear_layers import dense_weight
from lora_lab.runtime import records
from lora_lab.trainer.optim import make_optimizer
from lora_lab.trainer.train import run_training

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

LABELS = torch.tensor([0, 1, 0, 1])
ARMS = ["vera", "loha", "lokr", "oft", "adalora", "ln_tuning", "prompt_tuning"]
MERGING = ["vera", "loha", "lokr", "oft", "adalora", "ln_tuning"]
WEIGHT_DELTA = ["vera", "loha", "lokr", "oft", "adalora"]


def arm_cfg(arm: str, **options):
    cfg = arm_method(arm)
    with open_dict(cfg):
        for key, value in options.items():
            cfg.options[key] = value
    return cfg


def steps(arm: str) -> dict:
    """AdaLoRA's total_step, which the generic checks (no trainer) must give."""
    return {"total_step": 10} if arm == "adalora" else {}


def applied(cfg, model=None, total_steps: int = 10):
    model = model or tiny_bert()
    method = build_method(cfg)
    method.total_steps = total_steps  # as the trainer sets it before apply
    method.apply(model)
    return method, model


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_trains_three_steps_on_its_own_parameters(arm):
    method, model = applied(arm_cfg(arm), total_steps=3)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    own = method.method_parameter_names(model)
    assert own and trained == own | head_parameter_names(model)
    optimizer = make_optimizer(model, 1e-2, 0.01, method.lr_scales(model))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for step in range(1, 4):
        loss = model(**batch(seed=step), labels=LABELS).loss
        assert math.isfinite(loss.item())
        loss.backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trained
        optimizer.step()
        method.after_optimizer_step(model, step)
        optimizer.zero_grad(set_to_none=True)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert moved and moved <= trained and moved & own


@pytest.mark.parametrize("arm", ARMS)
def test_trainable_count_is_pefts_plus_the_head(arm):
    cfg = arm_cfg(arm)
    reference = tiny_bert()
    method, model = applied(cfg)
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = method.peft_config_object(10)
    if arm == "prompt_tuning":  # PEFT's prompt learning needs a task: its encoder's, features
        config.task_type = "FEATURE_EXTRACTION"
        twin = peft.get_peft_model(copy.deepcopy(reference.bert), config)
    else:
        twin = peft.get_peft_model(copy.deepcopy(reference), config)
    assert ours == twin.get_nb_trainable_parameters()[0] + head_count(reference) == method.expected_trainable(reference)
    assert method.resolved["peft_trainable"] == twin.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("arm", MERGING)
def test_merged_equals_unmerged_and_unmerging_restores(arm):
    check_merge(arm_cfg(arm, **steps(arm)))


def test_prompt_tuning_does_not_merge():
    method, model = applied(arm_cfg("prompt_tuning"))
    assert not method.supports_merge and not method.merge_layers(model)


@pytest.mark.parametrize("arm", WEIGHT_DELTA)
def test_delta_w_is_the_merged_weight_minus_the_base(arm):
    """PEFT's get_delta_weight where it is additive (VeRA, LoHa, LoKr, AdaLoRA), merged minus base for OFT."""
    cfg = arm_cfg(arm, **steps(arm))
    check_delta_weights(cfg)
    method, model = applied(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    deltas = method.delta_weights(model)
    assert deltas and all(d.kind == f"peft_{method.peft_type().lower()}" for d in deltas.values())
    method.prepare_inference(model)
    for name, d in deltas.items():
        merged = dense_weight(model.get_submodule(name).get_base_layer()).detach()
        torch.testing.assert_close(d.base + d.dense, merged, atol=1e-5, rtol=1e-5, msg=name)
    method.undo_inference(model)


@pytest.mark.parametrize("arm", ["ln_tuning", "prompt_tuning"])
def test_a_tuner_without_weight_delta_reports_none_and_says_so(arm):
    method, model = applied(arm_cfg(arm))
    assert not method.adapts_matrices() and method.delta_weights(model) == {}
    assert "changes no weight matrix" in method.resolved["delta_w"]


@pytest.mark.parametrize("arm", ["vera", "loha", "prompt_tuning"])
def test_trained_state_round_trips(arm, tmp_path):
    check_state_round_trip(arm_cfg(arm), tmp_path)


def test_prompt_tuning_prepends_virtual_tokens_and_heads_read_the_real_ones():
    method, model = applied(arm_cfg("prompt_tuning", num_virtual_tokens=3))
    inputs = batch()
    out = model.bert(**inputs)
    assert out.last_hidden_state.shape[1] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(out.pooler_output, model.bert.pooler(out.last_hidden_state))
    assert model(**inputs).logits.shape == (4, 2)
    plain = tiny_bert()
    assert not torch.allclose(model(**inputs).logits, plain(**inputs).logits)  # the prompt changes the outputs


def test_prompt_tuning_on_a_mean_pooled_classifier_pools_the_real_tokens():
    from lora_lab.models.loading import load_model

    cfg = compose_config("model=tiny", "model.pooling=mean", "arm=prompt_tuning", "method.options.num_virtual_tokens=3")
    torch.manual_seed(0)
    model = load_model(cfg.model, 2).eval()
    method, model = applied(cfg.method, model)
    inputs = batch()
    hidden = model.backbone(**inputs).last_hidden_state
    assert hidden.shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(model(**inputs).logits, model.classifier(model.pool(hidden, inputs["attention_mask"])))
    assert method.method_parameter_names(model) == {"bert.peft_prompt.default.embedding.weight"}


def test_the_documented_command_line_composes_and_trains_its_tuner():
    cfg = compose_config("model=tiny", "method=peft", "method.peft_type=vera",
                         "method.options={r: 8, target_modules: [query, value]}")
    check_config(cfg)
    method, model = applied(cfg.method)
    assert method.resolved["peft_type"] == "VERA" and method.label() == "VeRA (PEFT) r=8"
    assert len(method.tuner_layers(model)) == 4  # query and value of both layers


def test_an_unknown_peft_type_is_one_line_listing_pefts_tuners():
    cfg = compose_config("model=tiny", "method=peft", "method.peft_type=NOPE")
    with pytest.raises(ConfigError, match=r"^method\.peft_type='NOPE': is not a PEFT tuner .*VERA") as error:
        check_config(cfg)
    assert "\n" not in str(error.value) and "LOHA" in str(error.value) and "PROMPT_TUNING" in str(error.value)


def test_an_option_the_config_class_refuses_is_one_line():
    cfg = compose_config("model=tiny", "arm=vera", "+method.options.not_an_option=3")
    with pytest.raises(ConfigError, match=r"^method\.options=.*VeraConfig refuses them") as error:
        check_config(cfg)
    assert "\n" not in str(error.value)
    cfg = compose_config("model=tiny", "arm=vera", "method.options.target_modules=[nothing_here]")
    with pytest.raises(ConfigError, match=r"^method\.options=.*cannot adapt this model") as error:
        applied(cfg.method)
    assert "\n" not in str(error.value)


def test_adalora_needs_its_steps_outside_a_run():
    method = build_method(arm_cfg("adalora"))
    with pytest.raises(ConfigError, match=r"^method\.options\.total_step=None: AdaLoRA needs"):
        method.apply(tiny_bert())


def test_adalora_reallocates_ranks_through_the_trainer_and_records_them(tmp_path):
    """A tight budget (4 ranks per matrix down to 1 on average) over the smoke run's 8 steps: the trainer's
    per-step hook prunes, total_step is the run's, and the record keeps the ranks each matrix ends with."""
    cfg = compose_config("experiment=smoke", "logger=disabled", "arm=adalora", "trainer.threads=1",
                         "method.options.init_r=4", "method.options.target_r=1", "method.options.tinit=1",
                         "method.options.tfinal=2", "method.options.deltaT=1", f"data.cache_dir={tmp_path / 'cache'}")
    threads = torch.get_num_threads()
    try:
        record = run_training(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    resolved = records.load_record(tmp_path / "run")["method_resolved"]
    assert record["status"] == "completed" and resolved["peft_type"] == "ADALORA"
    assert resolved["total_step"] == 8 and resolved["initial_rank"] == 4  # 64 examples in batches of 8, one epoch
    ranks = resolved["ranks"]
    assert len(ranks) == 4 and set(ranks.values()) != {4}
    assert sum(ranks.values()) <= 4 * len(ranks) // 4 + 1  # the budget: target_r per matrix on average
    p = record["parameters"]
    assert p["trainable_method"] == resolved["peft_trainable"] and p["trainable_other"] == 0
    # the subspace report lists the ranks each matrix ended with
    from lora_lab.analysis.subspace_report import main as subspace

    out = tmp_path / "report"
    assert subspace([str(tmp_path / "run"), "--out", str(out), "--analyses", "spectra", "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "## Ranks allocated while training (AdaLoRA)" in report and "initial rank 4" in report
    with open(out / "adaptive_ranks.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["module"]: int(r["final rank"]) for r in rows} == ranks


def test_adalora_resumed_after_its_final_allocation_masks_by_the_saved_zeros():
    method, model = applied(arm_cfg("adalora", init_r=4, target_r=1, tinit=1, tfinal=2, deltaT=1), total_steps=6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.tensor([[1.0], [0.0], [0.0], [2.0]]))  # as a checkpoint saved them: 2 of 4 kept
    model.train()
    model(**batch(), labels=LABELS).loss.backward()
    method.after_optimizer_step(model, 5)  # past total_step - tfinal, with no rank pattern (a fresh process)
    assert set(method.resolved["ranks"].values()) == {2}


def test_adalora_adds_its_orthogonality_regulariser_as_pefts_model_does():
    """Our task loss + extra_loss = the loss of PEFT's own AdaLoRA model on the same weights and batch."""
    import copy

    import peft

    reference = tiny_bert()
    method, model = applied(arm_cfg("adalora", orth_reg_weight=0.3), model=copy.deepcopy(reference))
    with torch.no_grad():  # B starts at zero; make both factors far from orthogonal
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    theirs = peft.get_peft_model(copy.deepcopy(reference), method.peft_config_object(10))
    theirs.load_state_dict({f"base_model.model.{n}": p for n, p in model.state_dict().items()}, strict=False)
    model.train(), theirs.train()
    torch.manual_seed(0)
    ours = model(**batch(), labels=LABELS).loss + method.extra_loss(model)
    torch.manual_seed(0)
    # PEFT's AdaLoRA model adds it in its forward (PeftModel's generic forward would skip that forward)
    assert float(ours) == pytest.approx(float(theirs.base_model(**batch(), labels=LABELS).loss), rel=1e-5)
    extra = method.extra_loss(model)
    extra.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_A" in n or "lora_B" in n for n in grads)
    method, model = applied(arm_cfg("adalora", orth_reg_weight=0.0))
    assert method.extra_loss(model) is None
    method, model = applied(arm_cfg("vera"))
    assert method.extra_loss(model) is None
