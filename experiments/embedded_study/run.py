"""The converged embedded study (conf/experiment/embedded_study.yaml): pilot, learning-rate choice, seeds, table.

    python experiments/embedded_study/run.py outputs/embedded_study/latest
    python experiments/embedded_study/run.py outputs/embedded_study/latest --tiers core   # the first tier only
    python experiments/embedded_study/run.py outputs/embedded_study/latest --report-only  # tables from what is done

For each tier of arms (the LoRA paper's families, then its prefix and prompt rows, then the PEFT arms):
1. pilot: seed 0 at the three rates of each arm's study grid (one ``lora-lab`` multirun, 2 jobs at once);
2. choice: per task and arm, the rate whose pilot run has the best validation main metric (a tie goes to
   the lower rate); written to ``chosen.json`` in the sweep folder;
3. seeds: seeds 1 and 2 at the chosen rate (one multirun, the choice passed as ``study.chosen``).
Then the chosen runs (3 seeds each) are copied to experiments/embedded_study/records/ and the pilot's runs
to experiments/embedded_study/pilot/records/ (record.json and the per-example test results), and the
tables and plots are built from them. The same command resumes: completed jobs are skipped, an
interrupted one continues from its last checkpoint; on another machine the committed runs are put into the
sweep folder first, so only what is missing runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIERS = {
    "core": ["full", "top2", "dora", "houlsby", "adapter_lin", "pfeiffer", "adapter_drop", "bitfit", "ia3", "head",
             "lora_r1", "lora_r2", "lora_r4", "lora_r8", "lora_r64"],
    "paper": ["prefix", "prompt"],  # the LoRA paper's PreLayer and PreEmbed rows
    "peft": ["oft", "vera", "loha", "lokr", "adalora", "prompt_tuning", "ln_tuning"],
}
TASKS = ["rotten_tomatoes", "trec6"]
KEPT_FILES = ("record.json", "predictions.safetensors")
# the trained state is kept too for the runs the converged subspace analysis reads (experiments/subspace_converged)
KEPT_STATES = ("rotten_tomatoes_lora_r2_", "rotten_tomatoes_lora_r8_", "rotten_tomatoes_lora_r64_",
               "rotten_tomatoes_dora_")


def lora_lab(sweep_dir: Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "lora_lab", "--multirun", "experiment=embedded_study", "launcher=joblib", "logger=disabled",
               "trainer.progress_bar=false", f"hydra.sweep.dir={sweep_dir}", *overrides]
    print("[study]", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def completed_records(sweep_dir: Path) -> list[dict]:
    records = []
    for path in sorted(sweep_dir.glob("*/record.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "completed":
            records.append({**record, "_dir": path.parent})
    return records


def job_of(record: dict) -> tuple[str, str, float, int]:
    """(task, arm, lr, seed) of a study job, from its folder name ``<task>_<arm>_lr<lr>_s<seed>``."""
    name = record["_dir"].name
    task = next(t for t in TASKS if name.startswith(t + "_"))
    arm, rest = name[len(task) + 1:].rsplit("_lr", 1)
    lr, seed = rest.rsplit("_s", 1)
    return task, arm, float(lr), int(seed)


def choose(sweep_dir: Path, arms: list[str], grids: dict[str, list[float]]) -> dict[str, dict[str, int]]:
    """Per task and arm, the grid step whose seed-0 run has the best validation main metric."""
    scores: dict[tuple[str, str], dict[float, float]] = {}
    for record in completed_records(sweep_dir):
        task, arm, lr, seed = job_of(record)
        if seed == 0 and arm in arms:
            scores.setdefault((task, arm), {})[lr] = record["best"][f"validation/{record['task']['main_metric']}"]
    chosen: dict[str, dict[str, int]] = {}
    for task in TASKS:
        for arm in arms:
            by_lr = scores.get((task, arm), {})
            missing = [lr for lr in grids[arm] if lr not in by_lr]
            if missing:
                raise SystemExit(f"study: the pilot of {arm} on {task} has no completed run at lr {missing}")
            best = max(sorted(by_lr), key=lambda lr: (by_lr[lr], -lr))
            chosen.setdefault(task, {})[arm] = grids[arm].index(best)
    return chosen


def study_grids() -> dict[str, list[float]]:
    import yaml

    config = yaml.safe_load((HERE.parents[1] / "conf" / "experiment" / "embedded_study.yaml").read_text())
    return {arm: [float(lr) for lr in grid] for arm, grid in config["study"]["lr_grids"].items()}


def run_tier(sweep_dir: Path, arms: list[str], grids: dict[str, list[float]]) -> dict[str, dict[str, int]]:
    lora_lab(sweep_dir, f"arm={','.join(arms)}")
    chosen = choose(sweep_dir, arms, grids)
    path = sweep_dir / "chosen.json"
    everything = json.loads(path.read_text()) if path.exists() else {}
    for task, by_arm in chosen.items():
        everything.setdefault(task, {}).update(by_arm)
    path.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")
    as_override = "{" + ",".join(f"{task}:{{{','.join(f'{a}:{s}' for a, s in by_arm.items())}}}"
                                 for task, by_arm in chosen.items()) + "}"
    lora_lab(sweep_dir, f"arm={','.join(arms)}", "seed=1,2", "lr_step=${study.chosen_step}",
             f"+study.chosen={as_override}")
    return everything


def copy_runs(records: list[dict], into: Path, states: bool = False) -> None:
    if into.exists():
        shutil.rmtree(into)
    for record in records:
        target = into / record["_dir"].name
        target.mkdir(parents=True)
        names = KEPT_FILES + (("trainable.safetensors",) if states and target.name.startswith(KEPT_STATES) else ())
        for name in names:
            if (record["_dir"] / name).exists():
                shutil.copy2(record["_dir"] / name, target / name)


def resume_from_committed(sweep_dir: Path) -> None:
    """Put the committed runs (records/, pilot/records/) and the pilot's choice into a new sweep folder, so a
    study continued on another machine skips what is done: a job whose folder holds a completed record of
    its config is not run again."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for kept in (HERE / "records", HERE / "pilot" / "records"):
        for run in sorted(kept.glob("*/")) if kept.exists() else []:
            if not (sweep_dir / run.name).exists():
                shutil.copytree(run, sweep_dir / run.name)
    if (HERE / "pilot" / "chosen.json").exists() and not (sweep_dir / "chosen.json").exists():
        shutil.copy2(HERE / "pilot" / "chosen.json", sweep_dir / "chosen.json")


def report(sweep_dir: Path, grids: dict[str, list[float]]) -> None:
    chosen = json.loads((sweep_dir / "chosen.json").read_text())
    final, pilot = [], []
    for record in completed_records(sweep_dir):
        task, arm, lr, seed = job_of(record)
        if seed == 0:
            pilot.append(record)
        if arm in chosen.get(task, {}) and lr == grids[arm][chosen[task][arm]]:
            final.append(record)
    copy_runs(final, HERE / "records", states=True)
    copy_runs(pilot, HERE / "pilot" / "records")  # seed 0 at every rate, the chosen one included
    shutil.copy2(sweep_dir / "chosen.json", HERE / "pilot" / "chosen.json")
    table = [sys.executable, "-m", "lora_lab.analysis.tables"]
    subprocess.run([*table, str(HERE / "records"), "--plot", "--out", str(HERE), "--name", "study"], check=True)
    subprocess.run([*table, str(HERE / "pilot" / "records"), "--tune", "trainer.lr", "--out", str(HERE / "pilot"),
                    "--name", "pilot"], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="study", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--tiers", default=",".join(TIERS), help="comma-separated, of: " + ", ".join(TIERS))
    parser.add_argument("--report-only", action="store_true", help="only copy the completed runs and build the tables")
    args = parser.parse_args(argv)
    grids = study_grids()
    resume_from_committed(args.sweep_dir.resolve())
    if not args.report_only:
        for tier in args.tiers.split(","):
            run_tier(args.sweep_dir.resolve(), TIERS[tier], grids)
            report(args.sweep_dir.resolve(), grids)
    report(args.sweep_dir.resolve(), grids)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
