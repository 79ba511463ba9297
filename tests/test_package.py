"""lora_lab as an installed package: the wheel carries the configs and the analysis tools inside
lora_lab, runs from any directory, and adds no top-level ``analysis`` or ``conf`` package; users'
config folders join through Hydra's search path; the trainer does not import the analysis code."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["experiment=smoke", "trainer.threads=1"]


def run(args, cwd, env_extra=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """The built wheel, unpacked: what `pip install .` puts into site-packages."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = run(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(ROOT)],
                cwd=tmp)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("lora_lab-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp / "site")
        names = z.namelist()
    return tmp / "site", names


def test_the_wheel_holds_configs_and_analysis_inside_lora_lab(wheel_site):
    _, names = wheel_site
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lora_lab"}
    for path in ("lora_lab/conf/train.yaml", "lora_lab/conf/bench.yaml", "lora_lab/conf/method/lora.yaml",
                 "lora_lab/conf/arm/lora_r8.yaml", "lora_lab/conf/experiment/smoke.yaml",
                 "lora_lab/analysis/tables.py", "lora_lab/analysis/subspace_report.py", "lora_lab/methods/base.py"):
        assert path in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(next((wheel_site[0].parent / "dist").glob("*.whl"))) as z:
        scripts = z.read(entry_points).decode()
    for script in ("lora-lab =", "lora-lab-agent =", "lora-lab-bench =", "lora-lab-table =", "lora-lab-subspace ="):
        assert script in scripts


def test_the_installed_package_trains_from_any_directory(wheel_site, tmp_path):
    site, _ = wheel_site
    env = {"PYTHONPATH": str(site)}
    where = run(["-c", "import lora_lab, lora_lab.conf, lora_lab.analysis.tables; print(lora_lab.__file__)"],
                cwd=tmp_path, env_extra=env)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(site)), where.stderr
    assert run(["-c", "import analysis"], cwd=tmp_path, env_extra=env).returncode != 0
    proc = run(["-m", "lora_lab.cli.main", *SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "hydra.run.dir=run"],
               cwd=tmp_path, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"status": "completed"' in (tmp_path / "run" / "record.json").read_text()


def test_a_users_config_folder_joins_through_the_search_path(tmp_path, warm_cli):
    conf = tmp_path / "my_conf"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "lora_qkvo.yaml").write_text("defaults:\n  - lora\n  - _self_\ntargets: [q, k, v, o]\nr: 2\n")
    # the search path is Hydra's, not the interpreter's: the command forked from a warm interpreter
    proc = warm_cli.run([*SMOKE, f"hydra.searchpath=[file://{conf}]", "method=lora_qkvo",
                         f"data.cache_dir={tmp_path / 'cache'}", "hydra.run.dir=run"], cwd=tmp_path,
                        env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = (tmp_path / "run" / "record.json").read_text()
    assert '"targets": [\n        "q",\n        "k",\n        "v",\n        "o"\n      ]' in record
    assert "lora: 2,146 trainable" in proc.stdout  # 2 layers x 4 matrices x r=2 x (32 + 32), + head 1,122


def test_the_trainer_imports_no_analysis_code():
    proc = run(["-c", "import sys, lora_lab.cli.main, lora_lab.trainer.train, lora_lab.runtime.measure; "
                      "print(sorted(m for m in sys.modules if m.startswith('lora_lab.analysis')))"], cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
