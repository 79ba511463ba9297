"""Decoder language models in model loading: tiny random GPT-2/Llama/Qwen2/Mistral/OPT/Gemma
(``model.arch``), Hub decoders (a local folder stands in for the Hub), the pad token a decoder
classifier needs, the pooling rules of causal models, and the 4-bit base's settings and refusals
(bitsandbytes and a GPU are not needed: nothing is quantised here)."""
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_config
from omegaconf import OmegaConf, open_dict

from lora_lab.config.validate import check_config
from lora_lab.errors import ConfigError
from lora_lab.models import quantization
from lora_lab.models.files import check_model_files, max_positions
from lora_lab.models.loading import is_causal_decoder, is_decoder, load_model, load_tokenizer, pooling_of
from lora_lab.models.pooling import PooledClassifier

ARCHS = ["bert", "gpt2", "llama", "qwen2", "mistral", "opt", "gemma"]
PREFIX = {"bert": "Bert", "gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral",
          "opt": "OPT", "gemma": "Gemma"}
SUFFIX = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification", "lm": "ForCausalLM"}
REFUSED = {("bert", "lm"): "is an encoder", ("opt", "token"): "no token classification head"}
PAD = 0  # the embedded (BERT) tokenizer's [PAD]


@pytest.fixture(scope="module")
def tiny():
    return compose_config("model=tiny").model


def with_keys(cfg, **keys):
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key, value in keys.items():
            cfg[key] = value
    return cfg


def feed_forward_width(config) -> int:
    for name in ("intermediate_size", "n_inner", "ffn_dim"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise AssertionError(f"no feed-forward width in {type(config).__name__}")


@pytest.mark.parametrize("task", ["sequence", "token", "lm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_random_arch_builds_the_head_of_each_task_with_the_configured_sizes(tiny, arch, task, one_torch_thread):
    cfg = with_keys(tiny, arch=arch)
    labels = [] if task == "lm" else ["a", "b", "c"]
    if (arch, task) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[arch, task]):
            load_model(cfg, len(labels), labels, task=task, pad_token_id=PAD)
        return
    model = load_model(cfg, len(labels), labels, task=task, pad_token_id=PAD)
    expected = "GPT2LMHeadModel" if (arch, task) == ("gpt2", "lm") else PREFIX[arch] + SUFFIX[task]
    assert type(model).__name__ == expected
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, feed_forward_width(c),
            c.max_position_embeddings) == (30522, 32, 2, 4, 64, 128)
    assert model.get_input_embeddings().weight.shape == (30522, 32)
    if task != "lm":
        assert c.num_labels == 3 and c.id2label[2] == "c"
    if arch != "bert":  # a decoder classifier finds the last real token by the pad id
        assert c.pad_token_id == PAD and c.eos_token_id is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tiny_llama_has_grouped_query_attention():
    cfg = compose_config("model=tiny_llama").model
    assert cfg.arch == "llama" and cfg.num_kv_heads == 2 and cfg.num_heads == 4
    model = load_model(cfg, 2, None, pad_token_id=PAD)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (32, 32)  # 4 heads of 8
    assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (16, 32)  # 2 heads of 8
    assert model.config.num_key_value_heads == 2


def test_the_new_model_configs(tiny):
    qwen = compose_config("model=tiny_qwen2").model
    assert (qwen.source, qwen.arch, qwen.tokenizer, qwen.vocab_size, qwen.hidden_size, qwen.num_layers,
            qwen.num_heads, qwen.intermediate_size, qwen.max_positions, qwen.dropout) == (
        "random", "qwen2", "all-MiniLM-L6-v2", 30522, 32, 2, 4, 64, 128, tiny.dropout)
    assert compose_config("model=tiny_gpt2").model.arch == "gpt2"
    assert compose_config("model=gpt2").model.name == "openai-community/gpt2"
    assert compose_config("model=gpt2_medium").model.name == "openai-community/gpt2-medium"
    models = {path.stem: OmegaConf.load(path) for path in sorted((CONF / "model").glob("*.yaml"))}
    for name, model in models.items():
        if "defaults" in model:  # its base config's keys, and its own
            model = OmegaConf.merge(models[model.defaults[0]], {k: v for k, v in model.items() if k != "defaults"})
        assert {"dtype", "load_in_4bit", "pooling", "trust_remote_code", "use_safetensors"} <= set(model), name
        assert model.load_in_4bit is False, name
        if model.source == "random":
            assert set(model) == set(tiny), name  # every random model has every size key


def test_existing_configs_keep_their_run_identity():
    """The keys added to the model configs count only away from their defaults."""
    from lora_lab.config.run_identity import differences, digest, result_config

    config = OmegaConf.to_container(compose_config("experiment=smoke"), resolve=True)
    assert {"arch", "num_kv_heads", "load_in_4bit"} <= set(config["model"])
    before = copy.deepcopy(config)
    for key in ("arch", "num_kv_heads", "load_in_4bit"):
        del before["model"][key]
    assert digest(result_config(config)) == digest(result_config(before)) and differences(before, config) == []
    llama = OmegaConf.to_container(compose_config("experiment=smoke", "model=tiny_llama"), resolve=True)
    assert differences(config, llama) == ["model.arch: '<absent>' -> 'llama'", "model.name: 'tiny-random-bert' -> "
                                          "'tiny-random-llama'", "model.num_kv_heads: '<absent>' -> 2"]


@pytest.mark.parametrize("overrides, key, problem", [
    (["model=tiny_gpt2", "model.num_kv_heads=2"], "model.num_kv_heads", "grouped-query attention is built for"),
    (["model=tiny_llama", "model.num_kv_heads=3"], "model.num_kv_heads", "must divide model.num_heads=4"),
    (["model=tiny_llama", "model.num_kv_heads=0"], "model.num_kv_heads", "must be null or a positive integer"),
    (["model=tiny", "model.arch=t5"], "model.arch", "must be one of"),
    (["model=tiny_gpt2", "model.pooling=cls"], "model.pooling", "seen only itself"),
    (["model=tiny_gpt2", "data=wnut16", "model.pooling=mean"], "model.pooling", "sequence classification only"),
])
def test_bad_decoder_settings_are_one_line_errors(overrides, key, problem):
    with pytest.raises(ConfigError, match=problem) as caught:
        check_config(compose_config(*overrides))
    assert caught.value.key == key and "\n" not in str(caught.value)


def padded_equals_unpadded(model, pad_id: int) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 30522, (2, 9), generator=g)
    alone = model(input_ids=ids[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long)).logits
    padded = ids.clone()
    padded[0, 6:] = pad_id
    mask = torch.ones_like(padded)
    mask[0, 6:] = 0
    together = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-4)
    # not trivially equal: the row's logits depend on its last real token
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("option", ["tiny_gpt2", "tiny_llama", "tiny_qwen2"])
def test_decoder_classifiers_read_the_last_real_token_of_a_right_padded_row(option, one_torch_thread):
    torch.manual_seed(0)
    model = load_model(compose_config(f"model={option}").model, 3, None).eval()  # pad id from the tokenizer
    assert model.config.pad_token_id == PAD
    with torch.no_grad():
        padded_equals_unpadded(model, PAD)


def test_mean_pooling_on_a_decoder_is_masked_and_cls_is_refused(tiny, one_torch_thread):
    cfg = with_keys(tiny, arch="gpt2", pooling="mean")
    assert pooling_of(cfg) == "mean"
    torch.manual_seed(0)
    model = load_model(cfg, 3, None, pad_token_id=PAD).eval()
    assert isinstance(model, PooledClassifier) and type(model.backbone).__name__ == "GPT2Model"
    with torch.no_grad():
        padded_equals_unpadded(model, PAD)
    with pytest.raises(ConfigError, match="model.pooling='cls': pools the first token"):
        load_model(with_keys(tiny, arch="llama", pooling="cls"), 3, None, pad_token_id=PAD)


def test_pooling_of_decoders_and_encoders(tiny):
    for pooling in ("auto", "pooler"):
        assert pooling_of(with_keys(tiny, arch="llama", pooling=pooling)) == "last"
        assert pooling_of(with_keys(tiny, pooling=pooling)) == "pooler"
    assert pooling_of(with_keys(tiny, pooling="cls")) == "cls"
    assert pooling_of(with_keys(tiny, arch="opt"), "lm") is None
    with pytest.raises(ConfigError, match="a causal LM predicts every token"):
        pooling_of(with_keys(tiny, arch="opt", pooling="mean"), "lm")
    with pytest.raises(ConfigError, match="model.arch='bert': is an encoder"):
        pooling_of(tiny, "lm")
    assert is_causal_decoder("gpt2") and is_causal_decoder("llama") and is_causal_decoder("qwen2")
    assert not any(is_causal_decoder(t) for t in ("bert", "roberta", "distilbert", "bart", "t5"))
    assert is_decoder(compose_config("model=hub", "model.name=org/not-here").model) is None  # not known offline


def word_level_tokenizer(folder, eos: bool = True) -> None:
    """A tiny fast tokenizer without a pad token (as GPT-2's and Llama's), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "the", "cat", "sat", "on", "a", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"eos_token": "</s>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **specials).save_pretrained(folder)


def hub_folder(folder, model_class: str = "GPT2ForSequenceClassification"):
    """A local folder standing in for a Hub decoder: a tiny GPT-2 without a pad id, and the tokenizer."""
    import transformers

    word_level_tokenizer(folder)
    if model_class.startswith("GPT2"):
        config = transformers.GPT2Config(vocab_size=8, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                         bos_token_id=None, eos_token_id=None)
    else:
        config = transformers.BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return compose_config("model=hub", f"model.name={folder}").model


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos_token(tmp_path):
    cfg = hub_folder(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("pad_token_id") is None
    check_model_files(cfg)
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.pad_token_id == 1
    assert max_positions(cfg) == 64  # GPT-2's n_positions: its config.json has no max_position_embeddings
    assert is_decoder(cfg) is True and pooling_of(cfg) == "last"

    model = load_model(cfg, 2, ["no", "yes"])  # the pad id read from the tokenizer
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.pad_token_id == 1
    assert load_model(cfg, 2, None, pad_token_id=5).config.pad_token_id == 5  # given by the caller
    lm = load_model(cfg, 0, [], task="lm")
    assert type(lm).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(lm.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)

    no_eos = tmp_path / "no_eos"
    word_level_tokenizer(no_eos, eos=False)
    with pytest.raises(ConfigError, match="no pad token and no eos token") as caught:
        load_tokenizer(compose_config("model=hub", f"model.name={no_eos}").model)
    assert caught.value.key == "model.name" and "\n" not in str(caught.value)


def test_a_hub_encoder_is_no_causal_lm(tmp_path):
    cfg = hub_folder(tmp_path, "BertForSequenceClassification")
    assert is_decoder(cfg) is False and pooling_of(cfg) == "pooler"
    with pytest.raises(ConfigError, match="is an encoder"):
        load_model(cfg, 0, [], task="lm")
    assert load_model(cfg, 2, None).config.pad_token_id == 0  # an encoder's config is left as it is


# ---------------------------------------------------------------- 4-bit base (model.load_in_4bit)

def test_the_4bit_quantisation_is_qlora_nf4():
    config = quantization.nf4_config()
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.llm_int8_skip_modules is None  # transformers keeps the last layer (the head) unquantised


def without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def with_cuda_and_bitsandbytes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else find_spec(name, *a))


def test_4bit_without_a_gpu_is_refused_at_start_but_a_dry_run_plans(monkeypatch):
    without_cuda(monkeypatch)
    run = ["experiment=smoke", "model=tiny_llama", "model.load_in_4bit=true"]
    with pytest.raises(ConfigError, match=r"model.load_in_4bit=True: needs a CUDA GPU \(bitsandbytes NF4\); "
                                          "none is available") as caught:
        check_config(compose_config(*run))
    assert "\n" not in str(caught.value)
    check_config(compose_config(*run, "dry_run=true"))  # plans a GPU experiment on this machine
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):  # load_model checks before building anything
        load_model(compose_config(*run).model, 2, None, pad_token_id=PAD)


def test_4bit_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importing it fails
    with pytest.raises(ConfigError, match=r'pip install "lora_lab\[quantization\]"'):
        check_config(compose_config("experiment=smoke", "model.load_in_4bit=true"))


@pytest.mark.parametrize("overrides, key, problem", [
    (["method=full"], "model.load_in_4bit", "full fine-tuning freezes nothing"),
    (["trainer.device=cpu"], "trainer.device", "must be auto or cuda"),
])
def test_4bit_settings_refused_on_any_machine(overrides, key, problem):
    with pytest.raises(ConfigError, match=problem) as caught:
        check_config(compose_config("experiment=smoke", "model.load_in_4bit=true", "dry_run=true", *overrides))
    assert caught.value.key == key


@pytest.mark.parametrize("pooling, auto_class", [("auto", "AutoModelForSequenceClassification"),
                                                 ("mean", "AutoModel")])
def test_a_random_4bit_base_is_saved_and_loaded_back_quantised(monkeypatch, tiny, pooling, auto_class):
    """The load itself needs a GPU: here from_pretrained is replaced by one that records its arguments."""
    import transformers

    with_cuda_and_bitsandbytes(monkeypatch)
    seen = {}
    real = getattr(transformers, auto_class).from_pretrained

    def recording(path, **kwargs):
        seen.update(kwargs, files=sorted(p.name for p in Path(path).iterdir()))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
        return real(path, **kwargs)

    monkeypatch.setattr(getattr(transformers, auto_class), "from_pretrained", recording)
    cfg = with_keys(tiny, arch="llama", load_in_4bit=True, dtype="bf16", pooling=pooling)
    model = load_model(cfg, 2, None, pad_token_id=PAD)
    assert {"config.json", "model.safetensors"} <= set(seen["files"])
    assert seen["quantization_config"].bnb_4bit_quant_type == "nf4" and seen["device_map"] == {"": 0}
    assert seen["dtype"] == torch.bfloat16  # the unquantised modules in model.dtype
    assert quantization.is_4bit(model) == (pooling == "mean")  # the real loader marks the model itself
    if pooling == "mean":
        assert model.classifier.weight.dtype == torch.bfloat16


def test_the_benchmark_reports_the_4bit_row_as_skipped_without_a_gpu():
    from lora_lab.bench.memory import MEMORY_OPTIONS, memory_options
    from lora_lab.config.compose import compose

    assert list(compose("bench").memory_options.rows)[-1] == "nf4_base"  # a default row
    cfg = OmegaConf.create({"memory_options": {"rows": ["nf4_base"], "arm": "lora_r8"}})
    rows, skipped = memory_options(cfg, None, {}, torch.device("cpu"))
    assert rows == {} and skipped["nf4_base"]["label"] == MEMORY_OPTIONS["nf4_base"][0]
    assert "needs a CUDA GPU" in skipped["nf4_base"]["reason"]
