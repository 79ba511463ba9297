"""Sweep presets, launchers and the W&B sweep file: each composes into the grid it promises."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import CONF, compose_config, tiny_bert
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from test_train import SMOKE, cli

from lora_lab.methods import build_method
from lora_lab.methods.lora import rank_for_budget

ROOT = Path(__file__).resolve().parent.parent


def hydra_view(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def expand(*overrides: str) -> list[list[str]]:
    """The jobs Hydra's basic sweeper would launch for a preset (+ command-line overrides)."""
    cfg = hydra_view(*overrides)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose_job(preset: list[str], job: list[str]):
    return compose_config(*[o for o in preset if not o.startswith("hydra.")], *job)


def test_rank_sweep_grid():
    jobs = expand("sweep=rank")
    configs = [compose_job(["sweep=rank"], job) for job in jobs]
    assert sorted({(c.method.r, c.seed) for c in configs}) == [(r, s) for r in (1, 2, 4, 8, 64) for s in (0, 1, 2)]
    assert all(c.method.name == "lora" and c.method.alpha == 8 for c in configs)


def test_alpha_sweep_covers_fixed_alpha_alpha_eq_r_and_rslora():
    configs = [compose_job(["sweep=alpha"], job) for job in expand("sweep=alpha")]
    assert len(configs) == 4 * 3 * 3
    scales = {}
    for c in configs:
        method = build_method(c.method)
        assert method.cfg.r in (2, 8, 32, 64)
        scale = c.method.alpha / (c.method.r ** 0.5 if c.method.rslora else c.method.r)
        scales.setdefault((c.method.r, c.method.rslora, c.method.alpha == c.method.r), set()).add(scale)
    assert {scale for (r, rs, eq), s in scales.items() if eq and not rs for scale in s} == {1.0}  # alpha = r
    assert scales[(64, False, False)] == {8 / 64}                                            # alpha fixed
    assert scales[(64, True, False)] == {8 / 8}                                              # rsLoRA: 8/sqrt(64)


def test_targets_sweep_lists_target_sets():
    configs = [compose_job(["sweep=targets"], job) for job in expand("sweep=targets")]
    sets = {tuple(c.method.targets) for c in configs}
    assert ("q",) in sets and ("q", "k", "v", "o") in sets and ("ffn_in", "ffn_out") in sets
    assert len(configs) == len(sets) * 3


def test_budget_sweep_gives_equal_parameter_counts_within_one_rank_step():
    counts = {}
    for job in expand("sweep=budget"):
        cfg = compose_job(["sweep=budget"], job)
        if cfg.seed != 0:
            continue
        model = tiny_bert(layers=2, hidden=32)  # intermediate 64: FFN matrices are 32x64 and 64x32
        method = build_method(cfg.method)
        method.apply(model)
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert lora == method.resolved["lora_parameters"]
        step = lora // method.resolved["r"]
        counts[tuple(cfg.method.targets)] = (lora, step)
    budget = compose_config("sweep=budget").method.budget
    assert len(counts) == 8
    for targets, (lora, step) in counts.items():
        assert abs(lora - budget) <= step, (targets, lora, budget, step)
    # with square attention matrices the budget is met exactly by the paper's ranks 8 / 4 / 2
    assert rank_for_budget(36864, [(384, 384)] * 6) == 8
    assert rank_for_budget(36864, [(384, 384)] * 12) == 4
    assert rank_for_budget(36864, [(384, 384)] * 24) == 2


def test_fair_sweep_gives_every_arm_its_own_lr_range_and_the_same_seeds():
    configs = [compose_job(["sweep=fair"], job) for job in expand("sweep=fair")]
    by_method: dict = {}
    for c in configs:
        key = (c.method.name, c.method.get("variant"), c.method.get("r"))
        by_method.setdefault(key, set()).add((c.trainer.lr, c.seed))
    assert len(by_method) == 4 and all(len(g) == 4 * 3 for g in by_method.values())
    lrs = {key[0]: sorted({lr for lr, _ in g}) for key, g in by_method.items()}
    assert lrs["full"] == [3e-5, 1e-4, 3e-4, 1e-3]
    assert lrs["head"] == [1e-3, 3e-3, 1e-2, 3e-2]  # a linear head wants far higher rates
    assert lrs["lora"] == [3e-4, 1e-3, 3e-3, 1e-2] and lrs["adapter"] == [1e-4, 3e-4, 1e-3, 3e-3]
    assert all({s for _, s in g} == {0, 1, 2} for g in by_method.values())


def test_every_method_declares_a_four_point_lr_grid_around_its_default():
    from conftest import CONF, method_cfg

    for path in sorted((CONF / "method").glob("*.yaml")):
        cfg = method_cfg(path.stem)
        grid = list(cfg.lr_grid)
        assert len(grid) == 4 and grid == sorted(grid), path.stem
        assert grid[0] <= cfg.lr <= grid[-1], path.stem


def test_an_lr_step_outside_the_grid_is_one_line():
    from omegaconf.errors import InterpolationResolutionError

    cfg = compose_job(["sweep=fair"], ["arm=head", "lr_step=4", "seed=0"])
    with pytest.raises(InterpolationResolutionError, match=r"lr_step=4: must be an index into the grid") as error:
        cfg.trainer.lr
    from lora_lab.cli.main import hydra_error_line

    assert hydra_error_line(error.value).startswith("lr_step=4: must be an index into the grid [0.001, 0.003,")


def test_embedded_study_quick_grid():
    jobs = expand("experiment=embedded_study_quick")
    assert len(jobs) == 2 * 10 * 3 * 3 and {j[-1] for j in jobs} == {"seed=0", "seed=1", "seed=2"}
    configs = [compose_job(["experiment=embedded_study_quick"], job) for job in jobs if job[-1] == "seed=0"]
    assert {c.data.name for c in configs} == {"rotten_tomatoes", "trec6"}
    configs = [c for c in configs if c.data.name == "trec6"]
    assert len({(c.method.name, c.method.get("variant"), c.method.get("top_layers"), c.method.get("r"),
                 c.trainer.lr) for c in configs}) == 10 * 3
    ranks = sorted({c.method.r for c in configs if c.method.name == "lora"})
    assert ranks == [1, 2, 4, 8, 64]
    assert {c.method.get("top_layers") for c in configs if c.method.name == "head"} == {0, 2}
    assert {c.method.variant for c in configs if c.method.name == "adapter"} == {"houlsby", "pfeiffer"}
    head = sorted(c.trainer.lr for c in configs if c.method.name == "head" and not c.method.top_layers)
    assert head == [3e-3, 1e-2, 3e-2]


def test_paper_table2_uses_table9_settings():
    configs = {c.data.subset: c for c in (compose_job(["experiment=paper_table2"], j)
                                          for j in expand("experiment=paper_table2")
                                          if "arm=paper/t2_lora" in j and "seed=0" in j)}  # the LoRA row
    assert sorted(configs) == sorted(["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"])
    order = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]
    assert [configs[t].trainer.batch_size for t in order] == [16, 16, 16, 32, 32, 16, 32, 16]
    assert [configs[t].trainer.epochs for t in order] == [30, 60, 30, 80, 25, 25, 80, 40]
    assert [configs[t].trainer.lr for t in order] == [5e-4, 5e-4, 4e-4, 4e-4, 4e-4, 5e-4, 5e-4, 4e-4]
    for c in configs.values():
        assert c.model.name == "FacebookAI/roberta-base" and c.method.r == 8 and c.method.alpha == 8
        assert list(c.method.targets) == ["q", "v"] and c.data.max_length == 512
    assert configs["cola"].data.main_metric == "mcc"
    assert configs["stsb"].data.task_type == "regression" and configs["stsb"].data.main_metric == "pearson"


def test_launcher_configs_select_the_plugins():
    assert "JoblibLauncher" in hydra_view("launcher=joblib").hydra.launcher._target_
    slurm = hydra_view("launcher=slurm", "hydra.sweep.dir=/tmp/x").hydra.launcher
    assert "SlurmLauncher" in slurm._target_ and slurm.gpus_per_node == 1
    assert "BasicLauncher" in hydra_view("launcher=basic").hydra.launcher._target_
    optuna = hydra_view("sweep=optuna").hydra.sweeper
    assert "OptunaSweeper" in optuna._target_ and optuna.direction == "maximize"
    assert set(optuna.params) == {"trainer.lr", "method.r", "method.alpha"}


def test_wandb_sweep_file_drives_the_hydra_app():
    sweep = yaml.safe_load((ROOT / "experiments" / "wandb_sweep" / "sweep.yaml").read_text())
    assert "${args_no_hyphens}" in sweep["command"] and "lora_lab.cli.main" in sweep["command"]
    assert sweep["metric"]["name"] == "objective" and sweep["metric"]["goal"] == "maximize"
    overrides = []
    for key, spec in sweep["parameters"].items():
        value = spec.get("value", (spec.get("values") or [spec.get("min")])[0])
        overrides.append(f"{key}={value}")
    cfg = compose_config("method=lora", *overrides)  # every swept key exists in the config
    for override in overrides:
        key, value = override.split("=", 1)
        assert str(OmegaConf.select(cfg, key)).replace(" ", "").replace("'", "") == value.replace(" ", "")


def test_dry_run_composes_and_validates_every_job_without_loading(tmp_path, warm_cli):
    out = cli("experiment=paper_table6", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}",
              "logger=disabled", cwd=tmp_path, warm=warm_cli)
    assert out.returncode == 0, out.stderr
    plans = [line for line in out.stdout.splitlines() if line.startswith("[dry run]")]
    assert len(plans) == 45 and all("FacebookAI/roberta-base" in p and "mnli" in p for p in plans)
    assert not (tmp_path / "sweep").exists()  # a dry run writes no job folders, nor the sweep's
    bad = cli("experiment=paper_table6", "dry_run=true", "method.alpha=0", "seed=0", "method.r=8",
              f"hydra.sweep.dir={tmp_path / 'b'}", "logger=disabled", cwd=tmp_path, warm=warm_cli)
    assert bad.returncode == 0 and bad.stderr.count("method.alpha=0: must be > 0") == 3  # 3 target sets


def test_joblib_launcher_runs_a_small_real_multirun(tmp_path, warm_cli):
    sweep = tmp_path / "sweep"
    out = cli("-m", *SMOKE, "launcher=joblib", f"data.cache_dir={tmp_path}", f"hydra.sweep.dir={sweep}",
              "arm=head,lora_r1", cwd=tmp_path, warm=warm_cli)
    assert out.returncode == 0, out.stderr
    done = [json.loads(p.read_text()) for p in sweep.rglob("record.json")]
    assert sorted(r["method"] for r in done) == ["head", "lora"]
    assert all(r["status"] == "completed" and r["config"]["trainer"]["threads"] == 1 for r in done)


def test_submitit_runs_the_app_in_job_processes(tmp_path, warm_cli):
    """SLURM jobs go through submitit; its local executor pickles and runs the app the same way."""
    sweep = tmp_path / "sweep"
    out = cli("-m", *SMOKE, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
              "hydra.launcher.gpus_per_node=0", f"data.cache_dir={tmp_path}", f"hydra.sweep.dir={sweep}",
              "method.r=2,4", cwd=tmp_path, warm=warm_cli)
    assert out.returncode == 0, out.stderr
    done = sorted(json.loads(p.read_text())["config"]["method"]["r"] for p in sweep.rglob("record.json"))
    assert done == [2, 4] and list(sweep.glob(".submitit/*"))


def test_optuna_maximises_the_metric_the_app_returns(tmp_path, warm_cli):
    sweep = tmp_path / "sweep"
    out = cli(*SMOKE, "sweep=optuna", "hydra.sweeper.n_trials=3", f"data.cache_dir={tmp_path}",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path, warm=warm_cli)
    assert out.returncode == 0, out.stderr
    returned = [json.loads(p.read_text())["best"]["validation/accuracy"] for p in sweep.rglob("record.json")]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert len(returned) == 3 and result["best_value"] == max(returned)
    assert set(result["best_params"]) == {"trainer.lr", "method.r", "method.alpha"}


def study_job(*overrides: str):
    """A job of the embedded study as its run sees it (the lr resolves through hydra:runtime.choices)."""
    from hydra.core.hydra_config import HydraConfig

    cfg = hydra_view("experiment=embedded_study", *overrides)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_embedded_study_pilot_grid_and_the_seeds_stage():
    jobs = expand("experiment=embedded_study")
    assert len(jobs) == 2 * 15 * 3 and {j[-1] for j in jobs} == {"seed=0"}
    grids = yaml.safe_load((CONF / "experiment" / "embedded_study.yaml").read_text())["study"]["lr_grids"]
    study = study_driver()
    arms = [a for tier in study.TIERS.values() for a in tier]
    assert set(arms) <= set(grids) and set(arms) <= {p.stem for p in (CONF / "arm").glob("*.yaml")}
    assert all(len(grids[a]) == 3 and sorted(map(float, grids[a])) == list(map(float, grids[a])) for a in arms)
    cfg = study_job("data=trec6", "arm=head", "lr_step=2")
    assert cfg.trainer.lr == pytest.approx(0.1) and cfg.data.max_train == 1000 and cfg.trainer.epochs == 2
    assert cfg.method.name == "head"
    # the seeds stage: the step the pilot chose for this task and arm
    chosen = "+study.chosen={trec6:{head:1,lora_r8:0},rotten_tomatoes:{head:2}}"
    cfg = study_job("data=trec6", "arm=lora_r8", "seed=2", "lr_step=${study.chosen_step}", chosen)
    assert cfg.trainer.lr == pytest.approx(1e-3) and cfg.method.r == 8 and cfg.seed == 2
    cfg = study_job("data=rotten_tomatoes", "arm=lora_r8", "lr_step=${study.chosen_step}", chosen)
    with pytest.raises(Exception, match="lr_step=None"):  # no choice for this task and arm: refused, not guessed
        cfg.trainer.lr


def study_driver():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_run", CONF.parent / "experiments" / "embedded_study" / "run.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_embedded_study_driver_chooses_each_arms_rate_on_validation(tmp_path):
    study = study_driver()
    grids = {"head": [1e-2, 3e-2, 1e-1], "full": [3e-5, 1e-4, 3e-4]}
    scores = {("trec6", "head"): [0.7, 0.8, 0.8], ("trec6", "full"): [0.9, 0.85, 0.5],
              ("rotten_tomatoes", "head"): [0.6, 0.5, 0.7], ("rotten_tomatoes", "full"): [0.8, 0.8, 0.8]}
    for (task, arm), values in scores.items():
        for lr, value in zip(grids[arm], values):
            for seed in (0, 1):  # seed 1 scores higher everywhere: only seed 0, the pilot, chooses
                folder = tmp_path / f"{task}_{arm}_lr{lr:g}_s{seed}"
                folder.mkdir()
                record = {"status": "completed", "task": {"main_metric": "accuracy"},
                          "best": {"validation/accuracy": value + seed * (1 - value) * (lr == grids[arm][0])}}
                (folder / "record.json").write_text(json.dumps(record))
    chosen = study.choose(tmp_path, ["head", "full"], grids)
    # ties go to the lower rate
    assert chosen == {"trec6": {"head": 1, "full": 0}, "rotten_tomatoes": {"head": 2, "full": 0}}
    with pytest.raises(SystemExit, match="lora_r8 on rotten_tomatoes has no completed run"):
        study.choose(tmp_path, ["lora_r8"], {"lora_r8": [1e-3, 3e-3, 1e-2]})
