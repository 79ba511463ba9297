"""What a method changed beyond Section 7: intruder dimensions, effective rank of a ΔW, drift (CKA and
held-out LM loss), on constructed matrices and on tiny trained runs."""
import csv

import pytest
import torch

from lora_lab.analysis.drift import default_drift_data, held_out_texts, linear_cka, lm_loss
from lora_lab.analysis.intruders import intruder_dimensions
from lora_lab.analysis.subspace import delta_svd, effective_rank
from lora_lab.analysis.subspace_report import main as report_main
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def base_matrix(n=32):
    U, V = orthogonal(n, 0), orthogonal(n, 1)
    return U, torch.linspace(10, 1, n, dtype=torch.float64), V


def test_an_intruder_made_by_rotating_one_singular_vector_is_found():
    U, S, V = base_matrix()
    W0 = U @ torch.diag(S) @ V.T
    # a reflection sending u_1 to w, a direction spread evenly over every singular vector of W0
    w = U.sum(dim=1) / U.shape[0] ** 0.5
    y = (U[:, 0] - w) / torch.linalg.vector_norm(U[:, 0] - w)
    H = torch.eye(32, dtype=torch.float64) - 2 * torch.outer(y, y)
    tuned = H @ W0
    found = intruder_dimensions(W0, tuned - W0, k=10, threshold=0.5)
    assert found.count == 1 and found.positions == [1]
    assert found.similarity[0] == pytest.approx(32 ** -0.5, abs=1e-6)
    assert float(found.similarity[1:].min()) > 0.9  # the others moved little


def test_a_change_along_existing_directions_has_no_intruder():
    U, S, V = base_matrix()
    W0 = U @ torch.diag(S) @ V.T
    delta = 3.0 * torch.outer(U[:, 4], V[:, 4]) + 1e-3 * torch.randn(32, 32, dtype=torch.float64,
                                                                     generator=torch.Generator().manual_seed(2))
    found = intruder_dimensions(W0, delta)
    assert found.count == 0 and found.positions == [] and float(found.similarity.min()) > 0.9


def test_intruder_options_are_checked():
    W0 = torch.eye(4)
    with pytest.raises(ConfigError, match="intruder_threshold"):
        intruder_dimensions(W0, W0, threshold=1.5)
    with pytest.raises(ConfigError, match="does not match W0"):
        intruder_dimensions(W0, torch.zeros(4, 3))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_of_a_rank_k_sum_is_k(k):
    g = torch.Generator().manual_seed(k)
    dense = sum(torch.outer(torch.randn(48, generator=g), torch.randn(40, generator=g)) for _ in range(k))
    svd = delta_svd(DeltaW(dense=dense.double()))
    assert effective_rank(svd.S, 0.999999, svd.energy) == k
    factored = delta_svd(DeltaW(B=torch.randn(48, k, generator=g), A=torch.randn(k, 40, generator=g)))
    assert effective_rank(factored.S, 0.999999, factored.energy) == k


def test_cka_of_identical_representations_is_one_and_invariant_to_rotation_and_scale():
    X = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, 3.0 * X @ orthogonal(16, 3).float() + 5.0) == pytest.approx(1.0, abs=1e-6)
    Y = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    assert linear_cka(X, Y) < 0.2  # independent: near 16/200-ish, far below 1
    with pytest.raises(ConfigError, match="same inputs"):
        linear_cka(X, Y[:10])


def test_held_out_texts_are_fixed_and_avoid_the_runs_data():
    texts = held_out_texts("sms_spam", 20)
    assert len(texts) == 20 and len(set(texts)) == 20 and texts == held_out_texts("sms_spam", 20)
    assert default_drift_data(["rotten_tomatoes"]) == "sms_spam"
    assert default_drift_data(["sms_spam", "rotten_tomatoes"]) == "trec6"
    with pytest.raises(ConfigError, match="not an embedded data set"):
        held_out_texts("nope", 5)


def test_lm_loss_is_the_models_own_next_token_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = float(model(**batch, labels=ids).loss)
    assert lm_loss(model, [batch]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_report_on_tiny_runs_counts_intruders_and_measures_drift(tmp_path, capsys):
    """A head-only run leaves the backbone as it was (CKA 1); LoRA moves it (CKA < 1); both have rows."""
    from conftest import compose_config

    from lora_lab.trainer.train import run_training

    run_dirs = []
    for method in ("lora", "head"):
        cfg = compose_config("experiment=smoke", "logger=disabled", f"data.cache_dir={tmp_path / 'cache'}",
                             f"method={method}", "trainer.lr=0.05")
        run_training(cfg, tmp_path / method)
        run_dirs.append(str(tmp_path / method))
    out = tmp_path / "report"
    argv = [*run_dirs, "--out", str(out), "--no-progress", "--analyses", "spectra,intruders", "--drift",
            "--drift-texts", "64", "--intruder-k", "4"]
    assert report_main(argv) == 0, capsys.readouterr().err
    with open(out / "intruders.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["k"] == "4" and 0 <= int(r["intruders"]) <= 4 for r in rows)  # 2 layers x q, v
    with open(out / "drift.csv") as f:
        drift = {r["run"].split()[0]: float(r["CKA base vs trained"]) for r in csv.DictReader(f)}
    assert drift["Head"] == pytest.approx(1.0, abs=1e-9) and drift["LoRA"] < 1.0
    report = (out / "report.md").read_text()
    assert "## Intruder dimensions" in report and "## Drift on held-out text" in report and "`sms_spam`" in report
    # drift alone: runs of any methods, no shared matrices needed, no ΔW analysis
    alone = tmp_path / "drift"
    assert report_main([*run_dirs, "--out", str(alone), "--no-progress", "--analyses", "drift",
                        "--drift-texts", "32", "--drift-data", "trec6"]) == 0, capsys.readouterr().err
    report = (alone / "report.md").read_text()
    assert "## Drift on held-out text" in report and "`trec6`" in report and "Singular values" not in report
    with open(alone / "drift.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
