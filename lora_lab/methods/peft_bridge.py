"""Any PEFT tuner inside lora_lab's trainer: ``method=peft method.peft_type=VERA method.options={r: 8, ...}``.

``peft_type`` names one of PEFT's tuners (``peft.PeftType``, any case); ``options`` are the keyword arguments of
its config class (``VeraConfig``, ``LoHaConfig``, ...), built through PEFT's own mapping from type to config.

Adapter tuners (LoRA, AdaLoRA, VeRA, LoHa, LoKr, OFT, LN tuning, ...) are injected into the model in place
by PEFT's tuner class, as ``peft.inject_adapter_in_model`` does: the model stays lora_lab's model (its head,
pooling, parameter names and forward), only the adapted layers become PEFT's layers, and the tuner object is
kept by the method (AdaLoRA's ``update_and_allocate`` runs after every optimiser step through
``after_optimizer_step``; its ``total_step`` is the run's number of optimiser steps when not given). The
task's loss is lora_lab's; AdaLoRA's orthogonality regulariser, which PEFT adds in its own model's forward,
comes through ``extra_loss``: ``orth_reg_weight`` x the mean over its P and Q of ||P P^T - I||_F and
||Q^T Q - I||_F.

Prompt tuning (``PROMPT_TUNING``) prepends PEFT's ``PromptEmbedding`` (its virtual tokens) to the inputs of
the backbone of an encoder, and drops those positions from the backbone's output, so every head (the
model's pooler, CLS or mean pooling, token tagging) reads the real tokens' states.

Counted as lora_lab counts every method: trainable = PEFT's trainable parameters (``method_parameter_names``)
plus the head. ΔW per adapted matrix: PEFT's ``get_delta_weight`` for the tuners whose delta is additive
(LoRA, AdaLoRA, VeRA, LoHa, LoKr), else merged minus base weight for a tuner that merges (OFT: its delta is
a rotation); none for a tuner that changes no weight matrix (LN tuning, prompt tuning: ``method_resolved``
says so). Merging for inference is PEFT's ``merge`` / ``unmerge`` of every tuner layer.

peft is an optional dependency: it is imported here only, and a missing package is a one-line ConfigError.
"""
from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lora_lab import rules
from lora_lab.errors import ConfigError, first_line
from lora_lab.methods.base import DeltaW, Method, head_count, register
from lora_lab.models.architectures import head_parameter_names, is_causal_lm
from lora_lab.models.linear_layers import dense_weight
from lora_lab.peft.names import PEFT_PREFIX

ADAPTER = "default"  # PEFT's adapter name
PROMPT = "PROMPT_TUNING"
# the tuners whose layers' get_delta_weight is the additive ΔW (W' = W0 + ΔW); OFT's, e.g., is a rotation
ADDITIVE_DELTA = ("LORA", "ADALORA", "VERA", "LOHA", "LOKR")
NO_WEIGHT_DELTA = ("LN_TUNING", PROMPT)  # tuners that change no weight matrix
PROMPT_MODULE = "peft_prompt"  # where the prompt embedding sits in the backbone
TUNER_NAMES = {"VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT", "ADALORA": "AdaLoRA", "LORA": "LoRA",
               "LN_TUNING": "LN tuning", PROMPT: "Prompt tuning"}
PLOT_COLOURS = {"VERA": "tab:olive", "LOHA": "tab:pink", "LOKR": "tab:brown", "OFT": "darkgreen", "ADALORA": "navy",
                "LN_TUNING": "goldenrod", PROMPT: "indigo"}
NOT_BRIDGED = ("XLORA", "ADAPTION_PROMPT")  # PEFT models of their own (a mixture of LoRAs, Llama's adaption prompt)


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ConfigError("method.name", "peft", f"needs the optional peft package (pip install peft): "
                          f"{first_line(error)}") from None
    return peft


def supported_types() -> list[str]:
    """The PEFT types the bridge runs: every tuner PEFT injects into a model's layers, and prompt tuning."""
    from peft import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    injected = {getattr(t, "value", t) for t in PEFT_TYPE_TO_TUNER_MAPPING
                if not issubclass(PEFT_TYPE_TO_CONFIG_MAPPING[t], PromptLearningConfig)}
    return sorted((injected - set(NOT_BRIDGED)) | {PROMPT})


def _options_rule(value):
    if value is None or isinstance(value, (dict, DictConfig)):
        return None
    return "must be a mapping of the PEFT config's options (e.g. {r: 8, target_modules: [query, value]})"


@register("peft")
class PeftBridge(Method):
    config_rules = {
        **Method.config_rules,
        "peft_type": rules.text(),
        "options": _options_rule,
        "train_head": rules.boolean(),
    }
    has_peft_counterpart = True
    bench_arms = ("vera", "loha", "lokr", "oft", "adalora", "ln_tuning", "prompt_tuning")
    order, family, plot_style = 7, "PEFT", ("tab:brown", "X")

    def __init__(self, cfg, resolved: dict | None = None):
        super().__init__(cfg, resolved)
        # each tuner is a family of its own in plots (one legend entry, line and style per tuner)
        self.family = f"{TUNER_NAMES.get(self.peft_type(), self.peft_type())} (PEFT)"
        self.plot_style = (PLOT_COLOURS.get(self.peft_type(), "tab:brown"), "X")
        self.supports_merge = self.peft_type() != PROMPT  # PEFT merges every tuner lora_lab bridges but prompts
        self.tuner = None  # PEFT's tuner (BaseTuner) that injected the layers, once applied
        self.config = None  # PEFT's config of this run, once applied

    # ------------------------------------------------------------ what the method is
    def peft_type(self) -> str:
        return str(self.cfg.get("peft_type") or "").upper()

    def options(self) -> dict:
        options = self.cfg.get("options") or {}
        return dict(OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else options)

    def label(self) -> str:
        """E.g. "VeRA (PEFT) r=256", "AdaLoRA (PEFT) r=12", "Prompt tuning (PEFT) 20 tokens"."""
        options = self.options()
        if options.get("num_virtual_tokens"):
            return f"{self.family} {options['num_virtual_tokens']} tokens"
        size = next((f" r={options[k]}" for k in ("r", "init_r") if options.get(k)), "")
        return f"{self.family}{size}"

    def size(self) -> float | None:
        options = self.options()
        return next((float(options[k]) for k in ("r", "init_r", "num_virtual_tokens") if options.get(k)), None)

    def run_tag(self) -> str:
        return f"peft-{self.peft_type().lower()}"

    def sort_key(self) -> tuple:
        return (self.order, self.name, self.peft_type(), self.size() or 0)

    def adapts_matrices(self) -> bool:
        return self.peft_type() not in NO_WEIGHT_DELTA

    # ------------------------------------------------------------ settings
    def peft_config_object(self, total_steps: int | None = None):
        """PEFT's config of ``peft_type`` with ``options`` (AdaLoRA's ``total_step``: ``total_steps`` when not
        given); a one-line ConfigError for an unknown type or an option the config class refuses."""
        _peft()
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        kind = self.peft_type()
        if kind not in supported_types():
            raise ConfigError("method.peft_type", self.cfg.get("peft_type"),
                              f"is not a PEFT tuner lora_lab runs; PEFT offers {', '.join(supported_types())}")
        options = self.options()
        if kind == "ADALORA" and options.get("total_step") is None:
            if total_steps is None:
                raise ConfigError("method.options.total_step", None, "AdaLoRA needs its number of steps: set it, "
                                  "or train through the trainer, which fills it from the run's schedule")
            options["total_step"] = int(total_steps)
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[kind]
        try:
            return cls(**options)
        except (TypeError, ValueError) as error:
            raise ConfigError("method.options", options, f"{cls.__name__} refuses them: {first_line(error)}") from None

    def check(self) -> None:
        problem = _options_rule(self.cfg.get("options"))
        if problem:
            raise ConfigError("method.options", self.cfg.get("options"), problem)
        self.peft_config_object(self.total_steps or 1_000_000)  # a stand-in step count: the run's is known later

    # ------------------------------------------------------------ applying
    def apply(self, model: nn.Module) -> None:
        peft = _peft()
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        config = self.peft_config_object(self.total_steps)
        kind = self.peft_type()
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            if kind == PROMPT:
                self._add_prompt(model, config, peft)
            else:
                self.tuner = PEFT_TYPE_TO_TUNER_MAPPING[kind](model, config, ADAPTER)
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigError("method.options", self.options(), f"PEFT's {kind} cannot adapt this model: "
                              f"{first_line(error)}") from None
        self.config = config
        params = dict(model.named_parameters())
        method_names = self.method_parameter_names(model)
        for name in method_names:
            params[name].requires_grad_(True)
        if self.cfg.get("train_head", True):
            for name in head_parameter_names(model):
                params[name].requires_grad_(True)
        self.resolved = {"peft_type": kind, "peft_trainable": sum(params[n].numel() for n in method_names)}
        if kind == "ADALORA":
            self.resolved.update(total_step=int(config.total_step), initial_rank=int(config.init_r),
                                 target_rank=int(config.target_r), ranks=self.adalora_ranks(model))
        if not self.adapts_matrices():
            self.resolved["delta_w"] = f"none: {kind} changes no weight matrix"

    def _add_prompt(self, model: nn.Module, config, peft) -> None:
        """PEFT's prompt embedding in the backbone, prepended to its inputs and dropped from its outputs."""
        if is_causal_lm(model):
            raise ValueError("prompt tuning through lora_lab's bridge runs on encoders (a causal LM generates "
                             "with a cache the virtual tokens would shift)")
        from peft.tuners.prompt_tuning import PromptEmbedding

        backbone = getattr(model, model.base_model_prefix)  # Hugging Face's classifiers and lora_lab's pooled one
        embeddings = backbone.get_input_embeddings()
        config.num_transformer_submodules = config.num_transformer_submodules or 1
        config.token_dim = config.token_dim or embeddings.embedding_dim
        config.num_layers = config.num_layers or model.config.num_hidden_layers
        prompt = PromptEmbedding(config, embeddings).to(embeddings.weight.device)
        backbone.add_module(PROMPT_MODULE, nn.ModuleDict({ADAPTER: prompt}))
        virtual = config.num_virtual_tokens * config.num_transformer_submodules
        backbone.register_forward_pre_hook(_prepend_prompt(virtual), with_kwargs=True)
        backbone.register_forward_hook(_drop_prompt(virtual))

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        """PEFT's own parameters: those of its adapter (``.default``) inside its tuner layers, or the prompt."""
        kind = self.peft_type()
        if kind == PROMPT:
            return {n for n, _ in model.named_parameters() if f".{PROMPT_MODULE}.{ADAPTER}." in n}
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(kind)
        out = set()
        for name, _ in model.named_parameters():
            parts = name.split(".")
            if ADAPTER in parts and any(p.startswith(prefix) for p in parts[:parts.index(ADAPTER)]):
                out.add(name)
        return out

    def expected_trainable(self, model: nn.Module) -> int | None:
        """PEFT's count of its trainable parameters on ``model`` (``get_nb_trainable_parameters``), plus the head."""
        peft = _peft()
        config = self.peft_config_object(self.total_steps or 1_000_000)
        if self.peft_type() == PROMPT:
            count = config.num_virtual_tokens * model.get_input_embeddings().embedding_dim
        else:
            count = peft.get_peft_model(copy.deepcopy(model), config).get_nb_trainable_parameters()[0]
        return count + (head_count(model) if self.cfg.get("train_head", True) else 0)

    # ------------------------------------------------------------ training
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """AdaLoRA: PEFT's rank allocation (``update_and_allocate``), and the ranks it leaves in ``resolved``."""
        if self.tuner is None or not hasattr(self.tuner, "update_and_allocate"):
            return
        config = self.config
        if step > config.total_step - config.tfinal and not config.rank_pattern:
            # resumed after the final allocation: its masks are the zeros of the saved singular values
            config.rank_pattern = {n: (p.detach().view(-1) != 0).tolist() for n, p in model.named_parameters()
                                   if f"lora_E.{ADAPTER}" in n}
        self.tuner.update_and_allocate(step)
        if self.config.rank_pattern:
            self.resolved["ranks"] = self.adalora_ranks(model)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """AdaLoRA's orthogonality regulariser (Zhang et al. 2023), as PEFT's AdaLoRA model adds it to its loss."""
        if self.tuner is None or self.peft_type() != "ADALORA" or not self.config.orth_reg_weight:
            return None
        penalties = []
        for layer in self.tuner_layers(model).values():
            for P in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER].T):  # P: r x in, Q^T: r x out
                if P.numel():
                    gram = P @ P.T
                    penalties.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device,
                                                                                dtype=gram.dtype)))
        return self.config.orth_reg_weight * torch.stack(penalties).mean() if penalties else None

    def adalora_ranks(self, model: nn.Module) -> dict[str, int]:
        """The rank each AdaLoRA matrix has now: its singular values the allocator keeps (``init_r`` until it
        first prunes), by module name."""
        pattern = self.config.rank_pattern if self.config is not None else None
        ranks = {}
        for name, layer in self.tuner_layers(model).items():
            kept = next((v for k, v in (pattern or {}).items() if k.startswith(name + ".")), None)
            ranks[name] = int(sum(bool(x) for x in kept)) if kept is not None else int(layer.r[ADAPTER])
        return ranks

    # ------------------------------------------------------------ ΔW and merging
    def tuner_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}

    def merge_layers(self, model: nn.Module):
        return list(self.tuner_layers(model).values()) if self.peft_type() != PROMPT else []

    def undo_inference(self, model: nn.Module) -> None:
        for layer in self.merge_layers(model):
            if layer.merged:
                layer.unmerge()

    @torch.no_grad()
    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        if not self.adapts_matrices():
            return {}
        out = {}
        for name, layer in self.tuner_layers(model).items():
            base = layer.get_base_layer()
            if not hasattr(base, "weight") or base.weight.ndim != 2:
                continue
            was_merged = bool(layer.merged)
            if was_merged:
                layer.unmerge()
            w0 = dense_weight(base).detach().float().cpu().clone()
            if self.peft_type() in ADDITIVE_DELTA:
                delta = layer.get_delta_weight(ADAPTER).detach().float().cpu()
                if getattr(layer, "fan_in_fan_out", False):
                    delta = delta.t()
            else:
                layer.merge()
                delta = dense_weight(base).detach().float().cpu() - w0
                layer.unmerge()
            if was_merged:
                layer.merge()
            out[name] = DeltaW(dense=delta.contiguous(), base=w0, kind=f"peft_{self.peft_type().lower()}")
        return out

    # ------------------------------------------------------------ PEFT's own model
    def peft_config(self, model: nn.Module):
        return self.config

    def peft_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tuner's parameters under ``peft.get_peft_model``'s names (the prompt: ``prompt_encoder``)."""
        params = dict(model.named_parameters())
        if self.peft_type() == PROMPT:
            return {f"prompt_encoder.{ADAPTER}.embedding.weight": params[n].detach()
                    for n in self.method_parameter_names(model)}
        return {PEFT_PREFIX + n: params[n].detach() for n in self.method_parameter_names(model)}


def _prepend_prompt(virtual: int):
    def hook(backbone, args, kwargs):
        kwargs = dict(kwargs)
        if args:  # a classifier may pass input_ids positionally
            kwargs["input_ids"], args = args[0], args[1:]
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = backbone.get_input_embeddings()(ids)
        size = embeds.shape[0]
        indices = torch.arange(virtual, device=embeds.device)
        prompts = getattr(backbone, PROMPT_MODULE)[ADAPTER](indices).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(size, -1, -1), embeds], dim=1)
        for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            value = kwargs.get(key)
            if value is not None:
                kwargs[key] = torch.cat([torch.full((size, virtual), fill, dtype=value.dtype, device=value.device),
                                         value], dim=1)
        if kwargs.get("position_ids") is not None:
            raise ValueError("prompt tuning through lora_lab's bridge takes no position_ids")
        return args, kwargs

    return hook


def _drop_prompt(virtual: int):
    def hook(backbone, args, output):
        hidden = output.last_hidden_state[:, virtual:]
        output.last_hidden_state = hidden
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, virtual:] for h in output.hidden_states)
        if getattr(output, "pooler_output", None) is not None and getattr(backbone, "pooler", None) is not None:
            output.pooler_output = backbone.pooler(hidden)  # the pooler reads the real first token
        return output

    return hook
