"""LoRA (Hu et al. 2021): h = W0 x + s * B A x with s = alpha / r (or alpha / sqrt(r), rsLoRA).

The chosen linear layers are wrapped, not subclassed. A starts Kaiming-uniform (as loralib and PEFT
do) or Gaussian, B at zero, so the model is unchanged at step 0. ``init=svd`` instead starts B A from
the top-r singular directions of W0 and freezes the residual W0 - s B A (the principal-subspace init).

Any linear-like layer (``lora_lab.models.linear_layers``): nn.Linear; GPT-2's Conv1D (ΔW = s B A is out x in
as always; merging adds its transpose into the stored in x out weight); a bitsandbytes 4-bit
Linear4bit (QLoRA): the factors train in fp32 beside the frozen quantised weight, nothing merges into
it (``supports_merge`` is False, ``prepare_inference`` leaves the model as it is), ``init=svd`` is
refused and ΔW's base is the dequantised W0.

Parts of a fused layer (GPT-2's c_attn with targets [q, v], see ``lora_lab.models.architectures``): each part
gets its own A (r x in) and B (rows x r), as loralib's MergedLinear in the LoRA paper's GPT-2 code, so
q and v cost exactly what separate q and v matrices would; ΔW is reported per part
(``...attn.c_attn.q``). PEFT has no such layer: ``peft_config`` is None for such a run (no twin), and
``peft_adapter`` exports it exactly as one LoRA of rank n r per fused layer (the parts' A stacked,
their B placed block-wise in their rows, scale 1).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from lora_lab import rules
from lora_lab.errors import ConfigError, first_line
from lora_lab.methods.base import (
    PEFT_PREFIX,
    DeltaW,
    Method,
    ModelDims,
    freeze_all,
    head_count,
    matrix_shape,
    register,
    wrap_matrices,
)
from lora_lab.models.architectures import (
    all_matrices,
    get_submodule_parent,
    head_parameter_names,
    peft_task_type,
    resolve_matrices,
)
from lora_lab.models.linear_layers import (
    FusedParts,
    Rows,
    add_to_weight,
    attach,
    dense_weight,
    features,
    float_dtype,
    is_quantized,
    transposed,
)
from lora_lab.peft.importer import check_settings, is_adapter_folder, load_adapter, lora_scaling, read_adapter

INITS = ("kaiming", "gaussian", "svd")


class LoRALinear(nn.Module):
    """A linear-like layer plus s B A: the whole layer, or with ``rows`` one part of a fused layer
    (then it lives inside a ``FusedParts``, which owns the base layer and calls ``update``)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", rows: Rows | None = None):
        super().__init__()
        if rows is None:
            self.base = base
        else:
            attach(self, base)
        self.rows = rows
        out_features, in_features = features(base)
        if rows is not None:
            out_features = rows[1] - rows[0]
        self.r = r
        self.scaling = lora_scaling(alpha, r, rslora)
        self.quantized = is_quantized(base)
        device = base.weight.device
        # the factors train in fp32 even on a bf16 or 4-bit base, from their first value on
        dtype = torch.promote_types(float_dtype(base), torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.init = init
        if init == "svd":
            self._init_from_svd()
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # The factors at step 0; ΔW is measured from here (non-zero only for the svd init).
        self.register_buffer("A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("B0", self.lora_B.detach().clone(), persistent=False)

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight for this matrix, out x in (rows x in for a part), as it is now."""
        return dense_weight(self.base, self.rows)

    @torch.no_grad()
    def _init_from_svd(self) -> None:
        if self.quantized:
            raise ValueError("the svd init needs a dense W0, not a quantised one")
        w = self.base_weight().float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(S[: self.r] / self.scaling)
        self.lora_A.copy_((root[:, None] * Vh[: self.r]).to(self.lora_A.dtype))
        self.lora_B.copy_((U[:, : self.r] * root[None, :]).to(self.lora_B.dtype))
        add_to_weight(self.base, -self.scaling * self.lora_B.float() @ self.lora_A.float(), self.rows)

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW of the low-rank part as (B', A') with B' A' = s (B A - B0 A0), on the CPU in fp32: (s B, A)
        after a zero start, rank-2r factors after the svd init."""
        s = self.scaling
        B, A = self.lora_B.float().cpu(), self.lora_A.float().cpu()
        if self.init != "svd":
            return s * B, A
        return torch.cat([s * B, -s * self.B0.float().cpu()], dim=1), torch.cat([A, self.A0.float().cpu()], dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            add_to_weight(self.base, self.delta(), self.rows)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            add_to_weight(self.base, -self.delta(), self.rows)
            self.merged = False

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output (its rows, for a part) given the base layer's output ``out`` there."""
        if self.merged:
            return out
        A, x = self.lora_A, self.dropout(x)
        if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        low = F.linear(x, A)
        B = self.lora_B if self.scaling == 1.0 else self.lora_B * self.scaling
        if low.dtype != out.dtype:  # a bf16 or 4-bit base outside autocast: fp32 factors, base-dtype output
            return out + F.linear(low, B).to(out.dtype)
        # out + low @ B^T as one GEMM with the add fused in (no separate pass over the output)
        return torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), B.t()).view(out.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.update(x, self.base(x))


@register("lora")
class LoRA(Method):
    config_rules = {
        **Method.config_rules,
        "r": rules.integer(1, null=True, say_null=False),  # null: chosen from method.budget
        "alpha": rules.number(0, low_open=True),
        "dropout": rules.number(0, 1, high_open=True),
        "targets": rules.names(),
        "rslora": rules.boolean(),
        "init": rules.text(),
        "train_head": rules.boolean(),
        "budget": rules.integer(1, null=True),
        "init_from": rules.text(null=True),
        "lr_ratio": rules.number(0, low_open=True, null=True),  # LoRA+: B's lr over A's; null: off
    }
    supports_merge = True
    has_peft_counterpart = exports_peft = True
    dora = False  # whether the layers carry DoRA's magnitudes (what a PEFT adapter must match)
    bench_arms = ("lora_r8", "lora_r1", "lora_r64")
    order, family, plot_style = 3, "LoRA", ("tab:blue", "o")

    def rank(self) -> int | None:
        r = self.resolved.get("r") or self.cfg.get("r")
        return int(r) if r else None

    size = rank

    def _describe(self, rank: str, alpha) -> str:
        cfg = self.cfg
        init = "" if cfg.get("init", "kaiming") == "kaiming" else f", {cfg.get('init')} init"
        scale = ", rsLoRA" if cfg.get("rslora") else ""
        targets = "+".join(map(str, cfg.get("targets") or []))
        budget = f" [budget {cfg.get('budget'):,}]" if cfg.get("budget") else ""
        plus = f", LoRA+ λ={cfg.get('lr_ratio'):g}" if cfg.get("lr_ratio") is not None else ""
        return f"{self.family}{rank} α={alpha} ({targets}{scale}{init}{plus}){budget}"

    def label(self) -> str:
        return self._describe(f" r={self.rank()}", self.cfg.get("alpha"))

    def rank_series(self) -> list[str]:
        """The line of its alpha; with alpha = r (no rsLoRA) also the "α=r" line of an alpha sweep."""
        lines = [self._describe("", self.cfg.get("alpha"))]
        if self.cfg.get("alpha") == self.rank() and not self.cfg.get("rslora"):
            lines.append(self._describe("", "r"))
        return lines

    def run_tag(self) -> str:
        # the setting as given: a folder name is resolved before the config is checked (method.r=abc)
        return f"{self.name}-r{self.resolved.get('r') or self.cfg.get('r')}"

    def sort_key(self) -> tuple:
        return (self.order, self.name, len(self.cfg.get("targets") or []), self.rank() or 0)

    def wrap(self, base: nn.Module, r: int, rows: Rows | None = None) -> LoRALinear:
        """The layer that adapts a linear layer, or rows ``rows`` of it (DoRA returns its own)."""
        cfg = self.cfg
        return LoRALinear(base, r, float(cfg.alpha), float(cfg.dropout), bool(cfg.rslora), cfg.init, rows)

    def check(self) -> None:
        cfg = self.cfg
        budget = cfg.get("budget")
        if budget is not None and (not isinstance(budget, int) or budget <= 0):
            raise ConfigError("method.budget", budget, "must be a positive number of LoRA parameters or null")
        if budget is None and (not isinstance(cfg.r, int) or cfg.r <= 0):
            raise ConfigError("method.r", cfg.r, "must be a positive integer")
        if cfg.alpha is None or float(cfg.alpha) <= 0:
            raise ConfigError("method.alpha", cfg.alpha, "must be > 0")
        if not 0.0 <= float(cfg.dropout) < 1.0:
            raise ConfigError("method.dropout", cfg.dropout, "must be in [0, 1)")
        if cfg.init not in INITS:
            raise ConfigError("method.init", cfg.init, f"must be one of {list(INITS)}")
        problem = self.config_rules["lr_ratio"](cfg.get("lr_ratio"))
        if problem:
            raise ConfigError("method.lr_ratio", cfg.get("lr_ratio"), problem + " (LoRA+: B's learning rate over A's)")
        if cfg.get("init_from") and is_adapter_folder(cfg.init_from):
            check_settings(read_adapter(cfg.init_from), cfg, dora=self.dora)

    def check_files(self) -> None:
        if self.cfg.get("init_from"):
            factors_file(self.cfg.init_from)

    def expected_trainable(self, model: nn.Module) -> int | None:
        """r (d_in + d_out) per adapted matrix (r from the budget when one is set), and the head."""
        dims = ModelDims.of(model.config)
        shapes = dims.matrices(self.cfg.get("targets") or [])
        if shapes is None:
            return None
        r = self.cfg.get("r")
        if self.cfg.get("budget") is not None:
            r = rank_for_budget(int(self.cfg.budget), shapes * dims.layers)
        count = dims.layers * sum(self.matrix_parameters(int(r), d_out, d_in) for d_out, d_in in shapes)
        return count + (head_count(model) if self.cfg.get("train_head") else 0)

    @staticmethod
    def matrix_parameters(r: int, d_out: int, d_in: int) -> int:
        """The trained parameters of one adapted d_out x d_in matrix: A and B."""
        return r * (d_in + d_out)

    def apply(self, model: nn.Module) -> None:
        cfg = self.cfg
        matrices = all_matrices(resolve_matrices(model, cfg.targets))
        self.adapted: list[str] = [m.name for m in matrices]
        shapes = {m.name: matrix_shape(model, m) for m in matrices}
        quantized = [m.name for m in matrices if is_quantized(model.get_submodule(m.module))]
        if quantized:
            self.check_quantized(quantized[0])
        r = cfg.r
        if cfg.get("budget") is not None:
            r = rank_for_budget(int(cfg.budget), list(shapes.values()))
        for name, (d_out, d_in) in shapes.items():
            if min(d_out, d_in) < r and cfg.init == "svd":
                raise ConfigError("method.r", r, f"exceeds the rank of {name} ({min(d_out, d_in)})")
        freeze_all(model)
        wrap_matrices(model, matrices, lambda base, matrix: self.wrap(base, r, matrix.rows))
        self.supports_merge = not quantized  # nothing merges into a quantised weight
        lora_parameters = r * sum(d_in + d_out for d_out, d_in in shapes.values())
        self.resolved = {"r": r, "lora_parameters": lora_parameters}
        if cfg.get("init_from"):
            self.load_factors(model, cfg.init_from)
        params = dict(model.named_parameters())
        for name in self.method_parameter_names(model):
            params[name].requires_grad_(True)
        if cfg.train_head:
            for name in head_parameter_names(model):
                params[name].requires_grad_(True)

    def check_quantized(self, name: str) -> None:
        """A quantised (4-bit) base: refuse what needs its dense weight changed."""
        if self.cfg.init == "svd":
            raise ConfigError("method.init", "svd", f"needs a dense W0 to split, but {name} is quantised (4-bit); "
                              "use init=kaiming")

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """LoRA+ (Hayou et al. 2024): every B factor trains at ``lr_ratio`` times the learning rate of A
        and of everything else; nothing with ``lr_ratio`` null."""
        ratio = self.cfg.get("lr_ratio")
        if ratio is None:
            return {}
        return {n: float(ratio) for n, p in model.named_parameters() if p.requires_grad and n.endswith(".lora_B")}

    @torch.no_grad()
    def load_factors(self, model: nn.Module, source: str) -> None:
        """Start A and B from an earlier run's trainable state (the LoRA paper starts MRPC, RTE and
        STS-B from the MNLI LoRA weights). The head is not loaded: label sets differ between tasks.
        A PEFT adapter folder gives its factors and, when it saved a head that fits, the head."""
        if is_adapter_folder(source):
            load_adapter(read_adapter(source), model, self.lora_modules(model), head_parameter_names(model), self.cfg)
            return
        path = factors_file(source)
        try:
            saved = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ConfigError("method.init_from", source,
                              f"{path.name} could not be read: {first_line(error)}") from None
        params = dict(model.named_parameters())
        names = sorted(self.method_parameter_names(model))
        missing = [n for n in names if n not in saved]
        if missing:
            raise ConfigError("method.init_from", source, f"has no {missing[0]} (other targets or model?)")
        for name in names:
            if saved[name].shape != params[name].shape:
                raise ConfigError("method.init_from", source, f"{name} has shape {tuple(saved[name].shape)}, "
                                  f"this run needs {tuple(params[name].shape)} (another r?)")
            params[name].copy_(saved[name])  # ΔW stays measured from the pretrained W0

    def lora_modules(self, model: nn.Module) -> dict[str, LoRALinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        out = {}
        for name, m in self.lora_modules(model).items():
            B, A = m.update_factors()
            residual = m.base_weight().detach().float().cpu().clone()  # not a view of the live weight
            if m.merged:
                residual = residual - m.delta().detach().float().cpu()
            if m.init == "svd":  # the pretrained W0 is the residual plus the start s B0 A0
                residual = residual + m.scaling * m.B0.float().cpu() @ m.A0.float().cpu()
            out[name] = DeltaW(B=B, A=A, base=residual, kind="lora")
        return out

    def merge_layers(self, model: nn.Module) -> list[LoRALinear]:
        return list(self.lora_modules(model).values())

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        return merge_and_unload(model)

    def peft_config(self, model: nn.Module):
        """PEFT's LoraConfig for the same adapter; None when fused parts are adapted (PEFT adapts whole
        layers only; ``peft_adapter`` still exports such a run exactly)."""
        if any(m.rows is not None for m in self.lora_modules(model).values()):
            return None
        cfg = self.cfg
        return self.peft_config_for_modules(model, list(self.adapted), r=int(self.resolved["r"]),
                                            lora_alpha=float(cfg.alpha), use_rslora=bool(cfg.rslora))

    def peft_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.lora_modules(model).items():
            prefix = f"{PEFT_PREFIX}{name}."
            out[prefix + "lora_A.default.weight"] = m.lora_A.detach()
            out[prefix + "lora_B.default.weight"] = m.lora_B.detach()
            if m.init == "svd" or m.merged:  # the frozen residual differs from the pretrained weight
                residual = m.base_weight().detach()
                if m.merged:
                    residual = residual - m.delta().to(residual.dtype)
                out[prefix + "base_layer.weight"] = residual.t() if transposed(m.base) else residual
        return out

    def peft_adapter(self, model: nn.Module) -> tuple[object, dict[str, torch.Tensor]]:
        """A PEFT LoRA adapter (config, weights under PEFT's names, head not included) whose model gives
        this model's outputs on the pretrained base. The factors as they are where PEFT has the same
        layer; else exact factors of ΔW at scale 1 (rank and alpha per module by rank_pattern and
        alpha_pattern): an svd-initialised matrix as s [B, -B0] [A; A0] (rank 2r, as PEFT converts its
        PiSSA adapters), the parts of a fused layer as one LoRA on the whole layer, A the parts' A
        stacked, B block-structured (each part's B in its rows and its own columns, zero elsewhere)."""
        layers = self.lora_modules(model)
        if not any(m.init == "svd" or m.rows is not None for m in layers.values()):
            weights = {k: v for k, v in self.peft_state_dict(model).items() if not k.endswith(".base_layer.weight")}
            return self.peft_config(model), weights
        factors = {name: m.update_factors() for name, m in layers.items()}
        modules: dict[str, list[str]] = {}  # adapted module -> the names of its adapted matrices
        for name, m in layers.items():
            modules.setdefault(name if m.rows is None else name.rpartition(".")[0], []).append(name)
        weights, ranks = {}, {}
        for module, names in modules.items():
            base = model.get_submodule(module).base
            d_out = features(base)[0]
            B = torch.zeros(d_out, sum(factors[n][0].shape[1] for n in names))
            column = 0
            for n in names:
                start, stop = layers[n].rows or (0, d_out)
                k = factors[n][0].shape[1]
                B[start:stop, column:column + k] = factors[n][0]
                column += k
            prefix = f"{PEFT_PREFIX}{module}."
            weights[prefix + "lora_A.default.weight"] = torch.cat([factors[n][1] for n in names], dim=0)
            weights[prefix + "lora_B.default.weight"] = B
            weights.update(self.peft_extra_weights(model, module, names))
            ranks[module] = column
        r = max(ranks.values())
        pattern = {re.escape(module): k for module, k in ranks.items() if k != r}  # PEFT reads keys as regexes
        config = self.peft_config_for_modules(model, sorted(modules), r=r, lora_alpha=r, use_rslora=False,
                                              rank_pattern=pattern, alpha_pattern=dict(pattern))
        return config, weights

    def peft_extra_weights(self, model: nn.Module, module: str, names: list[str]) -> dict[str, torch.Tensor]:
        """Weights besides A and B that an exported module needs (DoRA: its magnitudes)."""
        return {}

    def peft_config_for_modules(self, model: nn.Module, modules: list[str], **settings):
        """``peft_config`` for whole modules ``modules`` (what ``peft_adapter`` exports)."""
        import peft

        cfg = self.cfg
        bases = [model.get_submodule(m).base for m in modules]
        options = dict(lora_dropout=float(cfg.dropout), target_modules=list(modules), bias="none",
                       fan_in_fan_out=all(transposed(b) for b in bases), task_type=peft_task_type(model))
        if self.dora:
            options["use_dora"] = True
        options.update(settings)
        return peft.LoraConfig(**options)


STATE_FILE = "trainable.safetensors"  # what a run directory holds its trained parameters in


def factors_file(source) -> Path:
    """The file ``method.init_from`` names (a run directory, a .safetensors file or a PEFT LoRA adapter
    folder), checked before any model is loaded: it exists, its header reads (a truncated or foreign
    file does not) and it holds LoRA factors. For an adapter folder: the folder."""
    path = Path(str(source)).expanduser()
    if is_adapter_folder(path):
        read_adapter(source)
        return path
    if path.is_dir():
        if not (path / STATE_FILE).is_file():
            raise ConfigError("method.init_from", source, f"is a directory without {STATE_FILE} "
                              "(not a run directory, or the run did not finish)")
        path = path / STATE_FILE
    if not path.is_file():
        raise ConfigError("method.init_from", source, "is neither a run directory nor a .safetensors file")
    try:
        with safe_open(str(path), "pt") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise ConfigError("method.init_from", source, f"{path.name} is not a readable safetensors file: "
                          f"{first_line(error)}") from None
    if not any(n.endswith((".lora_A", ".lora_B")) for n in names):
        raise ConfigError("method.init_from", source, f"{path.name} holds no LoRA factors (lora_A, lora_B)")
    return path


def rank_for_budget(budget: int, shapes: list[tuple[int, int]]) -> int:
    """The rank whose LoRA parameter count, r * sum(d_in + d_out) over the adapted matrices, is
    nearest to ``budget`` (the LoRA paper's Table 5: every target set trains the same number)."""
    per_rank = sum(d_out + d_in for d_out, d_in in shapes)
    return max(1, round(budget / per_rank))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer (and fused layer with LoRA parts) by its base layer with ΔW merged in:
    a plain model for deployment. A quantised base cannot take ΔW: ConfigError."""
    for name, m in list(model.named_modules()):
        whole = isinstance(m, LoRALinear) and m.rows is None
        if whole or (isinstance(m, FusedParts) and all(isinstance(p, LoRALinear) for p in m.parts().values())):
            m.merge()
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, m.base)
    return model
