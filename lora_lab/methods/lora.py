"""LoRA (Hu et al. 2021): h = W0 x + s * B A x with s = alpha / r (or alpha / sqrt(r), rsLoRA).

The chosen linear layers are wrapped, not subclassed. A starts Kaiming-uniform (as loralib and PEFT
do) or Gaussian, B at zero, so the model is unchanged at step 0. ``init=svd`` instead starts B A from
the top-r singular directions of W0 and freezes the residual W0 - s B A (the principal-subspace init).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.architectures import get_submodule_parent, head_parameter_names, resolve_targets
from lora_lab.errors import ConfigError, first_line
from lora_lab.methods.base import PEFT_PREFIX, DeltaW, Method, freeze_all, register
from lora_lab.peft_import import check_settings, is_adapter_folder, load_adapter, lora_scaling, read_adapter

INITS = ("kaiming", "gaussian", "svd")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = lora_scaling(alpha, r, rslora)
        w = base.weight
        # the factors train in fp32 even on a bf16 base (model.dtype=bf16), from their first value on
        dtype = torch.promote_types(w.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=dtype))
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

    @torch.no_grad()
    def _init_from_svd(self) -> None:
        w = self.base.weight.float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(S[: self.r] / self.scaling)
        self.lora_A.copy_((root[:, None] * Vh[: self.r]).to(self.lora_A.dtype))
        self.lora_B.copy_((U[:, : self.r] * root[None, :]).to(self.lora_B.dtype))
        self.base.weight.sub_((self.scaling * self.lora_B.float() @ self.lora_A.float()).to(w.dtype))

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight.add_(self.delta().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.sub_(self.delta().to(self.base.weight.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        low = F.linear(self.dropout(x), self.lora_A)
        B = self.lora_B if self.scaling == 1.0 else self.lora_B * self.scaling
        # out + low @ B^T as one GEMM with the add fused in (no separate pass over the output)
        return torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), B.t()).view(out.shape)


@register("lora")
class LoRA(Method):
    supports_merge = True
    dora = False  # whether the layers carry DoRA's magnitudes (what a PEFT adapter must match)
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
        return f"{self.family}{rank} α={alpha} ({targets}{scale}{init}){budget}"

    def label(self) -> str:
        return self._describe(f" r={self.rank()}", self.cfg.get("alpha"))

    def rank_series(self) -> list[str]:
        """The line of its alpha; with alpha = r (no rsLoRA) also the "α=r" line of an alpha sweep."""
        lines = [self._describe("", self.cfg.get("alpha"))]
        if self.cfg.get("alpha") == self.rank() and not self.cfg.get("rslora"):
            lines.append(self._describe("", "r"))
        return lines

    def run_tag(self) -> str:
        return f"{self.name}-r{self.rank()}"

    def sort_key(self) -> tuple:
        return (self.order, self.name, len(self.cfg.get("targets") or []), self.rank() or 0)

    def wrap(self, base: nn.Linear, r: int) -> LoRALinear:
        """The layer that replaces an adapted linear layer (DoRA returns its own)."""
        cfg = self.cfg
        return LoRALinear(base, r, float(cfg.alpha), float(cfg.dropout), bool(cfg.rslora), cfg.init)

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
        if cfg.get("init_from") and is_adapter_folder(cfg.init_from):
            check_settings(read_adapter(cfg.init_from), cfg, dora=self.dora)

    def apply(self, model: nn.Module) -> None:
        cfg = self.cfg
        matched = resolve_targets(model, cfg.targets)
        freeze_all(model)
        self.adapted: list[str] = sorted({n for names in matched.values() for n in names})
        bases = {name: model.get_submodule(name) for name in self.adapted}
        r = cfg.r
        if cfg.get("budget") is not None:
            r = rank_for_budget(int(cfg.budget), [(b.out_features, b.in_features) for b in bases.values()])
        for name, base in bases.items():
            if min(base.out_features, base.in_features) < r and cfg.init == "svd":
                raise ConfigError("method.r", r, f"exceeds the rank of {name} ({base.out_features})")
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, self.wrap(base, r))
        lora_parameters = r * sum(b.in_features + b.out_features for b in bases.values())
        self.resolved = {"r": r, "lora_parameters": lora_parameters}
        if cfg.get("init_from"):
            self.load_factors(model, cfg.init_from)
        params = dict(model.named_parameters())
        for name in self.method_parameter_names(model):
            params[name].requires_grad_(True)
        if cfg.train_head:
            for name in head_parameter_names(model):
                params[name].requires_grad_(True)

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}

    @torch.no_grad()
    def load_factors(self, model: nn.Module, source: str) -> None:
        """Start A and B from an earlier run's trainable state (the LoRA paper starts MRPC, RTE and
        STS-B from the MNLI LoRA weights). The head is not loaded: label sets differ between tasks.
        A PEFT adapter folder gives its factors and, when it saved a head that fits, the head."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

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
            s = m.scaling
            B, A = m.lora_B.detach().float().cpu(), m.lora_A.detach().float().cpu()
            residual = m.base.weight.detach().float().cpu().clone()  # not a view of the live weight
            if m.merged:
                residual = residual - s * B @ A
            if m.init == "svd":  # ΔW = s (B A - B0 A0): factors of rank <= 2r
                B0, A0 = m.B0.float().cpu(), m.A0.float().cpu()
                out[name] = DeltaW(B=torch.cat([s * B, -s * B0], dim=1), A=torch.cat([A, A0], dim=0),
                                   base=residual + s * B0 @ A0, kind="lora")
            else:
                out[name] = DeltaW(B=s * B, A=A, base=residual, kind="lora")
        return out

    def prepare_inference(self, model: nn.Module) -> None:
        for m in self.lora_modules(model).values():
            m.merge()

    def undo_inference(self, model: nn.Module) -> None:
        for m in self.lora_modules(model).values():
            m.unmerge()

    def peft_config(self, model: nn.Module):
        import peft

        cfg = self.cfg
        return peft.LoraConfig(r=int(self.resolved["r"]), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                               target_modules=list(self.adapted), bias="none", use_rslora=bool(cfg.rslora))

    def peft_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.lora_modules(model).items():
            prefix = f"{PEFT_PREFIX}{name}."
            out[prefix + "lora_A.default.weight"] = m.lora_A.detach()
            out[prefix + "lora_B.default.weight"] = m.lora_B.detach()
            if m.init == "svd" or m.merged:  # the frozen residual differs from the pretrained weight
                base = m.base.weight.detach()
                out[prefix + "base_layer.weight"] = base - m.delta().to(base.dtype) if m.merged else base
        return out


STATE_FILE = "trainable.safetensors"  # what a run directory holds its trained parameters in


def factors_file(source) -> Path:
    """The file ``method.init_from`` names (a run directory, a .safetensors file or a PEFT LoRA adapter
    folder), checked before any model is loaded: it exists, its header reads (a truncated or foreign
    file does not) and it holds LoRA factors. For an adapter folder: the folder."""
    from safetensors import SafetensorError, safe_open

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
    """Replace every LoRALinear by its base layer with ΔW merged in: a plain model for deployment."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, m.base)
    return model
