"""The Section 7 subspace analysis: maths, the report command and the benchmark (fast, no training)."""
from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_lab.analysis.subspace import (
    AnalysisOptions,
    RunDeltas,
    amplification_table,
    analyse_runs,
    dense_svd,
    effective_rank,
    expected_random_phi,
    factor_basis,
    factored_svd,
    match_modules,
    orthonormal_basis,
    phi_matrix,
    random_phi,
    split_module_name,
    subspace_similarity,
)
from lora_lab.analysis.subspace_report import DeltaFile
from lora_lab.analysis.subspace_report import main as report_main
from lora_lab.bench import subspace as bench_subspace
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW
from lora_lab.runtime.records import (
    DELTA_FILE,
    LAST_STATE_FILE,
    STATE_FILE,
    delta_shapes,
    load_delta_weights,
    save_delta_weights,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# phi
# ----------------------------------------------------------------------------------------------
def test_phi_is_one_for_identical_subspaces():
    A = randn(6, 40, g=gen())
    phi = subspace_similarity(A, A)
    assert phi.shape == (6, 6)
    # phi(i, j) for the same ordered basis: min(i, j) shared directions out of min(i, j).
    assert torch.allclose(phi, torch.ones_like(phi), atol=1e-12)


def test_phi_is_zero_for_orthogonal_subspaces():
    eye = torch.eye(20, dtype=torch.float64)
    phi = subspace_similarity(3.0 * eye[:4], eye[4:12])
    assert phi.shape == (4, 8)
    assert phi.abs().max() < 1e-12


def test_phi_is_symmetric():
    g = gen(1)
    A1, A2 = randn(5, 30, g=g), randn(9, 30, g=g)
    assert torch.allclose(subspace_similarity(A1, A2), subspace_similarity(A2, A1).T, atol=1e-12)


def test_phi_is_invariant_to_scaling_and_change_of_basis():
    g = gen(2)
    A1, A2 = randn(5, 30, g=g), randn(8, 30, g=g)
    phi = subspace_similarity(A1, A2)
    # Scaling keeps the singular vectors and their order: the whole matrix is unchanged.
    assert torch.allclose(subspace_similarity(7.5 * A1, 0.01 * A2), phi, atol=1e-10)
    # An orthogonal change of basis of A's rows keeps its right singular vectors too.
    Q, _ = torch.linalg.qr(randn(5, 5, g=g))
    assert torch.allclose(subspace_similarity(Q @ A1, A2), phi, atol=1e-10)
    # Any invertible M keeps the row space: phi between the whole subspaces is unchanged, and the
    # subspace of M A lies entirely in that of A.
    M = randn(5, 5, g=g) + 3 * torch.eye(5, dtype=torch.float64)
    assert torch.allclose(subspace_similarity(M @ A1, A2)[-1, -1], phi[-1, -1], atol=1e-10)
    assert torch.allclose(subspace_similarity(M @ A1, A1)[-1, -1], torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(subspace_similarity(M @ A1, A1)[:, -1], torch.ones(5, dtype=torch.float64))


def test_phi_left_side_uses_column_space():
    g = gen(3)
    B = randn(25, 4, g=g)
    U = orthonormal_basis(B, "left")
    assert U.shape == (25, 4)
    assert torch.allclose(U.T @ U, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(subspace_similarity(B, B @ randn(4, 4, g=g), side="left")[-1, -1],
                          torch.tensor(1.0, dtype=torch.float64))


def test_random_baseline_matches_its_expectation():
    g = gen(4)
    d, k1, k2 = 64, 6, 10
    mean = torch.stack([random_phi(d, k1, k2, g) for _ in range(200)]).mean(0)
    expected = expected_random_phi(d, k1, k2)
    assert expected[0, 0] == pytest.approx(1 / d)
    assert expected[2, 4] == pytest.approx(3 * 5 / (d * 3))
    assert torch.allclose(mean, expected, atol=0.015)


def test_phi_matrix_checks_dimensions():
    with pytest.raises(ConfigError, match="same d"):
        phi_matrix(torch.eye(5)[:, :2], torch.eye(6)[:, :2])


# ----------------------------------------------------------------------------------------------
# SVDs and effective rank
# ----------------------------------------------------------------------------------------------
def test_factored_svd_matches_dense_svd():
    g = gen(5)
    B, A = randn(30, 5, g=g), randn(5, 25, g=g)
    M = B @ A
    fs = factored_svd(B, A)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(fs.S, S[:5], atol=1e-10 * S[0])
    assert torch.allclose(fs.U @ fs.U.T, U[:, :5] @ U[:, :5].T, atol=1e-10)
    assert torch.allclose(fs.Vh.T @ fs.Vh, Vh[:5].T @ Vh[:5], atol=1e-10)
    assert torch.allclose(fs.U @ torch.diag(fs.S) @ fs.Vh, M, atol=1e-10)
    assert fs.energy == pytest.approx(float((M ** 2).sum()))


def test_randomized_svd_finds_the_top_directions():
    g = gen(6)
    U, _ = torch.linalg.qr(randn(300, 300, g=g))
    V, _ = torch.linalg.qr(randn(300, 300, g=g))
    S = 0.8 ** torch.arange(300, dtype=torch.float64)
    M = (U * S) @ V.T
    top = dense_svd(M, k=5, method="randomized", niter=3, generator=g)
    assert torch.allclose(top.S, S[:5], rtol=1e-6)
    assert torch.allclose(top.U @ top.U.T, U[:, :5] @ U[:, :5].T, atol=1e-5)
    assert not top.complete and top.energy == pytest.approx(float((S ** 2).sum()))


def test_effective_rank():
    assert effective_rank(torch.tensor([3.0, 1.0])) == 1  # 9 / 10 = 0.9
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == 3  # 4/6, 5/6, 1
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0]), energy=0.8) == 2
    assert effective_rank(torch.zeros(4)) == 0
    # A truncated spectrum that does not reach the threshold of the true total energy.
    assert effective_rank(torch.tensor([1.0, 1.0]), total_energy=10.0) is None
    with pytest.raises(ConfigError):
        effective_rank(torch.ones(3), energy=1.5)


# ----------------------------------------------------------------------------------------------
# Table 7
# ----------------------------------------------------------------------------------------------
def test_amplification_on_a_hand_computed_example():
    W = torch.arange(1, 17, dtype=torch.float64).reshape(4, 4)
    e = torch.eye(4, dtype=torch.float64)
    # ΔW = 4 e1 e2^T + 1 e3 e4^T: U = [e1, e3], V = [e2, e4], so U^T W V = [[W12, W14], [W32, W34]].
    B = torch.stack([4 * e[0], e[2]], dim=1)
    A = torch.stack([e[1], e[3]], dim=0)
    (row,) = amplification_table(W, [factored_svd(B, A)], [2], generator=gen())
    proj = math.sqrt(2 ** 2 + 4 ** 2 + 10 ** 2 + 12 ** 2)
    assert row["proj_delta"] == pytest.approx(proj)
    assert row["delta_norm"] == pytest.approx(math.sqrt(17))
    assert row["amplification"] == pytest.approx(math.sqrt(17) / proj)
    assert row["w_norm"] == pytest.approx(math.sqrt(sum(i * i for i in range(1, 17))))
    assert row["proj_w"] == pytest.approx(float(torch.linalg.svdvals(W)[:2].norm()))
    assert row["proj_random"] == pytest.approx(2 * row["w_norm"] / 4)  # r ||W||_F / sqrt(out * in)
    assert row["proj_random_draw"] is None
    # Rank one: U = e3, V = e4 picks W34 alone.
    (one,) = amplification_table(W, [factored_svd(B, A)], [1], generator=gen())
    assert one["proj_delta"] == pytest.approx(2.0) and one["amplification"] == pytest.approx(math.sqrt(17) / 2)


def test_random_column_is_the_root_mean_square_of_random_draws():
    g = gen(10)
    W = randn(20, 16, g=g)
    svd = factored_svd(randn(20, 3, g=g), randn(3, 16, g=g))
    draws = [amplification_table(W, [svd], [3], w_row=False, random_draw=True, generator=g)[0] for _ in range(400)]
    mean_square = statistics.fmean(d["proj_random_draw"] ** 2 for d in draws)
    assert math.sqrt(mean_square) == pytest.approx(draws[0]["proj_random"], rel=0.05)


def test_amplification_shares_one_pass_over_w_between_runs():
    g = gen(7)
    W = randn(20, 16, g=g)
    s8, s2 = factored_svd(randn(20, 8, g=g), randn(8, 16, g=g)), factored_svd(randn(20, 2, g=g), randn(2, 16, g=g))
    both = amplification_table(W, [s8, s2], [8, 2], generator=gen(1))
    alone = amplification_table(W, [s2], [2], generator=gen(1))
    assert both[1]["proj_delta"] == pytest.approx(alone[0]["proj_delta"])
    assert both[0]["r"] == 8 and both[1]["r"] == 2


# ----------------------------------------------------------------------------------------------
# Module matching
# ----------------------------------------------------------------------------------------------
def test_split_module_name():
    assert split_module_name("bert.encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert split_module_name("model.layers.31.self_attn.v_proj") == (31, "self_attn.v_proj")
    assert split_module_name("classifier.dense") == (None, "classifier.dense")


def _run(label, shapes, factored=True):
    return RunDeltas(label, shapes, lambda name: None, {n: factored for n in shapes})


def test_match_modules_orders_and_rejects_bad_pairs():
    a = _run("a", {"x.layer.10.q": (4, 4), "x.layer.2.q": (4, 4), "x.layer.2.v": (4, 4)})
    b = _run("b", {"x.layer.10.q": (4, 4), "x.layer.2.q": (4, 4)})
    names, unmatched = match_modules([a, b])
    assert names == ["x.layer.2.q", "x.layer.10.q"] and unmatched == {"a": ["x.layer.2.v"]}
    with pytest.raises(ConfigError, match="has shape"):
        match_modules([a, _run("c", {"x.layer.2.q": (4, 5)})])
    with pytest.raises(ConfigError, match="share no adapted module names"):
        match_modules([a, _run("d", {"y.layer.0.k": (4, 4)})])


def test_lora_versus_full_fine_tuning_uses_singular_vectors_of_delta_w():
    g = gen(8)
    W0 = randn(12, 10, g=g)
    lora = {"m.layer.0.q": DeltaW(B=randn(12, 3, g=g), A=randn(3, 10, g=g), base=W0, kind="lora")}
    full = {"m.layer.0.q": DeltaW(dense=lora["m.layer.0.q"].to_dense() + 1e-3 * randn(12, 10, g=g), base=W0)}
    runs = [RunDeltas.from_deltas("lora", lora, rank=3), RunDeltas.from_deltas("full", full)]
    res = analyse_runs(runs, options=AnalysisOptions(seed=1))
    assert res.basis == "delta"
    (phi,) = res.phi
    assert phi.phi.shape == (3, 10)
    assert phi.summary["phi_11"] > 0.99 and phi.summary["shared_dirs"] == 3
    assert [t["r"] for t in res.table7] == [3, 8]
    with pytest.raises(ConfigError, match="dense"):
        analyse_runs(runs, options=AnalysisOptions(basis="factor"))


# ----------------------------------------------------------------------------------------------
# The report command
# ----------------------------------------------------------------------------------------------
D, LAYERS = 32, 3
TYPES = ("query", "value")


def run_record(method: dict, seed: int, deltas: dict, status: str = "completed", version: int = 2) -> dict:
    """A record as the trainer writes it (schema ``version``): ΔW of the best epoch, 2 of 3."""
    config = {"method": method, "seed": seed}
    if status != "completed":
        return {"schema_version": 2, "status": status, "error": "RuntimeError: boom", "error_kind": "exception",
                "config": config}
    rows = [{"epoch": e, "validation/accuracy": .7, "test/accuracy": .7} for e in (1, 2, 3)]
    record = {"status": status, "seed": seed, "config": config, "epochs": rows, "best": rows[1], "last": rows[2],
              "parameters": {"trainable": 10, "total": 100}, "measurements": {}}
    if version == 1:
        return record
    return {"schema_version": 2, **record, "delta_w_shapes": delta_shapes(deltas),
            "files": {STATE_FILE: {"epoch": 2, "holds": "best"}, LAST_STATE_FILE: {"epoch": 3, "holds": "last"},
                      DELTA_FILE: {"epoch": 2, "holds": "best"}}}


def make_run(run_dir: Path, r: int, seed: int, d: int = D, names=None, status="completed", version=2) -> Path:
    g = gen(100 + seed)
    base_g = gen(0)  # the same W0 in every run
    shared = torch.randn(D, generator=gen(1))
    names = names or [f"bert.encoder.layer.{layer}.attention.self.{t}" for layer in range(LAYERS) for t in TYPES]
    deltas = {}
    for name in names:
        A = torch.randn(r, d, generator=g)
        if d == D:
            A[0] = 5 * shared  # one direction every run learns
        deltas[name] = DeltaW(B=0.01 * torch.randn(d, r, generator=g), A=A,
                              base=torch.randn(d, d, generator=base_g), kind="lora")
    save_delta_weights(run_dir / "delta_w.safetensors", deltas)
    method = {"name": "lora", "r": r, "alpha": 8, "targets": ["q", "v"]}
    write_json(run_dir / "record.json", run_record(method, seed, deltas, status, version))
    return run_dir


def make_bias_only_run(run_dir: Path) -> Path:
    """A run whose method trains no weight matrix (BitFit): its ΔW file is empty."""
    save_delta_weights(run_dir / "delta_w.safetensors", {})
    write_json(run_dir / "record.json", run_record({"name": "bitfit"}, 0, {}))
    return run_dir


def test_a_run_that_changes_no_weight_matrix_is_named_and_left_out(runs, tmp_path, capsys):
    bitfit = make_bias_only_run(tmp_path / "bitfit")
    rc = report_main([str(bitfit), str(runs[0]), str(runs[1]), "--out", str(tmp_path / "rep"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "ΔW = 0 for every weight matrix of BitFit seed=0" in out
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "ΔW = 0 for every weight matrix of BitFit seed=0" in report and "phi_pair1_query.png" in report
    assert str(bitfit) not in report.split("## ")[0]  # not listed among the analysed runs

    rc = report_main([str(bitfit), "--out", str(tmp_path / "alone"), "--no-progress", "--analyses", "spectra"])
    assert rc == 0 and "nothing to analyse" in (tmp_path / "alone" / "report.md").read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root / "r4", 4, 0, version=1), make_run(root / "r8", 8, 1)  # schema versions 1 and 2


def test_delta_file_reads_what_records_wrote(runs):
    lazy = DeltaFile(runs[0] / "delta_w.safetensors")
    eager = load_delta_weights(runs[0] / "delta_w.safetensors")
    assert set(lazy.shapes) == set(eager)
    for name, d in eager.items():
        got = lazy.load(name)
        assert lazy.shapes[name] == d.shape and got.kind == "lora"
        assert torch.equal(got.A, d.A) and torch.equal(got.B, d.B) and torch.equal(got.base, d.base)


def test_report_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "report"
    rc = report_main([str(runs[0]), str(runs[1]), "--out", str(out), "--no-progress",
                      "--wandb", "--wandb-mode", "disabled"])
    assert rc == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["phi_pair1_query.png", "phi_pair1_random.png", "phi_pair1_value.png",
                    "spectra_run1.png", "spectra_run2.png"]
    for name in pngs + ["effective_rank.md", "phi_summary.md", "table7.md"]:
        assert f"({name})" in report
    assert "LoRA r=4 α=8 (q+v) seed=0" in report and "LoRA r=8 α=8 (q+v) seed=1" in report
    assert f"| LoRA r=4 α=8 (q+v) seed=0 | last epoch | {runs[0]} |" in report  # version 1: the last epoch
    assert f"| LoRA r=8 α=8 (q+v) seed=1 | epoch 2 (best) | {runs[1]} |" in report
    with open(out / "phi_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == LAYERS * len(TYPES)
    for row in rows:
        assert (row["k1"], row["k2"], row["d"]) == ("4", "8", str(D))
        assert float(row["phi_11"]) > 0.9  # the planted shared direction
        assert float(row["random_block_mean"]) < 0.5
    with open(out / "table7.csv") as f:
        t7 = list(csv.DictReader(f))
    assert len(t7) == 2 * LAYERS * len(TYPES) and {r["r"] for r in t7} == {"4", "8"}
    with open(out / "effective_rank.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * LAYERS * len(TYPES)
    assert (out / "phi.safetensors").exists()


def test_report_on_one_run_without_phi(runs, tmp_path):
    out = tmp_path / "one"
    assert report_main([str(runs[0]), "--out", str(out), "--analyses", "spectra,table7", "--no-progress"]) == 0
    assert (out / "spectra_run1.png").exists() and (out / "table7.csv").exists()
    assert not list(out.glob("phi*"))


@pytest.mark.parametrize("case, message", [
    ("one_run", "compares two runs"),
    ("no_delta", "has no delta_w.safetensors"),
    ("shape", "has shape"),
    ("no_common", "share no adapted module names"),
    ("incomplete", "did not complete"),
    ("not_a_run", "not a lora_lab run directory"),
    ("truncated_delta", "cannot be read as safetensors"),
    ("record_disagrees", "its record.json says (32, 33)"),
    ("bad_analysis", "must be among"),
])
def test_report_rejects_bad_input(case, message, runs, tmp_path, capsys):
    a = str(runs[0])
    if case == "one_run":
        argv = [a]
    elif case == "no_delta":
        write_json(tmp_path / "x" / "record.json", run_record({"name": "lora"}, 0, {}, version=1))
        argv = [a, str(tmp_path / "x")]
    elif case == "shape":
        argv = [a, str(make_run(tmp_path / "wide", 4, 2, d=D + 4))]
    elif case == "no_common":
        argv = [a, str(make_run(tmp_path / "other", 4, 3, names=["bert.encoder.layer.0.output.dense"]))]
    elif case == "incomplete":
        argv = [a, str(make_run(tmp_path / "crashed", 4, 4, status="failed"))]
    elif case == "not_a_run":
        (tmp_path / "empty").mkdir()
        argv = [a, str(tmp_path / "empty")]
    elif case == "truncated_delta":
        run = make_run(tmp_path / "cut", 4, 5)
        (run / "delta_w.safetensors").write_bytes((run / "delta_w.safetensors").read_bytes()[:-100])
        argv = [a, str(run)]
    elif case == "record_disagrees":
        run = make_run(tmp_path / "disagrees", 4, 6)
        record = json.loads((run / "record.json").read_text())
        record["delta_w_shapes"] = {name: [D, D + 1] for name in record["delta_w_shapes"]}
        write_json(run / "record.json", record)
        argv = [a, str(run)]
    else:
        argv = [a, str(runs[1]), "--analyses", "spectra,svd"]
    rc = report_main(argv + ["--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.startswith("lora-lab-subspace: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out" / "report.md").exists()


def test_report_command_exits_non_zero_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_lab.analysis.subspace_report", str(tmp_path / "missing"),
                           str(tmp_path / "missing2"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("lora-lab-subspace: error: run=") and "is not a directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def test_benchmark_quick_reports_ratio_of_measured_times(capsys):
    result = bench_subspace.measure(["--quick", "--threads", "1", "--factored-repeats", "5"])
    printed = capsys.readouterr().out
    ratio = statistics.median(result["dense_times"]) / statistics.median(result["factored_times"])
    assert result["ratio"] == pytest.approx(ratio)
    assert f"speed-up: {ratio:.0f}x" in printed
    assert len(result["dense_times"]) == 3 and len(result["factored_times"]) == 5
    assert result["agreement"] < 1e-4
    assert result["whole_s"] > 0 and "Whole analysis" in printed


def test_factor_basis_is_the_singular_vectors_of_the_factor():
    g = gen(9)
    B, A = randn(30, 4, g=g), randn(4, 25, g=g)
    fs = factored_svd(B, A)
    for side, X in (("right", A), ("left", B)):
        ours, ref = factor_basis(fs, side), orthonormal_basis(X, side)
        # Same vectors up to sign, in the same order.
        assert torch.allclose((ours * ref).sum(0).abs(), torch.ones(4, dtype=torch.float64), atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Real runs of the trainer (tiny random BERT)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_on_two_tiny_trained_lora_runs(tmp_path, capsys):
    from conftest import compose_config

    from lora_lab.trainer.train import run_training

    run_dirs = []
    for r in (4, 8):
        cfg = compose_config("experiment=smoke", "logger=disabled", f"data.cache_dir={tmp_path / 'cache'}",
                             "method=lora", f"method.r={r}", f"seed={r}")
        run_training(cfg, tmp_path / f"r{r}")
        run_dirs.append(str(tmp_path / f"r{r}"))
    out = tmp_path / "report"
    assert report_main(run_dirs + ["--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    with open(out / "phi_summary.csv") as f:
        rows = list(csv.DictReader(f))
    # The smoke model: 2 layers, q and v adapted, hidden size 32.
    assert len(rows) == 4 and {(r["k1"], r["k2"], r["d"]) for r in rows} == {("4", "8", "32")}
    assert all(0.0 <= float(r["phi_11"]) <= 1.0 for r in rows)
    with open(out / "table7.csv") as f:
        t7 = list(csv.DictReader(f))
    assert len(t7) == 8 and all(float(t["amplification"]) > 0 and float(t["w_norm"]) > 0 for t in t7)
    report = (out / "report.md").read_text()
    assert "LoRA r=4 α=8 (q+v) seed=4" in report and "LoRA r=8 α=8 (q+v) seed=8" in report
    assert report.count("| epoch 1 (best) |") == 2  # the smoke runs train one epoch
