"""Whole runs on tiny random decoders (GPT-2, Llama, Qwen2): sequence classification on the embedded
data and causal-LM fine-tuning on prompt/response files, with the run record, ΔW and measurements; the
LoRA paper's Table 3 experiment plans its jobs; label smoothing is the model's loss at zero."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_config
from test_train import SMOKE, cli

ARCHS = ["tiny_gpt2", "tiny_llama", "tiny_qwen2"]
PAIRS = [{"prompt": f"name[{n}], food[{f}]", "response": f"{n} serves {f} food."}
         for n in ("Aromi", "Zizzi", "Cotto", "Alimentum", "Bibimbap") for f in ("French", "Italian", "Indian")]


def run(tmp_path, *overrides):
    from lora_lab.trainer import train

    cfg = compose_config(*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "trainer.threads=1",
                         "trainer.latency_repeats=1", "trainer.checkpoint_every=0", "data.max_train=48",
                         "data.max_eval=16", *overrides)
    return train.run_training(cfg, tmp_path / "run")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_decoder_classifies_with_lora_and_records_the_q_and_v_updates(tmp_path, arch):
    from lora_lab.runtime.rebuild import load_run_deltas

    record = run(tmp_path, f"model={arch}", "method=lora")
    assert record["status"] == "completed" and record["model_resolved"]["pooling"] == "last"
    d, layers, r = 32, 2, 8
    kv = 16 if arch == "tiny_llama" else d  # tiny_llama: 2 of 4 heads carry keys and values
    assert record["parameters"]["trainable_method"] == layers * r * ((d + d) + (d + kv))
    assert record["parameters"]["trainable_head"] == d * 2  # the score layer: no bias
    keys = set(load_run_deltas(tmp_path / "run"))
    assert {k: tuple(v) for k, v in record["delta_w_shapes"].items()} == {k: (d, d) if k.endswith(("c_attn.q", "c_attn.v", "q_proj")) else (kv, d) for k in keys}
    if arch == "tiny_gpt2":  # the q and v parts of the fused c_attn, each d x d
        assert keys == {f"transformer.h.{i}.attn.c_attn.{p}" for i in range(layers) for p in "qv"}
    else:
        assert keys == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qv"}
    assert record["measurements"]["train_tokens_per_s"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_a_decoder_fine_tunes_as_a_causal_lm(tmp_path, arch):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    record = run(tmp_path, f"model={arch}", "method=lora", "data=files", f"data.files.train={train_file}",
                 "data.task_type=causal_lm", "data.prompt_column=prompt", "data.response_column=response",
                 "data.val_fraction=0.2", "data.test_fraction=0.2", "trainer.label_smoothing=0.1",
                 "trainer.warmup_steps=1")
    best = record["best"]
    assert record["task"]["type"] == "causal_lm" and record["task"]["main_metric"] == "perplexity"
    assert math.isfinite(best["test/perplexity"]) and best["test/perplexity"] == pytest.approx(
        math.exp(best["test/loss"]))
    assert record["parameters"]["trainable_head"] == 0  # the LM head is pre-trained: LoRA leaves it frozen
    assert record["baseline"]["name"] == "pre-trained model"


def test_label_smoothing_zero_is_the_models_loss_and_smoothing_follows_its_formula(one_torch_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_lab.tasks.losses import training_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50)).eval()
    ids = torch.randint(3, 50, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[1, 6] = -100   # padding
    out = model(input_ids=ids, labels=labels)
    assert training_loss(out, {"labels": labels}, "lm", 0.0) is out.loss
    assert training_loss(out, {"labels": labels}, "lm", 1e-12).item() == pytest.approx(out.loss.item(), abs=1e-6)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    kept = labels[:, 1:] != -100
    nll = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0][kept].mean()
    uniform = -logp.mean(-1)[kept].mean()
    expected = 0.9 * nll + 0.1 * uniform
    assert training_loss(out, {"labels": labels}, "lm", 0.1).item() == pytest.approx(expected.item(), rel=1e-5)


def test_label_smoothing_on_regression_is_one_line():
    from lora_lab.config.validate import check_config
    from lora_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.label_smoothing=0.1: applies to cross-entropy losses"):
        check_config(compose_config("data.task_type=regression", "trainer.label_smoothing=0.1"))


def test_paper_table3_plans_gpt2_medium_on_e2e_with_the_papers_settings(tmp_path, warm_cli):
    out = cli("experiment=paper_table3", "arm=paper/t3_lora", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}",
              "logger=disabled", cwd=tmp_path, warm=warm_cli)  # the LoRA row
    assert out.returncode == 0, out.stderr
    plans = [line for line in out.stdout.splitlines() if line.startswith("[dry run]")]
    assert len(plans) == 3
    for seed, plan in enumerate(plans):
        assert "LoRA r=4 α=32 (q+v)" in plan and "openai-community/gpt2-medium" in plan
        assert "tuetschek/e2e_nlg" in plan and "lr 0.0002, batch 8, 5 epochs" in plan and f"seed {seed}" in plan
    cfg = compose_config("experiment=paper_table3", "arm=paper/t3_lora", "seed=0")
    t = cfg.trainer
    assert (t.warmup_steps, t.label_smoothing, t.weight_decay, cfg.method.dropout) == (500, 0.1, 0.01, 0.1)
    assert (t.generation.num_beams, t.generation.length_penalty, t.generation.no_repeat_ngram_size) == (10, 0.9, 4)
