"""Output directories are named by what changes results, so the same command finds its own runs."""
import os
import re
import subprocess
import sys

from lora_lab.config.compose import compose
from lora_lab.config.run_identity import differences, result_config


def run_dir(*overrides: str) -> str:
    return str(compose("train", ["experiment=smoke", *overrides], return_hydra_config=True).hydra.run.dir)


def test_run_directory_is_the_method_tag_seed_and_a_hash_of_the_result_config():
    first = run_dir("method.r=4", "seed=2")
    assert re.fullmatch(r"outputs/runs/lora-r4-s2-[0-9a-f]{8}", first)
    assert run_dir("method.r=4", "seed=2") == first
    # how a run is watched does not make it another run
    assert run_dir("method.r=4", "seed=2", "logger=disabled", "trainer.progress_bar=true",
                   "trainer.checkpoint_every=7", "data.cache_dir=/elsewhere", "trainer.keep_last=true") == first
    assert run_dir("method.r=4", "seed=2", "trainer.lr=0.01") != first
    assert run_dir("method.r=4", "seed=3") != first


def test_differences_name_each_changed_result_key_and_ignore_the_neutral_ones():
    a = {"seed": 0, "trainer": {"lr": 0.001, "log_every": 10}, "logger": {"mode": "auto"}, "hydra": {"x": 1}}
    b = {"seed": 1, "trainer": {"lr": 0.002, "log_every": 99}, "logger": {"mode": "offline"}, "extra": True}
    assert differences(a, b) == ["extra: '<absent>' -> True", "seed: 0 -> 1", "trainer.lr: 0.001 -> 0.002"]
    assert "logger" not in result_config(a) and "hydra" not in result_config(a)


def dry_sweep(tmp_path, *overrides, warm=None):
    """The jobs' directories a dry-run multirun prints: in a fresh interpreter, or forked by ``warm``
    (tests/warm_cli.py), whose children share one hash seed."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = ["-m", "experiment=smoke", "dry_run=true", *overrides]
    if warm is not None:
        out = warm.run(args, cwd=tmp_path, env=env)
    else:
        out = subprocess.run([sys.executable, "-m", "lora_lab.cli.main", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return re.findall(r"-> (\S+)", out.stdout)


def test_every_job_of_a_sweep_shares_one_directory_and_the_same_command_finds_it_again(tmp_path, warm_cli):
    # a fresh interpreter here, forked ones below: the names cannot depend on one interpreter's hash seed
    jobs = dry_sweep(tmp_path, "method.r=2,4", "seed=0,1")
    assert len(jobs) == 4 and len({os.path.dirname(j) for j in jobs}) == 1
    # each job's folder names the values it was given: number, method and rank, seed
    assert [os.path.basename(j) for j in jobs] == ["0_lora_r2_s0", "1_lora_r2_s1", "2_lora_r4_s0", "3_lora_r4_s1"]
    assert re.fullmatch(r".*/outputs/multirun/[0-9a-f]{8}/0_lora_r2_s0", jobs[0])
    assert not (tmp_path / "outputs" / "multirun").exists() or not any((tmp_path / "outputs" / "multirun").iterdir())
    again = dry_sweep(tmp_path, "method.r=2,4", "seed=0,1", "logger=disabled", warm=warm_cli)
    assert again == jobs
    other = dry_sweep(tmp_path, "method.r=2,8", "seed=0,1", warm=warm_cli)
    assert os.path.dirname(other[0]) != os.path.dirname(jobs[0])
    rates = dry_sweep(tmp_path, "trainer.lr=1e-3,3e-3", warm=warm_cli)  # LoRA's default lr is 1e-3
    assert [os.path.basename(j) for j in rates] == ["0_lora_r8_s0", "1_lora_r8_lr0.003_s0"]
    # any other swept setting shows its value (a config group by its choice); fixed settings do not
    swept = dry_sweep(tmp_path, "data=rotten_tomatoes,trec6", "data.max_train=100,200", "model.hidden_size=32",
                      warm=warm_cli)
    assert [os.path.basename(j) for j in swept] == [
        "0_lora_r8_rotten_tomatoes_max_train100_s0", "1_lora_r8_rotten_tomatoes_max_train200_s0",
        "2_lora_r8_trec6_max_train100_s0", "3_lora_r8_trec6_max_train200_s0"]
    lists = dry_sweep(tmp_path, "method.targets=[q,v],[q,k,v]", "method.r=4,8", warm=warm_cli)
    assert [os.path.basename(j) for j in lists] == ["0_lora_r4_targetsq+v_s0", "1_lora_r8_targetsq+v_s0",
                                                    "2_lora_r4_targetsq+k+v_s0", "3_lora_r8_targetsq+k+v_s0"]


def test_swept_keys_are_read_from_the_command_line():
    from lora_lab.config.run_identity import swept_keys

    argv = ["-m", "method.r=1,8", "seed=0", "data=trec6,sms_spam", "+x=range(3)", "--config-name", "train",
            "hydra.launcher.n_jobs=1,2", "trainer.lr=choice(1e-3,3e-3)"]
    assert swept_keys(argv) == ["method.r", "data", "x", "trainer.lr"]
