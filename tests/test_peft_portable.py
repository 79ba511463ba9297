"""``lora-lab-export --portable``: an adapter that plain PEFT + transformers load without lora_lab, its
head rebuilt as the README.md beside it says; and ``--push-to-hub`` (dry run, and the one-line failure
without a network)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from test_peft_adapters import fake_run

from lora_lab.peft.export import export_run, main, rebuild_run
from lora_lab.peft.portable import BASE_PLACEHOLDER, base_name

pytest.importorskip("peft")

# runs the card's two code blocks, in a process that never imports lora_lab
LOADER = textwrap.dedent("""
    import re, sys
    import torch
    from safetensors.torch import load_file, save_file
    card, base_folder, batch_file, out = sys.argv[1:]
    blocks = re.findall(r"```python\\n(.*?)```", open(card).read(), re.S)
    scope = {"batch": load_file(batch_file)}
    exec(blocks[0].replace(%s, base_folder), scope)
    exec(blocks[-1], scope)  # the block between loads the tokenizer from the Hub: the batch is given
    assert not any(name.split(".")[0] == "lora_lab" for name in sys.modules), "lora_lab was imported"
    save_file({"logits": scope["logits"].contiguous()}, out)
""") % json.dumps(BASE_PLACEHOLDER)


@pytest.mark.parametrize("pooling", ["pooler", "mean", "cls"])
def test_portable_adapter_loads_with_plain_peft(tmp_path, pooling):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ours = fake_run(run_dir, f"model.pooling={pooling}")
    exported = export_run(run_dir, tmp_path / "adapter", portable=True)
    assert exported.max_logit_difference <= 1e-5 < exported.max_logit_change
    adapter = tmp_path / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # a random model: the card says what to load instead
    assert "classifier" in config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
    card = (adapter / "README.md").read_text()
    assert "BertForSequenceClassification.from_pretrained" in card
    assert ("mean of the last hidden states" in card) == (pooling == "mean")

    # the base as a user has it: saved with save_pretrained (lora_lab's pooled head keeps the bare encoder)
    base = rebuild_run(run_dir).base
    (base if pooling == "pooler" else base.bert).save_pretrained(tmp_path / "base")
    assert not list((tmp_path / "base").glob("*.bin"))
    inputs = {"input_ids": torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(3))}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, 6:] = 0
    save_file(inputs, tmp_path / "batch.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOADER, str(adapter / "README.md"), str(tmp_path / "base"),
                           str(tmp_path / "batch.safetensors"), str(tmp_path / "logits.safetensors")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(tmp_path / "logits.safetensors")["logits"]
    with torch.no_grad():
        expected = ours(**inputs).logits
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)


def test_portable_refuses_a_head_the_standard_class_cannot_hold(tmp_path, capsys):
    fake_run(tmp_path, "model.arch=gpt2", "model.pooling=mean")  # GPT-2's own head is `score`, ours `classifier`
    assert main([str(tmp_path), str(tmp_path / "adapter"), "--portable"]) == 2
    err = capsys.readouterr().err
    assert err == ("lora-lab-export: error: model.pooling='mean': --portable needs the run's parameters in "
                   "GPT2ForSequenceClassification: lora_lab's classifier.weight (2, 32), "
                   "GPT2ForSequenceClassification has none\n")
    assert not (tmp_path / "adapter").exists()


def test_portable_base_names():
    embedded = OmegaConf.create({"source": "embedded", "name": "all-MiniLM-L6-v2"})
    assert base_name(embedded)[0] == "sentence-transformers/all-MiniLM-L6-v2"
    hub = OmegaConf.create({"source": "hub", "name": "FacebookAI/roberta-base"})
    assert base_name(hub)[0] == "FacebookAI/roberta-base"
    local = OmegaConf.create({"source": "hub", "name": "/nowhere/my-model"})
    assert base_name(local) == ("/nowhere/my-model", "a local folder on the machine that trained the run: "
                                "point this at your copy of it")
    assert base_name(OmegaConf.create({"source": "random", "arch": "bert"}))[0] is None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    fake_run(folder)
    return folder


def test_push_dry_run_lists_the_upload_and_contacts_nothing(run_dir, tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a dry run reached the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    out = tmp_path / "adapter"
    assert main([str(run_dir), str(out), "--push-to-hub", "someone/tiny-adapter", "--private", "--dry-run",
                 "--no-check"]) == 0
    printed = capsys.readouterr().out
    assert "would upload to https://huggingface.co/someone/tiny-adapter (private model repository" in printed
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert re.search(rf"^  {re.escape(name)}  {(out / name).stat().st_size:,} bytes$", printed, re.M), printed
    assert "  3 files, " in printed
    assert "someone/tiny-adapter" in (out / "README.md").read_text()  # the card loads it from the Hub


def test_push_without_network_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as no network: never leaves here
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert main([str(run_dir), str(tmp_path / "adapter"), "--push-to-hub", "someone/tiny-adapter",
                 "--no-check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lora-lab-export: error: push to someone/tiny-adapter failed: ") and err.count("\n") == 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()  # the export itself stands


def test_push_options_refused_one_line(run_dir, tmp_path, capsys):
    assert main([str(run_dir), str(tmp_path / "a"), "--push-to-hub", "not a repo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-lab-export: error: --push-to-hub='not a repo': ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), str(tmp_path / "b"), "--dry-run"])
    assert exit_.value.code == 2
    assert "lora-lab-export: error: --private and --dry-run go with --push-to-hub REPO" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
