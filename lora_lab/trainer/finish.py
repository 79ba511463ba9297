"""The end of a run (rank 0): save the best epoch's state (and with ``trainer.keep_last=true`` the last
epoch's), record what ΔW is derived from (shapes and W0 fingerprints; no tensor of the base is copied), measure
inference, write the run record, and log it to W&B (with ``logger.log_model=true`` also as a model
artifact, with the run's PEFT adapter for a method PEFT has). Repeating it after a kill gives the same files."""
from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lora_lab.errors import first_line
from lora_lab.peft.export import ADAPTER_DIR, EXPORTABLE, export_run
from lora_lab.runtime import checkpoint, measure, records
from lora_lab.runtime.run_info import environment_info
from lora_lab.runtime.timing import round_robin
from lora_lab.runtime.tracking import Tracker
from lora_lab.tasks.task_types import objective
from lora_lab.trainer.evaluation import to_device
from lora_lab.trainer.progress import Progress, TrainingState, evaluation_key
from lora_lab.trainer.setup import Run


def finish(run: Run, state: TrainingState, info: dict, tracker: Tracker, throughput_ranks: list[dict]) -> dict:
    """Save, measure, write and log the run (see the module's docstring); returns its record.
    ``info``: what ``describe_run`` says about it; ``throughput_ranks``: every rank's throughput state."""
    files, delta_info = _save_states(run, state)
    for name, entry in files.items():  # what resume, export and the analysis tools check each file against
        entry["sha256"] = records.file_sha256(run.run_dir / name)
    measurements = _measurements(run, state, throughput_ranks)
    record = _record(run, state.progress, info, files, measurements, delta_info)
    written, non_finite = records.non_finite_to_null(record)  # strict JSON: null, and where it was not finite
    records.write_json(run.run_dir / records.RECORD_FILE, {**written, **({"non_finite": non_finite} if non_finite else {})})
    log_model(run.run_dir, record, tracker)
    if not run.cfg.trainer.get("keep_checkpoint", False) and run.checkpoint_dir.exists():
        shutil.rmtree(run.checkpoint_dir)
    _log_summary(record, tracker)
    run.say(result_line(record, run.monitor))
    return record


def result_line(record: dict, monitor: str) -> str:
    """The run's result in one line, printed by every run that completes (also one resumed after its
    last epoch, which prints no epoch line)."""
    best = record["best"]
    return (f"[lora_lab] result: best epoch {best['epoch']} of {record['last']['epoch']}: val {monitor} "
            f"{best[f'validation/{monitor}']:.4f}  test {monitor} {best[f'test/{monitor}']:.4f}")


def _save_states(run: Run, state: TrainingState) -> tuple[dict, dict]:
    """Write the best epoch's trainable state, and with ``trainer.keep_last`` the last epoch's state when it
    is another epoch; the model keeps the best epoch's state. Returns the record's ``files`` and what it
    says of ΔW: how it is derived, the shapes and the SHA-256 of each adapted W0 (nothing when
    ``record.save_delta_w`` is false)."""
    progress, method, run_dir = state.progress, run.method, run.run_dir
    best_epoch, last_epoch = progress.best_epoch, progress.epochs[-1]["epoch"]
    files = {records.STATE_FILE: {"epoch": best_epoch, "holds": "best"}}
    keep_last = run.cfg.trainer.get("keep_last", False)
    if keep_last and progress.best["step"] != progress.epochs[-1]["step"]:  # trainer.eval_every: maybe within one epoch
        records.save_tensors(run_dir / records.LAST_STATE_FILE, checkpoint.trainable_state(run.model),
                             metadata={"method": method.name, "epoch": str(last_epoch)})
        files[records.LAST_STATE_FILE] = {"epoch": last_epoch, "holds": "last"}
    else:
        (run_dir / records.LAST_STATE_FILE).unlink(missing_ok=True)
    if (run_dir / records.PREDICTIONS_FILE).exists():  # written when the best epoch ended (epoch_end)
        files[records.PREDICTIONS_FILE] = {"epoch": best_epoch, "holds": "best"}
    checkpoint.load_trainable_state(run.model, state.best_state)
    method.finish_training(run.model)  # a reparameterisation folded into the parameters it stands for
    records.save_tensors(run_dir / records.STATE_FILE, checkpoint.trainable_state(run.model),
                         metadata={"method": method.name, "epoch": str(best_epoch)})
    (run_dir / records.DELTA_FILE).unlink(missing_ok=True)  # left by an older lora_lab in this folder
    if not run.cfg.record.save_delta_w:
        return files, {}
    with torch.no_grad():
        deltas = method.delta_weights(run.model)
    how = (f"derived: from {records.STATE_FILE} and the base model" if deltas else
           method.resolved.get("delta_w") or f"none: {method.name} changes no weight matrix")
    return files, {"delta_w": how, "delta_w_shapes": records.delta_shapes(deltas),
                   "base_sha256": records.base_fingerprints(deltas)}


def _measurements(run: Run, state: TrainingState, throughput_ranks: list[dict]) -> dict:
    progress = state.progress
    peaks, steps = progress.peaks, max(progress.step, 1)
    measurements = {**peaks["train"], **{f"eval_{k}": v for k, v in peaks["eval"].items() if k != "memory_at_start_mb"},
                    **state.throughput.summary(), **measure.throughput_over_ranks(throughput_ranks),
                    "train_seconds": progress.train_seconds,
                    "eval_batch_ms_median": progress.eval_batch_ms_median,
                    "checkpoints_written": progress.checkpoints_written,
                    "checkpoint_seconds": progress.checkpoint_seconds,
                    "checkpoint_ms_per_step": 1000 * progress.checkpoint_seconds / steps}
    measurements.update(_inference_latency(run))
    measurements["trainable_state_bytes"] = (run.run_dir / records.STATE_FILE).stat().st_size
    return measurements


def _record(run: Run, progress: Progress, info: dict, files: dict, measurements: dict, delta_info: dict) -> dict:
    epochs = progress.epochs
    return {
        "schema_version": records.SCHEMA_VERSION,
        "status": "completed",
        "method": run.method.name,
        "method_resolved": run.method.resolved,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "epochs": epochs,
        "best": progress.best,
        "last": epochs[-1],
        "stopped_early": progress.stopped_early,
        "resumes": progress.resumes,
        "files": files,
        "measurements": measurements,
        **delta_info,
        **_reports(progress, evaluation_key(progress.best), evaluation_key(epochs[-1])),
        **_generations(progress, evaluation_key(progress.best), evaluation_key(epochs[-1])),
        **info,
        "environment": environment_info(),
    }


def _reports(progress: Progress, best_key: str, last_key: str) -> dict:
    """The per-class reports (tagging: per entity type) of the best and the last epoch, if the task has them."""
    reports = progress.reports
    if best_key not in reports:
        return {}
    return {"reports": {"best": reports[best_key], "last": reports.get(last_key)}}


def _generations(progress: Progress, best_key: str, last_key: str) -> dict:
    """The generations kept (``trainer.generation.keep_examples`` per split) of the pre-trained model,
    the best epoch and the last, if the run generated."""
    kept = progress.generations
    baseline = (progress.baseline or {}).get("generations")
    out = {name: kept[key] for name, key in (("best", best_key), ("last", last_key)) if key in kept}
    if baseline:
        out["baseline"] = baseline
    return {"generations": out} if out else {}


def log_model(run_dir: Path, record: dict, tracker: Tracker) -> None:
    """With ``logger.log_model=true`` and a W&B run: the run as a model artifact, with the PEFT adapter
    exported into ``<run dir>/peft_adapter`` for LoRA and DoRA. An adapter that cannot be exported
    (e.g. peft is not installed) is one line on stderr: the state is still worth logging."""
    if not tracker.wants_model(record):
        return
    adapter_dir = None
    if record.get("method") in EXPORTABLE:
        try:
            adapter_dir = export_run(run_dir, run_dir / ADAPTER_DIR, force=True, check=False).out_dir
        except Exception as error:  # noqa: BLE001 - whatever failed, the artifact goes without the adapter
            print(f"lora-lab: the model artifact goes without a PEFT adapter ({type(error).__name__}: "
                  f"{first_line(error)})", file=sys.stderr, flush=True)
    tracker.log_model(run_dir, record, adapter_dir)


def _log_summary(record: dict, tracker: Tracker) -> None:
    best, last, monitor = record["best"], record["last"], record["task"]["main_metric"]
    # the main metric, whatever the task, as a number to maximise (sweeps maximise it): negated for a
    # metric that is better lower, so the objective of a perplexity of 12 is -12
    tracker.summary({**{f"best/{k}": v for k, v in best.items()}, **{f"last/{k}": v for k, v in last.items()},
                     **{f"measure/{k}": v for k, v in record["measurements"].items()},
                     "objective": objective(monitor, best[f"validation/{monitor}"])})
    if "reports" in record:
        columns, rows = report_rows(record["reports"]["best"])
        tracker.log_table("best/report", columns, rows)
    if "generations" in record:
        columns, rows = generation_rows(record["generations"])
        tracker.log_table("best/generations", columns, rows)


def generation_rows(generations: dict) -> tuple[list[str], list[list]]:
    """The kept generations as table rows (model, split, prompt, references, generation), for W&B."""
    rows = [[model, split, g["prompt"], "\n".join(g["references"]), g["generation"]]
            for model in ("baseline", "best") for split, examples in (generations.get(model) or {}).items()
            for g in examples]
    return ["model", "split", "prompt", "references", "generation"], rows


def report_rows(report: dict) -> tuple[list[str], list[list]]:
    """A report as table rows (split, class, precision, recall, F1, support), for W&B."""
    rows = [[split, name, r["precision"], r["recall"], r["f1"], r["support"]]
            for split, classes in report.items() for name, r in classes.items()]
    return ["split", "class", "precision", "recall", "f1", "support"], rows


def _inference_latency(run: Run) -> dict:
    """Forward latency of one training-size batch; for methods that merge, unmerged vs merged,
    interleaved round by round."""
    model, method, tcfg = run.model, run.method, run.cfg.trainer
    batch = to_device(next(iter(run.evaluation.loaders["validation"])), run.device)
    inputs = {k: v[: tcfg.batch_size] for k, v in batch.items() if k != "labels"}
    model.eval()
    enter = ({"unmerged": lambda: method.undo_inference(model), "merged": lambda: method.prepare_inference(model)}
             if method.supports_merge else {"model": lambda: None})
    with torch.no_grad(), run.amp(), run.phases.phase("measuring inference latency"):
        times = round_robin({name: (lambda k: model(**inputs)) for name in enter}, int(tcfg.latency_repeats),
                            warmup=1, device=run.device, enter=enter)
    method.undo_inference(model)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    if not method.supports_merge:
        return {"inference_ms": ms["model"]}
    return {"inference_ms": ms["merged"], "inference_unmerged_ms": ms["unmerged"], "inference_merged_ms": ms["merged"],
            "merged_over_unmerged": ms["merged"] / ms["unmerged"]}
