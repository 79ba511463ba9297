"""Bad input, one row each: the command prints exactly one line, ``lora-lab: error: ...`` naming the
key, exits with status 2, and trains nothing. Most rows run the command in this process (Hydra and
all); a few run it as a process of its own to prove the installed command behaves the same: the first
as a fresh ``python -m lora_lab.cli.main``, the others forked from a warm interpreter (tests/warm_cli.py)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lora_lab.cli import main as main_module
from lora_lab.models.files import embedded_model_path

SMOKE = ["experiment=smoke", "logger=disabled"]
STATE_FILE = "trainable.safetensors"


def write_csv(path, rows, header=("review", "sentiment"), encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def balanced(n=40):
    return [(f"review number {i} {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(n)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every bad file and folder the rows refer to, written once."""
    d = tmp_path_factory.mktemp("inputs")
    write_csv(d / "good.csv", balanced())
    write_csv(d / "header_only.csv", [])
    (d / "zero_bytes.csv").write_bytes(b"")
    (d / "garbage.csv").write_bytes(b'\x00\x01garbage\n"unterminated,,,\n\x89PNG\r\n')
    (d / "ragged.csv").write_text("review,sentiment\na,pos,extra,fields\nb,neg\n")
    (d / "broken.json").write_text('[{"review": "a", "sentiment": "pos"}, {"review": "b",')
    (d / "broken.jsonl").write_text('{"review": "a", "sentiment": "pos"}\n{"review": "b", sentiment: neg}\n')
    write_csv(d / "latin1.csv", [(f"café naïve crème {i}", "pos" if i % 2 else "neg") for i in range(40)],
              encoding="latin-1")
    write_csv(d / "one_class.csv", [(f"review {i}", "pos") for i in range(40)])
    write_csv(d / "negative.csv", [(f"review {i}", [-2, 0, 1][i % 3]) for i in range(40)])
    write_csv(d / "minus_one.csv", [(f"review {i}", [-1, 1][i % 2]) for i in range(40)])
    write_csv(d / "int_labels.csv", [(f"review {i}", i % 3) for i in range(40)])
    write_csv(d / "fractional.csv", [(f"review {i}", [0, 1, 0.5][i % 3]) for i in range(40)])
    write_csv(d / "neutral.csv", [(f"review {i}", ["neg", "pos", "neutral"][i % 3]) for i in range(40)])
    write_csv(d / "no_label.csv", [(f"review {i}", "" if i == 7 else ["neg", "pos"][i % 2]) for i in range(40)])
    write_csv(d / "no_text.csv", [("" if i == 3 else f"review {i}", ["neg", "pos"][i % 2]) for i in range(40)])
    write_csv(d / "tiny.csv", balanced(3))
    (d / "notes.txt").write_text("review,sentiment\n")

    minilm = embedded_model_path("all-MiniLM-L6-v2")
    no_weights = d / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm, name), no_weights / name)
    config_only = d / "config_only"
    config_only.mkdir()
    shutil.copy(os.path.join(minilm, "config.json"), config_only / "config.json")
    corrupt_weights = d / "corrupt_weights"
    shutil.copytree(no_weights, corrupt_weights)
    with open(os.path.join(minilm, "model.safetensors"), "rb") as f:
        (corrupt_weights / "model.safetensors").write_bytes(f.read(4096))

    (d / "corrupt.safetensors").write_bytes(b"this is not a safetensors file" * 8)
    truncated_run = d / "truncated_run"
    truncated_run.mkdir()
    save_file({"bert.encoder.layer.0.attention.self.query.lora_A": torch.zeros(8, 32),
               "bert.encoder.layer.0.attention.self.query.lora_B": torch.zeros(32, 8)}, str(d / "whole.safetensors"))
    data = (d / "whole.safetensors").read_bytes()
    (truncated_run / STATE_FILE).write_bytes(data[: len(data) // 2])
    (d / "unfinished_run").mkdir()
    (d / "unfinished_run" / "record.json").write_text(json.dumps({"status": "failed"}))
    return d


def files(name, *extra):
    return ["data=files", "data.files.train={d}/" + name, "data.text_column=review", "data.label_column=sentiment",
            *extra]


# (id, overrides ({d}: the inputs folder), the key the one line names). Keys given as "key=" must start the
# message (lora-lab's own errors); the others must appear in it (Hydra's errors).
ROWS = [
    # the command line itself (Hydra)
    ("unknown key", ["trainer.epoch=3"], "trainer.epoch"),
    ("unknown group option", ["method=no_such_method"], "method/no_such_method"),
    ("override syntax", ["trainer.lr=1)"], "trainer.lr"),
    # types and ranges
    ("epochs not a number", ["trainer.epochs=abc"], "trainer.epochs="),
    ("epochs fractional", ["trainer.epochs=1.5"], "trainer.epochs="),
    ("lr not a number", ["trainer.lr=abc"], "trainer.lr="),
    ("lr zero", ["trainer.lr=0"], "trainer.lr="),
    ("batch size zero", ["trainer.batch_size=0"], "trainer.batch_size="),
    ("eval batch size negative", ["trainer.eval_batch_size=-4"], "trainer.eval_batch_size="),
    ("max steps zero", ["trainer.max_steps=0"], "trainer.max_steps="),
    ("warmup ratio above 1", ["trainer.warmup_ratio=1.5"], "trainer.warmup_ratio="),
    ("weight decay negative", ["trainer.weight_decay=-0.1"], "trainer.weight_decay="),
    ("unknown device", ["trainer.device=gpu"], "trainer.device="),
    ("main metric of another task", ["data.main_metric=pearson"], "data.main_metric="),
    ("unknown task type", ["data.task_type=ner"], "data.task_type="),
    ("unknown pooling", ["model.pooling=max"], "model.pooling="),
    ("pooling for tagging", ["data=wnut16", "model.pooling=mean"], "model.pooling="),
    ("seed not an integer", ["seed=abc"], "seed="),
    ("rank not a number", ["method.r=abc"], "method.r="),
    ("alpha not a number", ["method.alpha=abc"], "method.alpha="),
    ("dropout 1", ["method.dropout=1"], "method.dropout="),
    ("adapter size not a number", ["method=adapter", "method.bottleneck=abc"], "method.bottleneck="),
    ("max length 0", ["data.max_length=0"], "data.max_length="),
    ("max length beyond the model", ["data.max_length=1000"], "data.max_length="),
    ("fractions sum to 1", ["data.val_fraction=0.5", "data.test_fraction=0.5"], "data.test_fraction="),
    ("val fraction 0", ["data.val_fraction=0"], "data.val_fraction="),
    ("max train 0", ["data.max_train=0"], "data.max_train="),
    ("dedupe not a boolean", ["data.dedupe=maybe"], "data.dedupe="),
    ("one label name", ["data.label_names=[good]"], "data.label_names="),
    # data files
    ("missing data file", files("missing.csv"), "data.files.train="),
    ("unknown file type", files("notes.txt"), "data.files.train="),
    ("garbage CSV", files("garbage.csv"), "data.files.train="),
    ("CSV rows longer than the header", files("ragged.csv"), "data.files.train="),
    ("invalid JSON", files("broken.json"), "data.files.train="),
    ("invalid JSON Lines", files("broken.jsonl"), "data.files.train="),
    ("header-only CSV", files("header_only.csv"), "data.files.train="),
    ("zero-byte CSV", files("zero_bytes.csv"), "data.files.train="),
    ("latin-1 CSV", files("latin1.csv"), "data.files.train="),
    ("text column missing", files("good.csv", "data.text_column=body"), "data.text_column="),
    ("row without text", files("no_text.csv"), "data.files.train="),
    ("row without label", files("no_label.csv"), "data.files.train="),
    ("single class", files("one_class.csv"), "data.files.train="),
    ("negative label", files("negative.csv"), "data.files.train="),
    ("label -1 (unlabeled) in training data", files("minus_one.csv"), "data.files.train="),
    ("fractional label", files("fractional.csv"), "data.files.train="),
    ("label not among data.label_names", files("neutral.csv", "data.label_names=[neg,pos]"), "data.label_names="),
    ("label id beyond data.label_names", files("int_labels.csv", "data.label_names=[neg,pos]"), "data.label_names="),
    ("too few rows to split", files("tiny.csv"), "data.files.train="),
    ("batch larger than the training split", files("good.csv", "trainer.batch_size=64"), "trainer.batch_size="),
    # models and saved states
    ("model folder missing", ["model=hub", "model.name={d}/nowhere"], "model.name="),
    ("model folder without weights", ["model=hub", "model.name={d}/no_weights"], "model.name="),
    ("model folder without tokenizer files", ["model=hub", "model.name={d}/config_only"], "model.name="),
    ("model folder with corrupt weights", ["model=hub", "model.name={d}/corrupt_weights"], "model.name="),
    ("vocabulary smaller than the tokenizer's", ["model.vocab_size=1000"], "model.vocab_size="),
    ("init_from corrupt file", ["method.init_from={d}/corrupt.safetensors"], "method.init_from="),
    ("init_from run with truncated state", ["method.init_from={d}/truncated_run"], "method.init_from="),
    ("init_from run that did not finish", ["method.init_from={d}/unfinished_run"], "method.init_from="),
    ("init_from missing", ["method.init_from={d}/nothing_here"], "method.init_from="),
]


def expand(overrides, folder):
    return [o.replace("{d}", str(folder)) for o in overrides]


def command(tmp_path, overrides):
    return [*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", *overrides]


def run_in_process(args, monkeypatch, capsys) -> tuple[int, str]:
    """The ``lora-lab`` command in this process: its exit status and what it wrote to stderr."""
    monkeypatch.setattr(sys, "argv", ["lora-lab", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # main() sets it for Hydra; each call starts clean
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_module.main()
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_and_nothing_trained(status, stderr, key, run_dir):
    assert status == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("lora-lab: error: "), line
    if key.endswith("="):
        assert line.startswith(f"lora-lab: error: {key}"), line
    else:
        assert key in line, line
    assert not (run_dir / STATE_FILE).exists()


@pytest.mark.parametrize("overrides,key", [pytest.param(o, k, id=i) for i, o, k in ROWS])
def test_bad_input_in_process(overrides, key, inputs, tmp_path, monkeypatch, capsys):
    status, stderr = run_in_process(command(tmp_path, expand(overrides, inputs)), monkeypatch, capsys)
    assert_one_line_and_nothing_trained(status, stderr, key, tmp_path / "run")


SUBPROCESS_ROWS = ["epochs not a number", "unknown key", "latin-1 CSV"]


@pytest.mark.parametrize("row", SUBPROCESS_ROWS)
def test_bad_input_real_command(row, inputs, tmp_path, warm_cli):
    _, overrides, key = next(r for r in ROWS if r[0] == row)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    args = command(tmp_path, expand(overrides, inputs))
    if row == SUBPROCESS_ROWS[0]:
        out = subprocess.run([sys.executable, "-m", "lora_lab.cli.main", *args], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=300)
    else:
        out = warm_cli.run(args, cwd=tmp_path, env=env)
    assert_one_line_and_nothing_trained(out.returncode, out.stderr, key, tmp_path / "run")


def test_good_input_after_bad_ones_in_the_same_process(tmp_path, monkeypatch, capsys):
    """Repeated in-process invocations leak no state: after a failure, good input runs (dry_run: the
    config is composed, validated and planned, nothing is loaded)."""
    status, _ = run_in_process(command(tmp_path / "bad", ["trainer.epochs=abc"]), monkeypatch, capsys)
    assert status == 2
    monkeypatch.setattr(sys, "argv", ["lora-lab", *command(tmp_path, ["dry_run=true"])])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    main_module.main()
    out = capsys.readouterr()
    assert out.err == "" and "[dry run]" in out.out


def shipped_options():
    from conftest import CONF

    for group in ("method", "arm", "lora_scaling", "model", "data", "task", "sweep", "experiment"):
        for path in sorted((CONF / group).glob("*.yaml")):
            yield f"{group}={path.stem}"


@pytest.mark.parametrize("option", list(shipped_options()))
def test_every_shipped_config_passes_the_checks(option, inputs):
    """The checks refuse bad input, never a config the project ships."""
    from conftest import compose_config

    from lora_lab.config.validate import check_config

    extra = expand(files("good.csv"), inputs) if option == "data=files" else []
    if option.startswith("data=") and compose_config(option).data.task_type == "causal_lm":
        extra.append("model=tiny_gpt2")  # a causal LM needs a decoder; the default model is an encoder
    check_config(compose_config(option, *extra))
