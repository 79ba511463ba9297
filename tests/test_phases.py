"""The status of each phase between training steps (lora_lab.runtime.phases)."""
import pytest
from conftest import compose_config

from lora_lab.runtime import phases
from lora_lab.runtime.phases import Phases, bars_shown
from lora_lab.trainer.train import run_training


def test_a_phase_over_the_threshold_ends_with_one_line_and_a_short_one_with_none(capsys, monkeypatch):
    ticks = iter([0.0, 2.5, 10.0, 10.2])
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(ticks))
    quiet = Phases(progress_bar=False)
    with quiet.phase("loading the model"):
        pass
    with quiet.phase("evaluating on test"):
        pass
    out, err = capsys.readouterr()
    assert out == "[lora_lab] loading the model: 2.5 s\n" and err == ""


def test_a_live_status_is_wiped_and_an_inactive_rank_says_nothing(capsys, monkeypatch):
    monkeypatch.setattr(phases, "MIN_SECONDS", 0.0)
    with Phases(progress_bar=True).phase("loading data"):
        assert capsys.readouterr().err == "[lora_lab] loading data ..."  # on stderr while it runs
    out, err = capsys.readouterr()
    assert err.startswith("\r") and err.strip() == "" and out.startswith("[lora_lab] loading data: ")
    with Phases(progress_bar=True, active=False).phase("loading data"):
        pass
    assert capsys.readouterr() == ("", "")
    with Phases(progress_bar=False, prefix="[lora-lab-table]", to_stderr=True).phase("bootstrapping"):
        pass
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("[lora-lab-table] bootstrapping: ")


def test_a_phase_that_raises_adds_no_line(capsys, monkeypatch):
    monkeypatch.setattr(phases, "MIN_SECONDS", 0.0)
    with pytest.raises(RuntimeError), Phases(progress_bar=False).phase("loading the model"):
        raise RuntimeError("no such model")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("setting,tty,shown", [(True, False, True), (False, True, False), ("auto", True, True),
                                               ("auto", False, False)])
def test_progress_bar_setting(monkeypatch, setting, tty, shown):
    monkeypatch.setattr(phases.sys.stderr, "isatty", lambda: tty, raising=False)
    assert bars_shown(setting) is shown


def test_a_run_reports_each_phase(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(phases, "MIN_SECONDS", 0.0)  # every phase, however short
    cfg = compose_config("experiment=smoke", "logger=disabled", f"data.cache_dir={tmp_path / 'cache'}",
                         "trainer.progress_bar=false", "method=lora")
    run_training(cfg, tmp_path / "run")
    names = [line.split(": ")[0].removeprefix("[lora_lab] ") for line in capsys.readouterr().out.splitlines()
             if line.endswith(" s") and line.startswith("[lora_lab] ") and ": " in line]
    assert names == ["loading the tokenizer and data", "loading the model", "evaluating on validation",
                     "evaluating on test", "measuring inference latency"]
