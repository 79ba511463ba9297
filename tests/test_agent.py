"""lora-lab-agent: W&B sweep trials run in one process through the same app as lora-lab. The W&B
server is replaced by a stand-in for ``wandb.agent`` that hands out trials; the runs themselves are
real (offline) W&B runs."""
import math

import pytest
import torch
import wandb
from omegaconf import OmegaConf

from lora_lab.cli import agent
from lora_lab.runtime import records

FIXED = ["experiment=smoke", "method=lora", "trainer.threads=1"]


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_trial_parameters_become_hydra_overrides():
    params = {"trainer.lr": 0.001, "method.r": 4, "method.targets": ["q", "v"], "method.rslora": True,
              "method.budget": None, "_wandb": {"x": 1}}
    assert agent.trial_overrides(params) == ["trainer.lr=0.001", "method.r=4", "method.targets=[q,v]",
                                             "method.rslora=true", "method.budget=null"]


def test_a_trial_trains_and_records_like_lora_lab(tmp_path):
    run_dir = tmp_path / "trial"
    value = agent.run_trial({"method.r": 2, "seed": 1}, [*FIXED, f"hydra.run.dir={run_dir}",
                                                          f"data.cache_dir={tmp_path / 'cache'}"])
    record = records.load_record(run_dir)
    assert value == record["best"]["validation/accuracy"]
    assert record["config"]["method"]["r"] == 2 and record["config"]["seed"] == 1
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.method.r == 2 and "hydra" not in saved
    assert "method.r=2" in list(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))


def test_a_bad_trial_is_recorded_as_failed_and_returns_nan(tmp_path, capsys):
    run_dir = tmp_path / "bad"
    value = agent.run_trial({"method.r": 0}, [*FIXED, f"hydra.run.dir={run_dir}"])
    assert math.isnan(value)
    assert records.load_record(run_dir, require_completed=False)["status"] == "failed"
    assert "method.r=0: must be a positive integer" in capsys.readouterr().err
    assert math.isnan(agent.run_trial({"method.rr": 1}, FIXED))  # an unknown key: Hydra's message
    assert "method.rr" in capsys.readouterr().err


def test_the_agent_runs_every_trial_in_this_process_and_logs_into_its_runs(tmp_path, monkeypatch):
    trials = [{"method.r": 1, "trainer.lr": 0.002}, {"method.r": 4, "trainer.lr": 0.001}]
    runs, summaries, seen = [], [], {}
    real_init = wandb.init

    def start_trial(params):
        run = real_init(mode="offline", config=params, dir=str(tmp_path), reinit="finish_previous")
        finish = run.finish

        def keep_summary_and_finish(*args, **kwargs):
            summaries.append(dict(run.summary))
            return finish(*args, **kwargs)

        run.finish = keep_summary_and_finish
        runs.append(run)
        return run

    def fake_agent(sweep_id, function, count=None, project=None, entity=None):
        seen.update(sweep_id=sweep_id, count=count, project=project)
        for params in trials[:count]:
            monkeypatch.setattr(wandb, "init", lambda params=params: start_trial(params))
            function()

    monkeypatch.setattr(wandb, "agent", fake_agent)
    monkeypatch.chdir(tmp_path)
    rc = agent.main(["me/lora_lab/abc123", "--count", "2", "--project", "lora_lab", "--",
                     *FIXED, f"data.cache_dir={tmp_path / 'cache'}", "hydra.run.dir=trial_r${method.r}"])
    assert rc == 0 and seen == {"sweep_id": "me/lora_lab/abc123", "count": 2, "project": "lora_lab"}
    assert len(runs) == len(summaries) == 2
    for params, run, summary in zip(trials, runs, summaries):
        record = records.load_record(tmp_path / f"trial_r{params['method.r']}")
        assert record["config"]["trainer"]["lr"] == params["trainer.lr"]
        assert run.config["method.r"] == params["method.r"]  # the trial's own keys stay
        assert run.config["method"]["r"] == params["method.r"]  # the resolved config is added
        assert run.name.startswith(f"lora-r{params['method.r']}-s0")
        assert summary["best/validation/accuracy"] == record["best"]["validation/accuracy"]
        assert summary["objective"] == record["best"]["validation/accuracy"]  # what the sweep file maximises
        assert summary["task/main_metric"] == "accuracy" and summary["baseline/accuracy"] > 0


def test_bad_agent_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        agent.main(["abc", "--count", "0"])
    assert exit_info.value.code == 2 and "--count=0: must be a positive number" in capsys.readouterr().err
