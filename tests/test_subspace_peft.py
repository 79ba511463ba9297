"""The subspace analysis on PEFT LoRA adapters: key names, scaling, orientation, reports, errors (fast)."""
from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

from lora_lab.analysis.base_weights import BaseWeights
from lora_lab.analysis.peft_adapter import PeftAdapter
from lora_lab.analysis.sources import load_sources
from lora_lab.analysis.subspace import AnalysisOptions, analyse_runs, match_modules, short_type_names, split_module_name
from lora_lab.analysis.subspace_report import main as report_main
from lora_lab.bench import peft_adapters as bench_peft_adapters
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW
from lora_lab.peft.adapter_config import LoraAdapterConfig
from lora_lab.peft.names import align_names, parse_peft_key

peft = pytest.importorskip("peft")

BERT_TARGETS = ("query", "value")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturb_b(model, seed: int) -> None:
    """PEFT initialises B = 0 (ΔW = 0); give it values so that ΔW has a spectrum."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _peft_adapter(folder: Path, seed: int, **lora):
    """A LoRA adapter made by PEFT on the tiny random BERT (its weights are the same for every seed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=list(BERT_TARGETS), **lora))
        _perturb_b(model, seed)
        model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The tiny BERT saved as a base model, and two PEFT adapters on it, r=2 and r=4 (the second with
    rank and alpha patterns); the PEFT models are kept as the reference."""
    root = tmp_path_factory.mktemp("peft_bert")
    tiny_bert().save_pretrained(str(root / "base"), safe_serialization=True)
    r2 = _peft_adapter(root / "r2", 1, r=2, lora_alpha=8)
    r4 = _peft_adapter(root / "r4", 2, r=4, lora_alpha=8, rank_pattern={"layer.1.attention.self.query": 3},
                       alpha_pattern={"value": 5})
    return {"root": root, "base": root / "base", "r2": root / "r2", "r4": root / "r4", "models": {"r2": r2, "r4": r4}}


def _lora_layers(peft_model) -> dict:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):]: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, module, part, layer, short", [
    ("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight", "model.layers.3.self_attn.q_proj",
     "lora_A", 3, "q_proj"),
    ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
     "bert.encoder.layer.0.attention.self.query", "lora_B", 0, "query"),
    ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", "transformer.h.0.attn.c_attn", "lora_A", 0, "c_attn"),
    ("base_model.model.model.layers.7.self_attn.v_proj.lora_B.default.weight", "model.layers.7.self_attn.v_proj",
     "lora_B", 7, "v_proj"),
    ("model.layers.1.mlp.down_proj.lora_A.weight", "model.layers.1.mlp.down_proj", "lora_A", 1, "down_proj"),
    ("base_model.model.model.layers.2.self_attn.q_proj.lora_magnitude_vector", "model.layers.2.self_attn.q_proj",
     "lora_magnitude_vector", 2, "q_proj"),
])
def test_peft_keys_map_onto_module_layer_and_type(key, module, part, layer, short):
    parsed = parse_peft_key(key)
    assert (parsed.module, parsed.part) == (module, part)
    got_layer, mtype = split_module_name(parsed.module)
    assert got_layer == layer and short_type_names([mtype, "other.kind"])[mtype] == short


def test_other_tensors_are_not_lora_factors():
    for key in ("base_model.model.classifier.modules_to_save.default.weight",
                "base_model.model.model.embed_tokens.base_layer.weight", "lora_A.weight"):
        assert parse_peft_key(key) is None
    assert parse_peft_key("base_model.model.x.layers.0.q.lora_B.bias").param == "bias"
    assert parse_peft_key("base_model.model.model.embed_tokens.lora_embedding_A").part == "lora_embedding_A"


def test_names_of_two_wrappers_of_one_model_are_aligned():
    ours = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.10.attention.self.query"]
    bare = ["encoder.layer.0.attention.self.query", "encoder.layer.10.attention.self.query", "pooler.dense"]
    assert align_names(ours, bare) == {bare[0]: ours[0], bare[1]: ours[1]}


# ----------------------------------------------------------------------------------------------
# Scaling and orientation
# ----------------------------------------------------------------------------------------------
def test_scaling_alpha_over_r_rslora_and_patterns():
    plain = LoraAdapterConfig(path=Path("x"), r=8, lora_alpha=16)
    assert plain.scaling("model.layers.0.self_attn.q_proj") == 2.0
    rs = LoraAdapterConfig(path=Path("x"), r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling("m.q") == pytest.approx(8 / math.sqrt(16))
    patterned = LoraAdapterConfig(path=Path("x"), r=8, lora_alpha=16, rank_pattern={r"layers\.1\..*q_proj": 4},
                                  alpha_pattern={"v_proj": 4})
    assert patterned.rank("model.layers.1.self_attn.q_proj") == 4 and patterned.rank("model.layers.11.self_attn.q_proj") == 8
    assert patterned.scaling("model.layers.1.self_attn.q_proj") == 4.0
    assert patterned.scaling("model.layers.0.self_attn.v_proj") == 0.5
    assert patterned.scaling("model.layers.0.self_attn.xv_proj") == 2.0  # a pattern matches whole name parts


def test_factors_and_scaling_match_peft_itself(bert):
    """ΔW = s·B·A from the files equals PEFT's own dense ΔW of every module, rank_pattern and alpha_pattern included."""
    for name in ("r2", "r4"):
        adapter = PeftAdapter(bert[name])
        layers = _lora_layers(bert["models"][name])
        assert set(adapter.shapes) == set(layers)
        for module, layer in layers.items():
            delta = adapter.load(module)
            assert delta.dense is None and delta.kind == "lora"
            assert adapter.config.scaling(module) == pytest.approx(layer.scaling["default"])
            reference = layer.get_delta_weight("default")
            assert torch.allclose(delta.to_dense(), reference, atol=1e-6)
    assert PeftAdapter(bert["r4"]).shapes  # rank 3 in layer 1 query, checked against the rank_pattern


def test_fan_in_fan_out_delta_is_out_by_in_like_a_linear_layer(tmp_path):
    """GPT-2's Conv1D stores W as in x out; ΔW = s·B·A is out x in and W0 is transposed to match."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(str(tmp_path / "base"))
    before = {n: p.detach().clone() for n, p in gpt2.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                                         fan_in_fan_out=True))
        _perturb_b(model, 3)
        model.save_pretrained(str(tmp_path / "adapter"))
        merged = dict(model.merge_and_unload().named_parameters())
    adapter = PeftAdapter(tmp_path / "adapter")
    adapter.attach_base(BaseWeights(tmp_path / "base"))
    assert adapter.config.fan_in_fan_out
    for layer in range(2):
        module = f"transformer.h.{layer}.attn.c_attn"
        delta = adapter.load(module)
        stored = f"{module}.weight"  # Conv1D: in x out
        assert delta.shape == (48, 16) and before[stored].shape == (16, 48)
        assert torch.allclose(delta.to_dense(), (merged[stored] - before[stored]).T, atol=1e-6)
        assert torch.equal(delta.base, before[stored].T)


def test_dora_adapters_are_read_as_their_direction_update(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"],
                                                                 use_dora=True))
        _perturb_b(model, 4)
        model.save_pretrained(str(tmp_path / "dora"))
    adapter = PeftAdapter(tmp_path / "dora")
    layers = _lora_layers(model)
    module = "bert.encoder.layer.0.attention.self.query"
    layer = layers[module]
    expected = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    delta = adapter.load(module)
    assert delta.kind == "dora (s·B·A only)" and torch.allclose(delta.to_dense(), expected.detach(), atol=1e-6)
    (note,) = adapter.notes("d")
    assert "DoRA" in note and "magnitude vector (2 module(s))" in note


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_on_two_peft_adapters_of_two_ranks(bert, tmp_path, capsys):
    out = tmp_path / "report"
    assert report_main([str(bert["r2"]), str(bert["r4"]), "--out", str(out), "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert "Table 7 needs W0" in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["phi_pair1_query.png", "phi_pair1_random.png", "phi_pair1_value.png",
                    "spectra_run1.png", "spectra_run2.png"]
    report = (out / "report.md").read_text()
    for name in pngs:
        assert f"({name})" in report
    assert "| PEFT LoRA r=2 α=8 |" in report and "| PEFT LoRA r=4* α=8 |" in report
    assert "| # | label | ΔW from | source |" in report and "s = α/r" in report
    assert "Not computed: Table 7 needs W0" in report and not (out / "table7.csv").exists()
    phi = _rows(out / "phi_summary.csv")
    assert len(phi) == 4 and {(r["k1"], r["d"]) for r in phi} == {("2", "32")}
    assert sorted(r["k2"] for r in phi) == ["3", "4", "4", "4"]  # rank_pattern: layer 1 query has r=3
    assert all(0.0 <= float(r["phi_11"]) <= 1.0 for r in phi)
    spectra = _rows(out / "effective_rank.csv")
    assert len(spectra) == 8 and {r["kind"] for r in spectra} == {"lora"}


def test_table7_with_base_weights(bert, tmp_path, capsys):
    base_file = bert["base"] / "model.safetensors"
    for i, base in enumerate((bert["base"], base_file)):  # a model folder, or one safetensors file
        out = tmp_path / f"t7_{i}"
        argv = [str(bert["r2"]), str(bert["r4"]), "--out", str(out), "--analyses", "table7", "--base", str(base)]
        assert report_main(argv + ["--no-progress"]) == 0, capsys.readouterr().err
        t7 = _rows(out / "table7.csv")
        assert len(t7) == 8 and sorted({r["r"] for r in t7}) == ["2", "3", "4"]
        w = tiny_bert().bert.encoder.layer[1].attention.self.value.weight.detach()
        row = next(r for r in t7 if r["module"] == "bert.encoder.layer.1.attention.self.value")
        assert float(row["w_norm"]) == pytest.approx(float(w.norm()), rel=1e-6)
        assert all(float(r["amplification"]) > 0 for r in t7)


def test_a_run_directory_and_a_peft_adapter_together(bert, tmp_path, capsys):
    from test_subspace import make_run

    run = make_run(tmp_path / "run", 4, 0)  # bert.encoder.layer.{0,1,2}.attention.self.{query,value}, 32 x 32
    out = tmp_path / "mixed"
    assert report_main([str(run), str(bert["r2"]), "--out", str(out), "--no-progress",
                        "--analyses", "phi,table7"]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert f"| LoRA r=4 α=8 (q+v) seed=0 | epoch 2 (best) | {run} |" in report
    assert "Not analysed (LoRA r=4 α=8 (q+v) seed=0 only has them): 2 module(s)" in report
    assert len(_rows(out / "phi_summary.csv")) == 4 and (out / "phi_pair1_query.png").exists()
    t7 = _rows(out / "table7.csv")  # the run has its W0; the adapter, without --base, has none
    assert {r["run"] for r in t7} == {"LoRA r=4 α=8 (q+v) seed=0"} and "Table 7 needs W0" in report


def test_an_adapter_on_the_bare_encoder_is_matched_to_one_on_the_task_model(bert, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = peft.get_peft_model(tiny_bert().bert, peft.LoraConfig(r=2, target_modules=list(BERT_TARGETS)))
        _perturb_b(bare, 5)
        bare.save_pretrained(str(tmp_path / "bare"))
    assert "encoder.layer.0.attention.self.query" in PeftAdapter(tmp_path / "bare").shapes
    runs = load_sources([bert["r2"], tmp_path / "bare"]).runs
    names, unmatched = match_modules(runs)
    assert len(names) == 4 and not unmatched
    expected = bare.base_model.model.encoder.layer[1].attention.self.value.get_delta_weight("default")
    assert torch.allclose(runs[1].load("bert.encoder.layer.1.attention.self.value").to_dense(), expected, atol=1e-6)


def test_the_factored_path_never_forms_a_dense_delta_w(tmp_path, monkeypatch, capsys):
    """No tensor of out x in entries is made for a LoRA adapter: not by DeltaW.to_dense, not by any op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    d = 256
    folders = bench_peft_adapters.write_adapters(tmp_path, d, 2, (2, 8))

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():  # not safetensors' byte buffers
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    def refuse(self):
        raise AssertionError("a dense ΔW was formed")

    monkeypatch.setattr(DeltaW, "to_dense", refuse)
    with LargestOutput():
        rc = report_main([*map(str, folders), "--out", str(tmp_path / "rep"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert 0 < LargestOutput.largest <= 8 * d  # the widest factor, never d * d
    res = analyse_runs(load_sources(folders).runs, options=AnalysisOptions(analyses=("spectra",)))
    assert [s["k"] for s in res.spectra] == [2, 8] * 4


def test_benchmark_writes_adapters_peft_reads_and_times_the_command(tmp_path, capsys):
    result = bench_peft_adapters.measure(["--quick", "--d", "64", "--layers", "1", "--repeats", "1", "--no-process",
                                       "--keep", str(tmp_path)])
    printed = capsys.readouterr().out
    assert result["median_s"] > 0 and len(result["times"]) == 1 and "median of 1" in printed
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "llama7b_lora_r64"))
    assert config.r == 64 and set(config.target_modules) == {"q_proj", "v_proj"}
    assert (tmp_path / "report1" / "phi_pair1_q_proj.png").exists()


# ----------------------------------------------------------------------------------------------
# One-line errors
# ----------------------------------------------------------------------------------------------
def _adapter_copy(src: Path, dst: Path, **config) -> Path:
    dst.mkdir(parents=True)
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    raw = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    return dst


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"),
    ("bin_only", "adapter_model.bin only; it is a pickle"),
    ("hub_offline", "could not be downloaded from the Hugging Face Hub"),
    ("different_bases", "were trained from different base models"),
    ("not_lora", "is a PEFT IA3 adapter"),
    ("rank_disagrees", "gives r=3"),
    ("wrong_base", "has no weight for the adapted module"),
    ("base_pickled", "pickled weights are not read"),
])
def test_bad_sources_are_one_line_errors(case, message, bert, tmp_path, monkeypatch, capsys):
    other = str(bert["r4"])
    extra = []
    if case == "missing":
        source = str(tmp_path / "nowhere" / "adapter")
    elif case == "bin_only":
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "adapter_config.json").write_text((bert["r2"] / "adapter_config.json").read_text())
        (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"not read")
        source = str(tmp_path / "bin")
    elif case == "hub_offline":
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.chdir(tmp_path)  # so that the id is no local path
        source = "lora-lab-tests/no-such-adapter"
    elif case == "different_bases":
        source = str(_adapter_copy(bert["r2"], tmp_path / "a", base_model_name_or_path="org/model-a"))
        other = str(_adapter_copy(bert["r4"], tmp_path / "b", base_model_name_or_path="org/model-b"))
    elif case == "not_lora":
        source = str(_adapter_copy(bert["r2"], tmp_path / "ia3", peft_type="IA3"))
    elif case == "rank_disagrees":
        source = str(_adapter_copy(bert["r2"], tmp_path / "r3", r=3))
    elif case == "wrong_base":
        (tmp_path / "gpt").mkdir()
        from safetensors.torch import save_file

        save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, str(tmp_path / "gpt" / "model.safetensors"))
        source, extra = str(bert["r2"]), ["--base", str(tmp_path / "gpt")]
    else:
        (tmp_path / "pickled").mkdir()
        (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
        source, extra = str(bert["r2"]), ["--base", str(tmp_path / "pickled")]
    rc = report_main([source, other, "--out", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.startswith("lora-lab-subspace: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out" / "report.md").exists()


def test_different_bases_may_be_compared_when_asked(bert, tmp_path, capsys):
    a = _adapter_copy(bert["r2"], tmp_path / "a", base_model_name_or_path="org/model-a")
    b = _adapter_copy(bert["r4"], tmp_path / "b", base_model_name_or_path="/models/MODEL-A")  # one model, two names
    c = _adapter_copy(bert["r4"], tmp_path / "c", base_model_name_or_path="org/model-c")
    assert report_main([str(a), str(b), "--out", str(tmp_path / "ab"), "--analyses", "phi", "--layers", "0"]) == 0
    assert report_main([str(a), str(c), "--out", str(tmp_path / "ac"), "--analyses", "phi", "--layers", "0",
                        "--allow-base-mismatch"]) == 0
    with pytest.raises(ConfigError, match="adapter"):
        PeftAdapter(tmp_path / "missing")
    capsys.readouterr()
