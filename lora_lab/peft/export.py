"""``lora-lab-export <run dir> <out dir>``: a completed LoRA or DoRA run as a PEFT LoRA adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base,
out_dir)`` loads into the run's base model with the run's logits.

The model is rebuilt from the run record (same config and seed, so a random model and an untrained
head come out as in the run), the method applied and the trained state loaded; then a PEFT model is
built with the same settings, given our weights and saved with PEFT's own ``save_pretrained``. The
task head (trained or not) is saved as ``modules_to_save``; a language model has none (its output
layer is pre-trained) and its adapter's task_type is CAUSAL_LM (SEQ_CLS for a sequence classifier).
A LoRA run with ``init=svd`` trained on a changed W0 (the residual W0 - s B0 A0); it is exported as
PEFT converts its PiSSA adapters: a rank-2r LoRA of scale 1 holding ΔW = s (B A - B0 A0), which applies
to the pretrained W0. GPT-2's Conv1D layers export with ``fan_in_fan_out=True``; a run that adapted
parts of GPT-2's fused c_attn (targets [q, v]) exports exactly as one LoRA of rank 2r per c_attn, the
parts' A stacked and their B block-structured, at scale 1 (``LoRA.peft_adapter``).

After writing, the adapter is loaded back with PEFT onto a fresh copy of the base and its logits
compared with ours on a random batch (``--no-check`` skips this): the largest difference is printed,
beside how far the adapter moves the logits from the base model's, and must stay within 1e-5.

``--portable`` writes an adapter for plain PEFT + transformers: the base named as a user loads it (the
embedded MiniLM as sentence-transformers/all-MiniLM-L6-v2) and a README.md saying which transformers
class to load it with and how lora_lab's pooled head is rebuilt (the check then follows that card).
``--push-to-hub OWNER/NAME`` (implies --portable; ``--private``, ``--dry-run``) uploads the folder.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from lora_lab.errors import ConfigError
from lora_lab.methods import registered_methods
from lora_lab.peft.hub import PushError, check_repo_id, describe_plan, push, upload_plan
from lora_lab.peft.portable import CARD_FILE, card_logits, load_portable, model_card
from lora_lab.peft.portable import describe as portable_base
from lora_lab.runtime import records

EXPORTABLE = tuple(name for name, cls in registered_methods().items() if cls.exports_peft)  # lora, dora
ADAPTER_DIR = "peft_adapter"  # where a run directory keeps its own export (logger.log_model=true)
WRITTEN = ("adapter_config.json", "adapter_model.safetensors")
UMASK = os.umask(0o022)
os.umask(UMASK)
CHECK_TOLERANCE = 1e-5  # the largest |logit difference| accepted on fp32 weights (bf16 ones are reported only)


@dataclass
class Exported:
    out_dir: Path
    max_logit_difference: float | None  # PEFT's model loaded from out_dir vs ours; None: not checked
    max_logit_change: float | None  # ours vs the base model: how much the adapter moves the logits
    tolerance: float | None  # what the difference must stay within; None: no bound (bf16 weights)


@dataclass
class RebuiltRun:
    record: dict
    method: object  # the run's Method, applied to ``model``
    model: nn.Module  # the trained model, in eval mode
    base: nn.Module  # the same model before the method was applied (what PEFT wraps)


def rebuild_run(run_dir) -> RebuiltRun:
    """The trained model of a completed LoRA or DoRA run, on the CPU, and its base model."""
    from lora_lab.runtime.rebuild import rebuild_trained

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("run", str(run_dir), "is not a directory")
    record = records.load_record(run_dir)
    name = record.get("method")
    if name not in EXPORTABLE:
        raise ConfigError("run", str(run_dir), f"is a {name!r} run; only {' and '.join(EXPORTABLE)} runs export "
                          "as PEFT LoRA adapters")
    rebuilt = rebuild_trained(run_dir, record, keep_base=True)
    return RebuiltRun(record, rebuilt.method, rebuilt.model, rebuilt.base)


def base_model_name(model_cfg) -> str | None:
    """What adapter_config.json names as the base: a Hub id (or the local folder) as given, the
    embedded model's folder; None for a random model, which no name rebuilds."""
    from lora_lab.models.files import embedded_model_path

    if model_cfg.source == "embedded":
        return embedded_model_path(model_cfg.name)
    if model_cfg.source == "hub":
        return str(model_cfg.name)
    return None


def head_modules(model: nn.Module) -> list[str]:
    """The modules holding the task head's parameters, as PEFT's modules_to_save names them."""
    from lora_lab.models.architectures import head_parameter_names

    return sorted({name.rpartition(".")[0] for name in head_parameter_names(model)})


def build_peft_model(run: RebuiltRun, base_name: str | None):
    """A PEFT model on a copy of the base, with the run's adapter and head in it."""
    import peft

    method, model = run.method, run.model
    config, weights = method.peft_adapter(model)
    head = head_modules(run.base)
    config.modules_to_save = list(head) or None
    twin = peft.get_peft_model(copy.deepcopy(run.base), config)
    twin.peft_config["default"].base_model_name_or_path = base_name  # get_peft_model sets the model's own
    # a SEQ_CLS model adds "classifier" and "score" itself (again when loaded): the file names the head
    twin.peft_config["default"].modules_to_save = config.modules_to_save = list(head) or None
    params = dict(twin.named_parameters())
    ours = dict(model.named_parameters())
    for module in head:
        for leaf, _ in run.base.get_submodule(module).named_parameters():
            weights[f"base_model.model.{module}.modules_to_save.default.{leaf}"] = ours[f"{module}.{leaf}"]
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise RuntimeError(f"PEFT's model has no parameter {unknown[0]}")
    with torch.no_grad():
        for key, tensor in weights.items():
            params[key].copy_(tensor)
    return twin.eval()


def export_run(run_dir, out_dir, force: bool = False, check: bool = True, portable: bool = False,
               card_adapter: str | None = None) -> Exported:
    """Write the PEFT adapter of ``run_dir`` into ``out_dir``; with ``check``, measure the largest
    |logit difference| between PEFT's model loaded from it and ours. ``portable``: named and described
    for plain PEFT + transformers (lora_lab.peft.portable), the card written beside it (loading the adapter
    from ``card_adapter``, default ``out_dir``) and used by the check."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not force)):
        what = "is not a directory" if not out_dir.is_dir() else "exists and is not empty (--force writes into it)"
        raise ConfigError("out", str(out_dir), what)
    run = rebuild_run(run_dir)
    cfg = OmegaConf.create(run.record["config"])
    described = portable_base(run, cfg.model) if portable else None
    twin = build_peft_model(run, described.name if portable else base_model_name(cfg.model))
    if portable and described.pooling is not None:  # lora_lab's pooled head: the class the card loads is a SEQ_CLS one
        twin.peft_config["default"].task_type = "SEQ_CLS"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as staging:
        # save_embedding_layers=False: "auto" would ask the Hub whether the vocabulary changed
        twin.save_pretrained(staging, save_embedding_layers=False)
        for name in WRITTEN:  # PEFT's model card template is left out
            os.chmod(Path(staging) / name, 0o666 & ~UMASK)  # safetensors writes 0600; adapters are for sharing
            os.replace(Path(staging) / name, out_dir / name)
    if portable:
        card = out_dir / CARD_FILE
        card.write_text(model_card(described, run.record, card_adapter or str(out_dir)))
        os.chmod(card, 0o666 & ~UMASK)
    tolerance = CHECK_TOLERANCE if (cfg.model.get("dtype") or "fp32") == "fp32" else None
    if not check:
        return Exported(out_dir, None, None, tolerance)
    return Exported(out_dir, *logit_differences(run, out_dir, described), tolerance)


def probe_batch(model: nn.Module, size: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
    """Random token ids the model knows, one row padded, for comparing two models' logits."""
    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(1, vocab, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logit_differences(run: RebuiltRun, adapter_dir, portable=None) -> tuple[float, float]:
    """On a probe batch, the largest |logit difference| of PEFT's model loaded from ``adapter_dir`` onto
    a fresh copy of the base vs ours, and of ours vs the base (what the adapter changes). With a
    ``portable`` description, PEFT's model is the transformers class the card names, run as it says."""
    import peft
    from safetensors.torch import load_file

    if portable is not None:
        inputs = probe_batch(run.base)
        loaded = load_portable(run, portable, adapter_dir)
        with torch.no_grad():
            theirs, ours, base = card_logits(loaded, portable, inputs), run.model(**inputs).logits, \
                run.base(**inputs).logits
        return float((theirs - ours).abs().max()), float((ours - base).abs().max())
    # what PeftModel.from_pretrained does with a local folder, with the weights read by safetensors
    # explicitly (PEFT itself would fall back to a pickled adapter_model.bin)
    config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    loaded = peft.get_peft_model(copy.deepcopy(run.base), config)
    peft.set_peft_model_state_dict(loaded, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    loaded.eval()
    inputs = probe_batch(run.base)
    with torch.no_grad():
        theirs, ours, base = (m(**inputs).logits for m in (loaded, run.model, run.base))
    return float((theirs - ours).abs().max()), float((ours - base).abs().max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lora-lab-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a completed lora or dora run directory")
    parser.add_argument("out_dir", type=Path, help="the adapter folder to write")
    parser.add_argument("--force", action="store_true", help="write into a non-empty out_dir (replacing "
                        f"{' and '.join(WRITTEN)}, and {CARD_FILE} with --portable)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not load the adapter back with PEFT to compare logits")
    parser.add_argument("--portable", action="store_true",
                        help="for plain PEFT + transformers without lora_lab: base_model_name_or_path a loadable "
                        f"name, and a {CARD_FILE} saying how to load the base and rebuild the head")
    parser.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hub model repository "
                        "(OWNER/NAME, created if missing; implies --portable; token: HF_TOKEN or a stored login)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --push-to-hub: list what would be uploaded (files, sizes, repository) and stop")
    args = parser.parse_args(argv)
    if (args.private or args.dry_run) and not args.push_to_hub:
        parser.error("--private and --dry-run go with --push-to-hub REPO")
    portable = args.portable or bool(args.push_to_hub)
    try:
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)
        exported = export_run(args.run_dir, args.out_dir, force=args.force, check=args.check, portable=portable,
                              card_adapter=args.push_to_hub)
    except ConfigError as error:
        print(f"lora-lab-export: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name != "peft":
            raise
        print("lora-lab-export: error: peft is not installed (pip install peft)", file=sys.stderr)
        return 2
    difference, tolerance = exported.max_logit_difference, exported.tolerance
    note = "" if difference is None else (f"; PEFT's logits differ from the run's by at most {difference:.2e} "
                                          f"(the adapter moves them by up to {exported.max_logit_change:.3g})")
    files = (*WRITTEN, CARD_FILE) if portable else WRITTEN
    middle = "".join(f", {name}" for name in files[1:-1])
    print(f"[lora_lab] wrote {args.out_dir / WRITTEN[0]}{middle} and {files[-1]}{note}")
    if difference is not None and tolerance is not None and difference > tolerance:
        print(f"lora-lab-export: error: the adapter does not reproduce the run (difference > {tolerance:g})",
              file=sys.stderr)
        return 1
    if not args.push_to_hub:
        return 0
    if args.dry_run:
        print(describe_plan(args.push_to_hub, args.private, upload_plan(args.out_dir, files)))
        return 0
    try:
        url = push(args.out_dir, files, args.push_to_hub, args.private)
    except PushError as error:
        print(f"lora-lab-export: error: {error}", file=sys.stderr)
        return 1
    print(f"[lora_lab] pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
