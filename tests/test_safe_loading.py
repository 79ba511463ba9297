"""Nothing the package loads may run code it was handed: a static check of every module in lora_lab/
and analysis/ (read with ``ast``, never imported).

- ``torch.load`` only with ``weights_only=True``;
- no unpickling at all: ``pickle``/``dill``/``cloudpickle``/``joblib`` loading, ``pandas.read_pickle``,
  ``shelve``, ``numpy.load(allow_pickle=True)``, ``torch.hub.load``;
- ``trust_remote_code`` only ever gets the value of the config key of that name, never a literal;
- model weights from ``from_pretrained`` only with ``use_safetensors`` read from the config.

Tokenizers, configs and processors hold no weights: their ``from_pretrained`` needs no
``use_safetensors`` (their ``trust_remote_code`` is still checked).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("lora_lab", "analysis")

UNPICKLING = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "dill.Unpickler", "cloudpickle.load",
    "cloudpickle.loads", "joblib.load", "pandas.read_pickle", "shelve.open", "torch.hub.load",
    "torch.hub.load_state_dict_from_url", "torch.utils.model_zoo.load_url",
}
TORCH_LOAD = {"torch.load", "torch.serialization.load"}
# from_pretrained of these classes reads no weights
WEIGHTLESS_SUFFIXES = ("Tokenizer", "TokenizerFast", "Config", "Processor", "FeatureExtractor", "ImageProcessor")


def import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it stands for, from every import in the module."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> "numpy.load" (through the imports); None for anything but a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def reads_config(node: ast.AST, key: str) -> bool:
    """Whether ``node`` is the config value named ``key``: ``cfg.key``, ``cfg.model.key``, ``cfg["key"]``
    or ``cfg.get("key", default)`` with a default that is not True, optionally wrapped in ``bool()``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "bool" and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.Attribute):
        return node.attr == key and not isinstance(node.value, ast.Constant)
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == key
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        if not (node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == key):
            return False
        default = node.args[1] if len(node.args) > 1 else next(
            (k.value for k in node.keywords if k.arg == "default"), None)
        return key != "trust_remote_code" or not is_true(default)
    return False


def keyword(call: ast.Call, name: str) -> ast.keyword | None:
    return next((k for k in call.keywords if k.arg == name), None)


def receiver_name(func: ast.Attribute) -> str:
    node = func.value
    if isinstance(node, ast.Call):  # e.g. getattr(transformers, name).from_pretrained
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def violations_in(source: str, filename: str = "<source>") -> list[str]:
    tree = ast.parse(source, filename=filename)
    aliases = import_aliases(tree)
    found = []

    def report(node: ast.AST, problem: str) -> None:
        found.append(f"{filename}:{node.lineno}: {problem}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not reads_config(
                        value, "trust_remote_code"):
                    report(node, "trust_remote_code set to something other than the config's value")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func, aliases)
        if name in TORCH_LOAD:
            weights_only = keyword(node, "weights_only")
            if weights_only is None or not is_true(weights_only.value):
                report(node, f"{name} without weights_only=True")
        if name in UNPICKLING:
            report(node, f"{name} unpickles (runs code from the file)")
        if name == "numpy.load":
            allow = keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow.value, ast.Constant) and allow.value.value is False):
                report(node, "numpy.load with allow_pickle")
        trust = keyword(node, "trust_remote_code")
        if trust is not None and not reads_config(trust.value, "trust_remote_code"):
            report(node, "trust_remote_code passed something other than the config's value")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            if receiver_name(node.func).endswith(WEIGHTLESS_SUFFIXES):
                continue
            safetensors = keyword(node, "use_safetensors")
            if safetensors is None:
                unpacked = any(k.arg is None for k in node.keywords)
                report(node, "from_pretrained loads a model without use_safetensors"
                       + (" (hidden in **kwargs)" if unpacked else ""))
            elif not reads_config(safetensors.value, "use_safetensors"):
                report(node, "from_pretrained: use_safetensors does not come from the config")
    return found


def package_sources() -> list[Path]:
    files = sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20, files  # the scan really sees the package
    return files


def test_the_package_loads_nothing_that_can_run_code():
    found = []
    for path in package_sources():
        found += violations_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "unsafe loading:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import torch\nstate = torch.load(path)",
    "import torch\nstate = torch.load(path, weights_only=False)",
    "import torch as th\nstate = th.load(path, map_location='cpu')",
    "from torch import load\nstate = load(path)",
    "import pickle\nobj = pickle.load(f)",
    "import pickle as pk\nobj = pk.loads(data)",
    "from pickle import loads\nobj = loads(data)",
    "import dill\nobj = dill.load(f)",
    "import joblib\nmodel = joblib.load('m.joblib')",
    "from joblib import load\nmodel = load('m.joblib')",
    "import pandas as pd\ndf = pd.read_pickle('x.pkl')",
    "import numpy as np\na = np.load('a.npy', allow_pickle=True)",
    "import torch\nm = torch.hub.load('repo', 'model')",
    "from transformers import AutoModel\nm = AutoModel.from_pretrained(name, trust_remote_code=True, use_safetensors=cfg.use_safetensors)",
    "from transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained(name, trust_remote_code=True)",
    "m = load(name, trust_remote_code=flag)",
    "m = load(name, trust_remote_code=cfg.get('trust_remote_code', True))",
    "kwargs = {'trust_remote_code': True}",
    "kwargs = dict(trust_remote_code=True)",
    "from transformers import AutoModel\nm = AutoModel.from_pretrained(name)",
    "from transformers import AutoModel\nm = AutoModel.from_pretrained(name, use_safetensors=False)",
    "from transformers import AutoModel\nm = AutoModel.from_pretrained(name, **kwargs)",
    "import transformers\nm = transformers.BertForSequenceClassification.from_pretrained(name, use_safetensors=True)",
    "from peft import PeftModel\nm = PeftModel.from_pretrained(base, path)",
])
def test_unsafe_loading_is_caught(source):
    assert violations_in(source), source


@pytest.mark.parametrize("source", [
    "import torch\nstate = torch.load(path, weights_only=True, map_location='cpu')",
    "import pickle\nblob = pickle.dumps(obj)",
    "import numpy as np\na = np.load('a.npy')",
    "import json\nd = json.load(f)",
    "from safetensors.torch import load_file\nstate = load_file(path)",
    "from transformers import AutoModelForSequenceClassification as M\n"
    "m = M.from_pretrained(path, trust_remote_code=bool(cfg.trust_remote_code), use_safetensors=cfg.use_safetensors)",
    "m = M.from_pretrained(path, trust_remote_code=cfg.model['trust_remote_code'], "
    "use_safetensors=cfg.get('use_safetensors', True))",
    "from transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained(name, trust_remote_code=bool(cfg.trust_remote_code))",
    "from transformers import AutoConfig\nc = AutoConfig.from_pretrained(name)",
    "kwargs = {'trust_remote_code': cfg.trust_remote_code}",
])
def test_safe_loading_passes(source):
    assert violations_in(source) == [], source
