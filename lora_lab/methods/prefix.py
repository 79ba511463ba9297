"""Prefix tuning (PreLayer of the LoRA paper; Li & Liang 2021): every attention layer attends to l_p
trained key and value vectors before the input's own; the whole model stays frozen.

The prefixes enter as the key/value cache a decoder keeps while generating: a forward pre-hook on the
backbone (``model.base_model_prefix``) hands it a ``DynamicCache`` holding each layer's l_p keys and
values and extends the attention mask with l_p ones, as PEFT's PREFIX_TUNING does. The backbone's
outputs are the real tokens' only, so every head, token labels and a causal LM's loss are unchanged in
form. Transformers 5 takes such a cache in BERT-style encoders too (``cache``, which PEFT's task
models do not pass there). Positions: the real tokens come after the prefix (l_p .. l_p + n - 1), as the
cache length makes every model count them and as PEFT does (it shifts explicit ``position_ids`` by
l_p too), so the prefix stands where Li & Liang's virtual tokens stand. During generation the
prefixes are put in once, into the empty cache; later steps only extend the mask. While training the
cache stores nothing but the prefixes, so gradient checkpointing (which recomputes a layer) may keep it;
GPT-2 drops any cache from its checkpointed layers, so there the two are refused together.

Count: the keys and values themselves, 2 x L x d_kv x l_p (PEFT's count; d_kv = d_model except with
grouped-query attention, whose layers keep fewer key/value heads). The LoRA paper counts
L x d_model x (l_p + l_i) for PreLayer, one vector per virtual token and layer; it has no infix here.

``reparameterize: true`` trains the prefixes through an MLP (Li & Liang's stabiliser, PEFT's
``prefix_projection``): a seed of l_p x d_kv embeddings, Linear(d_kv, mlp_hidden), tanh,
Linear(mlp_hidden, 2 L d_kv); trained then are the seed and the MLP (``expected_trainable`` counts
them). ``finish_training`` folds it away: the MLP's output, computed once, becomes the plain prefixes,
so a run's saved state holds only those, under the same name as without the MLP.

PEFT's PREFIX_TUNING is the same method (the same layout, count and positions); it runs on causal LMs
(``peft_config``, parity tested on GPT-2 and Llama) and not on transformers 5's classifiers, whose
forward takes no cache: no benchmark twin (``has_peft_counterpart`` is False).

Initialisation: plain prefixes are drawn from N(0, initializer_range^2) (small keys and values: each
prefix position starts with an even share of attention and adds little); the seed as PEFT's
(``nn.Embedding``: N(0, 1)), the MLP as ``nn.Linear``. No weight matrix changes: ΔW = 0, nothing merges.
"""
from __future__ import annotations

import torch
from torch import nn

from lora_lab import rules
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW, Method, ModelDims, freeze_all, head_count, register
from lora_lab.methods.prompt import CACHE_KEYS, backbone_of, cache_in_use
from lora_lab.models.architectures import head_parameter_names, peft_task_type

MODULE = "layer_prefixes"  # the prefixes' module, in the backbone
DROP_CACHE_WHEN_CHECKPOINTING = ("gpt2",)  # models whose checkpointed layers get no cache (transformers 5.25)


def key_value_width(config) -> tuple[int, int]:
    """(key/value heads, head dim) of each attention layer."""
    dims = ModelDims.of(config)
    head_dim = getattr(config, "head_dim", None) or dims.hidden // int(config.num_attention_heads)
    return dims.kv // head_dim, head_dim


def prefix_only_cache(config):
    """A ``DynamicCache`` that, once filled with the prefixes, stores nothing more: each layer gets its
    prefixes before its own keys and values, and a layer recomputed by gradient checkpointing (which
    transformers otherwise runs without any cache) sees the same cache again. Used while training."""
    from transformers import DynamicCache

    class PrefixOnlyCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    return PrefixOnlyCache(config=config)


class LayerPrefixes(nn.Module):
    """Keys and values of l_p virtual tokens for each of L layers: ``prefix`` (L x 2 x l_p x d_kv;
    [:, 0] keys, [:, 1] values), or, reparameterised, ``seed`` (l_p x d_kv) and ``mlp``, which compute it."""

    def __init__(self, layers: int, length: int, heads: int, head_dim: int, mlp_hidden: int | None, std: float,
                 device=None):
        super().__init__()
        self.shape = (layers, 2, length, heads * head_dim)
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        if mlp_hidden is None:
            self.prefix = nn.Parameter(torch.randn(self.shape, device=device) * std)
        else:
            self.seed = nn.Parameter(torch.randn(length, width, device=device))
            self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden), nn.Tanh(),
                                     nn.Linear(mlp_hidden, 2 * layers * width)).to(device)

    @property
    def reparameterized(self) -> bool:
        return "prefix" not in self._parameters

    def keys_values(self) -> torch.Tensor:
        """L x 2 x l_p x d_kv: the plain prefixes, or the MLP's output."""
        if not self.reparameterized:
            return self.prefix
        layers, _, length, width = self.shape
        return self.mlp(self.seed).view(length, layers, 2, width).permute(1, 2, 0, 3)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the seed and the MLP by the prefixes they compute (trainable, as they were)."""
        if not self.reparameterized:
            return
        prefix = self.keys_values().detach().clone().contiguous()
        del self.seed, self.mlp
        self.prefix = nn.Parameter(prefix)

    def cache(self, size: int, dtype: torch.dtype, config, cache=None, training: bool = False):
        """A cache holding each layer's prefixes for ``size`` rows: ``cache`` (given by ``generate``), else a
        new one, which stores nothing more while training (``prefix_only_cache``)."""
        from transformers import DynamicCache

        if cache is None:
            cache = prefix_only_cache(config) if training else DynamicCache(config=config)
        layers, _, length, _ = self.shape
        kv = self.keys_values().to(dtype)
        for layer in range(layers):  # batch x heads x l_p x head_dim
            key, value = (kv[layer, j].view(length, self.heads, self.head_dim).transpose(0, 1) for j in (0, 1))
            DynamicCache.update(cache, key.expand(size, -1, -1, -1), value.expand(size, -1, -1, -1), layer)
        return cache

    def before_backbone(self, backbone: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs["inputs_embeds"]
        size, n = reference.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(size, n, dtype=torch.long, device=reference.device)
        length = self.shape[2]
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)
        if backbone.training and getattr(backbone, "gradient_checkpointing", False) and torch.is_grad_enabled() \
                and backbone.config.model_type in DROP_CACHE_WHEN_CHECKPOINTING:
            raise ConfigError("trainer.gradient_checkpointing", True, f"makes {backbone.config.model_type} run its "
                              "layers without the key/value cache, which holds the prefixes; turn it off")
        if not cache_in_use(kwargs):
            given = next((kwargs.pop(k) for k in CACHE_KEYS if kwargs.get(k) is not None), None)
            for key in CACHE_KEYS:
                kwargs.pop(key, None)
            dtype = backbone.get_input_embeddings().weight.dtype
            kwargs["cache"] = self.cache(size, dtype, backbone.config, given, backbone.training)
        return args, kwargs


@register("prefix")
class PrefixTuning(Method):
    config_rules = {**Method.config_rules, "prefix_length": rules.integer(1), "reparameterize": rules.boolean(),
                    "mlp_hidden": rules.integer(1), "train_head": rules.boolean()}
    preserves_outputs_at_init = False  # the prefixes take part in attention from the start
    # PEFT's PREFIX_TUNING runs on causal LMs only here (``peft_config``), not on the benchmark's BERT
    # classifier, so there is no benchmark twin
    has_peft_counterpart = False
    bench_arms = ("prefix",)
    order, family, plot_style = 6, "Prefix tuning", ("darkviolet", "<")

    def length(self) -> int:
        return int(self.cfg.get("prefix_length"))

    def mlp_hidden(self) -> int | None:
        return int(self.cfg.get("mlp_hidden")) if self.cfg.get("reparameterize", False) else None

    def label(self) -> str:
        """E.g. "Prefix tuning l_p=10", "Prefix tuning l_p=10 (MLP 512)"."""
        hidden = self.mlp_hidden()
        return f"{self.family} l_p={self.length()}" + (f" (MLP {hidden})" if hidden else "")

    def size(self) -> float:
        return float(self.length())

    def run_tag(self) -> str:
        return f"prefix-{self.length()}" + ("-mlp" if self.mlp_hidden() else "")

    def adapts_matrices(self) -> bool:
        return False

    def expected_trainable(self, model: nn.Module) -> int:
        """2 x L x d_kv x l_p (PEFT's count); reparameterised, the seed and the MLP instead: l_p d_kv +
        (d_kv h + h) + (h 2 L d_kv + 2 L d_kv), h = mlp_hidden. Plus the head."""
        dims = ModelDims.of(model.config)
        out, hidden = 2 * dims.layers * dims.kv, self.mlp_hidden()
        count = out * self.length() if hidden is None else (
            self.length() * dims.kv + (dims.kv + 1) * hidden + (hidden + 1) * out)
        return count + (head_count(model) if self.cfg.get("train_head", True) else 0)

    def check(self) -> None:
        for key in ("prefix_length", "mlp_hidden"):
            value = self.cfg.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"method.{key}", value, "must be an integer >= 1")
        for key in ("reparameterize", "train_head"):
            if not isinstance(self.cfg.get(key), bool):
                raise ConfigError(f"method.{key}", self.cfg.get(key), "must be true or false")

    def apply(self, model: nn.Module) -> None:
        backbone = backbone_of(model)
        config = model.config
        heads, head_dim = key_value_width(config)
        freeze_all(model)
        device = model.get_input_embeddings().weight.device
        prefixes = LayerPrefixes(int(config.num_hidden_layers), self.length(), heads, head_dim, self.mlp_hidden(),
                                 float(getattr(config, "initializer_range", 0.02)), device)
        backbone.add_module(MODULE, prefixes)
        backbone.register_forward_pre_hook(prefixes.before_backbone, with_kwargs=True)
        for module in backbone.modules():  # gradient checkpointing keeps the (stateless) training cache
            if hasattr(module, "_can_checkpoint_with_cache"):
                module._can_checkpoint_with_cache = True
        trained = self.method_parameter_names(model)
        if self.cfg.get("train_head", True):
            trained |= head_parameter_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
        self.resolved = {"prefix_parameters": 2 * config.num_hidden_layers * heads * head_dim * self.length(),
                         "delta_w": "none: prefix tuning changes no weight matrix"}

    def prefixes(self, model: nn.Module) -> LayerPrefixes:
        return getattr(backbone_of(model), MODULE)

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if f".{MODULE}." in f".{n}"}

    def finish_training(self, model: nn.Module) -> None:
        """Fold the MLP into the plain prefixes it computes (nothing to do without one)."""
        self.prefixes(model).fold()

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        return {}  # no weight matrix changes: ΔW = 0 everywhere

    # ------------------------------------------------------------ PEFT's prefix tuning
    def peft_config(self, model: nn.Module):
        """PEFT's PrefixTuningConfig with l_p virtual tokens (``prefix_projection`` for the MLP) on a causal
        LM, where the two agree; None on other models: PEFT's task models pass the prefixes only where the
        wrapped model's forward takes a cache, which transformers 5's classifiers (BERT's, a decoder's
        sequence classifier) do not."""
        import peft

        if peft_task_type(model) != "CAUSAL_LM":
            return None
        heads, head_dim = key_value_width(model.config)
        hidden = self.mlp_hidden()
        return peft.PrefixTuningConfig(num_virtual_tokens=self.length(), prefix_projection=hidden is not None,
                                       encoder_hidden_size=hidden or model.config.hidden_size,
                                       num_layers=int(model.config.num_hidden_layers), token_dim=heads * head_dim,
                                       num_attention_heads=heads, task_type="CAUSAL_LM")

    def peft_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT's prefix encoder: one l_p x (L 2 d_kv) embedding (layer, then key/value, then heads), or
        the seed (``embedding``) and the MLP (``transform``)."""
        prefixes = self.prefixes(model)
        name = "prompt_encoder.default."
        if not prefixes.reparameterized:
            layers, _, length, width = prefixes.shape
            flat = prefixes.prefix.detach().permute(2, 0, 1, 3).reshape(length, layers * 2 * width)
            return {name + "embedding.weight": flat}
        state = {name + "embedding.weight": prefixes.seed.detach()}
        state.update({f"{name}transform.{k}": v.detach() for k, v in prefixes.mlp.state_dict().items()})
        return state
