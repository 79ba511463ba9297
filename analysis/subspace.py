"""Section 7 of the LoRA paper (Hu et al. 2021), "understanding the low-rank updates", for any method.

All quantities are computed per adapted weight matrix from the ΔW a run saved (``DeltaW``: dense, or
factors with ΔW = B @ A), never forming a dense out x in product from factors:

* singular values of ΔW and its effective rank (how many directions hold ``energy`` of ||ΔW||_F^2);
  factored ΔW: QR of B and of A^T, then the SVD of the small k x k core R_B R_A^T;
  dense ΔW: full SVD when small, else a randomized SVD of the top directions only;
* normalised subspace similarity
  phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)  for all i, j at once,
  with U the singular vectors of a LoRA factor (A's row space, as in the paper) or of ΔW itself
  (any two methods), on the input ("right") or output ("left") side; a random Gaussian baseline with
  the same shapes, whose expectation is i*j / (d * min(i, j));
* the paper's Table 7: with U, V the top-r left/right singular vectors of ΔW (or of W, or random),
  ||U^T W V||_F, ||W||_F, ||ΔW||_F and the amplification factor ||ΔW||_F / ||U^T W V||_F, W = W0;
  ΔW's directions come from its factors, so W0 is read once, in one product W0 @ V;
* intruder dimensions (Shuttleworth et al. 2024, ``intruders``): top singular vectors of W0 + ΔW far
  from every singular vector of W0.

``analyse_runs`` runs everything over the modules two or more runs share, one module at a time so
that only one module's matrices are in memory.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lora_lab.analysis.intruders import intruder_dimensions, left_singular_vectors
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW

SIDES = ("right", "left")
BASES = ("auto", "factor", "delta")
ANALYSES = ("spectra", "table7", "phi", "intruders")
DENSE_SVD = ("auto", "full", "randomized")
# Dense matrices up to this size in the smaller dimension get an exact full SVD under "auto".
FULL_SVD_MAX_DIM = 1024
# W @ V for Table 7 runs in float64 up to this many entries of W, in float32 above (accuracy ~1e-6).
FLOAT64_MAX_NUMEL = 1 << 22


# ----------------------------------------------------------------------------------------------
# Decompositions
# ----------------------------------------------------------------------------------------------
@dataclass
class SVD:
    """Thin SVD M ~ U diag(S) Vh, in float64, singular values descending.

    ``energy`` is the exact ||M||_F^2 (also when only the top singular values are known) and
    ``complete`` says whether S holds every non-zero singular value.
    """

    U: torch.Tensor  # out x k
    S: torch.Tensor  # k
    Vh: torch.Tensor  # k x in
    energy: float
    complete: bool = True
    factor_qr: tuple | None = None  # (Q_B, R_B, Q_A, R_A) when computed from factors, for factor_basis

    @property
    def k(self) -> int:
        return int(self.S.numel())

    def basis(self, side: str = "right", k: int | None = None) -> torch.Tensor:
        """Orthonormal columns spanning the top-k row space ("right") or column space ("left")."""
        _check_side(side)
        k = self.k if k is None else min(k, self.k)
        return self.Vh[:k].T if side == "right" else self.U[:, :k]


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ConfigError("side", side, f"must be one of {list(SIDES)}")


def thin_svd(X: torch.Tensor) -> SVD:
    """Exact thin SVD of a (typically very wide or very tall) matrix via QR and an SVD of the small side."""
    X = X.detach().to(torch.float64)
    m, n = X.shape
    if m >= n:
        Q, R = torch.linalg.qr(X)
        Ur, S, Vh = torch.linalg.svd(R)
        U = Q @ Ur
    else:
        Q, R = torch.linalg.qr(X.T)  # X = R^T Q^T
        U, S, Vr = torch.linalg.svd(R.T)
        Vh = Vr @ Q.T
    return SVD(U, S, Vh, energy=float((S * S).sum()), complete=True)


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> SVD:
    """SVD of B @ A (out x k times k x in) without forming it: QR of B and A^T, SVD of the k x k core."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ConfigError("factors", f"B {tuple(B.shape)}, A {tuple(A.shape)}",
                          "need B of shape out x k and A of shape k x in")
    Qb, Rb = torch.linalg.qr(B.detach().to(torch.float64))
    Qa, Ra = torch.linalg.qr(A.detach().to(torch.float64).T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return SVD(Qb @ Uc, S, Vch @ Qa.T, energy=float((S * S).sum()), complete=True, factor_qr=(Qb, Rb, Qa, Ra))


def factor_basis(svd: SVD, side: str = "right") -> torch.Tensor:
    """The paper's U for a LoRA run: singular vectors of A (row space, "right") or of B (column space,
    "left"), ordered by the factor's own singular values; reuses the QR done by ``factored_svd``."""
    _check_side(side)
    if svd.factor_qr is None:
        raise ConfigError("basis", "factor", "needs an SVD computed from factors B and A")
    Qb, Rb, Qa, Ra = svd.factor_qr
    if side == "right":  # A = R_A^T Q_A^T
        return Qa @ torch.linalg.svd(Ra.T, full_matrices=False).Vh.T
    return Qb @ torch.linalg.svd(Rb, full_matrices=False).U


def randomized_svd(M: torch.Tensor, k: int, oversample: int = 10, niter: int = 2,
                   generator: torch.Generator | None = None) -> SVD:
    """Top-k SVD by a randomized range finder with ``niter`` power iterations (Halko et al. 2011).

    Works in M's dtype (float32 for large matrices); the singular values are lower bounds of the
    true ones, close when the spectrum decays.
    """
    M = M.detach()
    if not M.is_floating_point():
        M = M.float()
    m, n = M.shape
    k = max(1, min(k, m, n))
    q = min(k + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=M.dtype)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    small = thin_svd(Q.T @ M)  # q x n
    U = Q.to(torch.float64) @ small.U
    energy = frobenius_norm(M) ** 2
    complete = k >= min(m, n)
    return SVD(U[:, :k], small.S[:k], small.Vh[:k], energy=energy, complete=complete)


def dense_svd(M: torch.Tensor, k: int | None = None, method: str = "auto", niter: int = 2,
              generator: torch.Generator | None = None) -> SVD:
    """SVD of a dense matrix: exact (``full``) or the top-k directions only (``randomized``).

    ``auto`` is exact when min(shape) <= FULL_SVD_MAX_DIM or no k is given, randomized otherwise.
    """
    if method not in DENSE_SVD:
        raise ConfigError("dense_svd", method, f"must be one of {list(DENSE_SVD)}")
    small = min(M.shape)
    if method == "auto":
        method = "full" if (k is None or small <= FULL_SVD_MAX_DIM or k >= small) else "randomized"
    if method == "randomized":
        if k is None:
            raise ConfigError("dense_svd", method, "needs the number of directions k")
        return randomized_svd(M, k, niter=niter, generator=generator)
    out = thin_svd(M)
    if k is not None and k < out.k:
        out = SVD(out.U[:, :k], out.S[:k], out.Vh[:k], energy=out.energy, complete=False)
    return out


@contextmanager
def one_thread():
    """Run torch on one thread inside the block. For the many small decompositions of factors (d x k):
    with more threads than idle cores each call waits at its thread barriers for descheduled threads,
    which made the factored analysis of a LLaMA-7B-shaped pair 6 to 17x slower on a busy 2-core machine;
    one thread loses little on an idle one, since the matrices are thin."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def delta_svd(delta: DeltaW, k: int | None = None, method: str = "auto", niter: int = 2,
              generator: torch.Generator | None = None) -> SVD:
    """SVD of ΔW: from the factors when it has them (all of its at most k_factor directions), else dense."""
    if delta.B is not None and delta.A is not None:
        with one_thread():
            return factored_svd(delta.B, delta.A)
    if delta.dense is None:
        raise ConfigError("delta_w", "module", "has neither a dense ΔW nor factors B and A")
    return dense_svd(delta.dense, k=k, method=method, niter=niter, generator=generator)


def effective_rank(S: torch.Tensor, energy: float = 0.9, total_energy: float | None = None) -> int | None:
    """Fewest leading singular values holding ``energy`` of the total squared norm.

    ``total_energy`` (||M||_F^2) lets a truncated spectrum answer too; None means the known values do
    not reach the threshold (the effective rank exceeds len(S)). A zero matrix has rank 0.
    """
    if not 0.0 < energy <= 1.0:
        raise ConfigError("energy", energy, "must be in (0, 1]")
    s2 = S.detach().to(torch.float64) ** 2
    total = float(s2.sum()) if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 0
    cum = torch.cumsum(s2, 0)
    reached = torch.nonzero(cum >= energy * total * (1.0 - 1e-12))
    return int(reached[0]) + 1 if reached.numel() else None


# ----------------------------------------------------------------------------------------------
# Subspace similarity
# ----------------------------------------------------------------------------------------------
def orthonormal_basis(X: torch.Tensor, side: str = "right", k: int | None = None) -> torch.Tensor:
    """Singular vectors of X spanning its row space ("right", d = X.shape[1]) or column space ("left").

    For a LoRA factor A (r x in) the right side gives the paper's U: the rows of Vh, as columns.
    """
    _check_side(side)
    return thin_svd(X).basis(side, k)


def phi_matrix(U1: torch.Tensor, U2: torch.Tensor, max_i: int | None = None,
               max_j: int | None = None) -> torch.Tensor:
    """phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) for i <= max_i (rows), j <= max_j (cols).

    U1 (d x k1) and U2 (d x k2) have orthonormal columns. Entry [i-1, j-1] holds phi(i, j).
    """
    if U1.ndim != 2 or U2.ndim != 2 or U1.shape[0] != U2.shape[0]:
        raise ConfigError("subspaces", f"{tuple(U1.shape)} vs {tuple(U2.shape)}",
                          "must be d x k1 and d x k2 with the same d")
    mi = U1.shape[1] if max_i is None else min(max_i, U1.shape[1])
    mj = U2.shape[1] if max_j is None else min(max_j, U2.shape[1])
    G = (U1[:, :mi].to(torch.float64).T @ U2[:, :mj].to(torch.float64)) ** 2
    cum = G.cumsum(0).cumsum(1)
    i = torch.arange(1, mi + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, mj + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def subspace_similarity(X1: torch.Tensor, X2: torch.Tensor, side: str = "right") -> torch.Tensor:
    """phi over all i, j for two matrices, e.g. two LoRA A factors (r1 x in, r2 x in)."""
    return phi_matrix(orthonormal_basis(X1, side), orthonormal_basis(X2, side))


def principal_cosines(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(U1) and span(U2), descending."""
    return torch.linalg.svdvals(U1.to(torch.float64).T @ U2.to(torch.float64))


def random_phi(d: int, k1: int, k2: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """phi between the row spaces of two Gaussian matrices of shapes k1 x d and k2 x d."""
    X1 = torch.randn(k1, d, generator=generator, dtype=torch.float64)
    X2 = torch.randn(k2, d, generator=generator, dtype=torch.float64)
    return subspace_similarity(X1, X2)


def expected_random_phi(d: int, k1: int, k2: int) -> torch.Tensor:
    """E[phi(i, j)] for independent uniformly random subspaces: i * j / (d * min(i, j))."""
    i = torch.arange(1, k1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, k2 + 1, dtype=torch.float64)[None, :]
    return i * j / (d * torch.minimum(i, j))


def phi_summary(phi: torch.Tensor, block: int | None = None) -> dict:
    """phi(1, 1), phi at the far corner and the mean over the top-left block (b x b, b = min(k1, k2))."""
    b = min(phi.shape) if block is None else max(1, min(block, *phi.shape))
    return {"phi_11": float(phi[0, 0]), "phi_full": float(phi[-1, -1]), "block": b,
            "phi_block_mean": float(phi[:b, :b].mean())}


# ----------------------------------------------------------------------------------------------
# Table 7: does ΔW amplify directions of W?
# ----------------------------------------------------------------------------------------------
def _haar_basis(n: int, r: int, generator: torch.Generator | None, dtype) -> torch.Tensor:
    """The top-r singular vectors of a Gaussian matrix are uniformly (Haar) distributed; QR of an
    n x r Gaussian gives the same distribution without an n x n SVD."""
    Q, R = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))[None, :]).to(dtype)


def top_singular_values(W: torch.Tensor, r: int, niter: int = 2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The top-r singular values of W: exact when small, randomized for large W."""
    if min(W.shape) <= FULL_SVD_MAX_DIM:
        return torch.linalg.svdvals(W.detach().to(torch.float64))[:r]
    return randomized_svd(W.float(), r, niter=niter, generator=generator).S


def frobenius_norm(M: torch.Tensor) -> float:
    """||M||_F accurate to float64 without a float64 copy of M (row norms, then their norm)."""
    M = M.detach()
    if M.dtype == torch.float64 or M.ndim != 2:
        return float(torch.linalg.vector_norm(M.to(torch.float64)))
    return float(torch.linalg.vector_norm(torch.linalg.vector_norm(M.float(), dim=1).to(torch.float64)))


def amplification_table(W: torch.Tensor, svds: Sequence[SVD], ranks: Sequence[int], w_row: bool = True,
                        random_draw: bool = False, niter: int = 2,
                        generator: torch.Generator | None = None) -> list[dict]:
    """Table 7 quantities for several ΔW that share the same W (one product W @ V for all of them).

    For each (ΔW SVD, r): proj_delta = ||U^T W V||_F with U, V the top-r left/right singular vectors
    of ΔW; proj_w the same with W's own top-r directions (= the root of the sum of its top-r squared
    singular values); proj_random the same for the top-r directions of a random Gaussian matrix,
    which are uniformly distributed, so E||U^T W V||_F^2 = r^2 ||W||_F^2 / (out * in) and proj_random
    is its root (the paper's 0.02 and 0.33 are this value); with ``random_draw`` also one actual draw
    (proj_random_draw, one Gaussian draw per call, nested prefixes for the ranks); w_norm, delta_norm
    and amplification = delta_norm / proj_delta.
    """
    if W.ndim != 2:
        raise ConfigError("base", tuple(W.shape), "W0 must be a matrix")
    out_dim, in_dim = W.shape
    ranks = [max(1, min(int(r), s.k)) for r, s in zip(ranks, svds)]
    for s in svds:
        if (s.U.shape[0], s.Vh.shape[1]) != (out_dim, in_dim):
            raise ConfigError("base", tuple(W.shape),
                              f"does not match ΔW of shape {(s.U.shape[0], s.Vh.shape[1])}")
    dtype = torch.float64 if W.numel() <= FLOAT64_MAX_NUMEL else torch.float32
    Wd = W.detach().to(dtype)
    r_max = max(ranks)
    blocks = [s.Vh[:r].T.to(dtype) for s, r in zip(svds, ranks)]
    if random_draw:
        rand_U = _haar_basis(out_dim, r_max, generator, dtype)
        blocks.append(_haar_basis(in_dim, r_max, generator, dtype))
    WV = Wd @ torch.cat(blocks, dim=1)  # out x (sum of ranks [+ r_max]): the only pass over W
    w_norm = frobenius_norm(Wd)
    w_top = top_singular_values(W, r_max, niter=niter, generator=generator) if w_row else None
    rand_core = (rand_U.T @ WV[:, -r_max:]).to(torch.float64) if random_draw else None
    rows, offset = [], 0
    for s, r in zip(svds, ranks):
        core = s.U[:, :r].to(dtype).T @ WV[:, offset:offset + r]
        offset += r
        proj_delta = float(torch.linalg.vector_norm(core.to(torch.float64)))
        delta_norm = math.sqrt(s.energy)
        rows.append({
            "r": r,
            "proj_delta": proj_delta,
            "proj_w": float(torch.linalg.vector_norm(w_top[:r])) if w_top is not None else None,
            "proj_random": r * w_norm / math.sqrt(out_dim * in_dim),
            "proj_random_draw": float(torch.linalg.vector_norm(rand_core[:r, :r])) if random_draw else None,
            "w_norm": w_norm,
            "delta_norm": delta_norm,
            "amplification": delta_norm / proj_delta if proj_delta > 0 else float("nan"),
        })
    return rows


# ----------------------------------------------------------------------------------------------
# Runs, module matching and the whole analysis
# ----------------------------------------------------------------------------------------------
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def split_module_name(name: str) -> tuple[int | None, str]:
    """("bert.encoder.layer.3.attention.self.query") -> (3, "attention.self.query")."""
    matches = list(_LAYER.finditer(name))
    if not matches:
        return None, name
    m = matches[-1]
    return int(m.group(1)), name[m.end():]


def short_type_names(types: Iterable[str]) -> dict[str, str]:
    """The last name component ("query") where that is unambiguous, else the full matrix type."""
    types = sorted(set(types))
    last = [t.rsplit(".", 1)[-1] for t in types]
    return {t: (s if last.count(s) == 1 else t) for t, s in zip(types, last)}


def _module_order(name: str):
    layer, mtype = split_module_name(name)
    return (-1 if layer is None else layer, mtype, name)


@dataclass
class RunDeltas:
    """One run's ΔW, loaded lazily per module. ``rank`` is the Table 7 r (None: factor width, else 8)."""

    label: str
    shapes: dict[str, tuple[int, int]]
    load: Callable[[str], DeltaW]
    factored: dict[str, bool]
    rank: int | None = None

    @classmethod
    def from_deltas(cls, label: str, deltas: dict[str, DeltaW], rank: int | None = None) -> RunDeltas:
        return cls(label, {n: tuple(d.shape) for n, d in deltas.items()}, deltas.__getitem__,
                   {n: d.B is not None and d.A is not None for n, d in deltas.items()}, rank)


def match_modules(runs: Sequence[RunDeltas]) -> tuple[list[str], dict[str, list[str]]]:
    """Module names present in every run (ordered by layer, then type) and those missing somewhere.

    Raises ConfigError when no name is shared or a shared name has different shapes.
    """
    if not runs:
        raise ConfigError("runs", [], "need at least one run")
    common = set(runs[0].shapes)
    for run in runs[1:]:
        common &= set(run.shapes)
    if not common:
        raise ConfigError("runs", [r.label for r in runs],
                          "share no adapted module names; compare runs that adapt the same matrices")
    for name in sorted(common):
        first = runs[0]
        for run in runs[1:]:
            if tuple(run.shapes[name]) != tuple(first.shapes[name]):
                raise ConfigError("module", name, f"has shape {tuple(first.shapes[name])} in "
                                  f"{first.label!r} but {tuple(run.shapes[name])} in {run.label!r}; "
                                  "compare runs of the same model")
    unmatched = {r.label: sorted(set(r.shapes) - common) for r in runs}
    return sorted(common, key=_module_order), {k: v for k, v in unmatched.items() if v}


def make_pairs(n_runs: int, mode: str = "all") -> list[tuple[int, int]]:
    """Index pairs of runs to compare: every pair, the first run against each other, or neighbours."""
    if mode == "all":
        return [(i, j) for i in range(n_runs) for j in range(i + 1, n_runs)]
    if mode == "first":
        return [(0, j) for j in range(1, n_runs)]
    if mode == "consecutive":
        return [(i, i + 1) for i in range(n_runs - 1)]
    raise ConfigError("pairs", mode, "must be one of ['all', 'first', 'consecutive']")


@dataclass
class AnalysisOptions:
    analyses: tuple[str, ...] = ANALYSES
    basis: str = "auto"  # phi from the LoRA factors ("factor"), from ΔW ("delta"), or factor when all can
    side: str = "right"
    energy: float = 0.9
    dense_dirs: int = 64  # directions kept for a dense ΔW (phi; Table 7 r is added when larger)
    dense_svd: str = "auto"
    table7_rank: int | None = None  # overrides every run's r
    w_row: bool = True  # Table 7's "W" column (top-r SVD of W0; randomized for large W0)
    random_draw: bool = False  # Table 7: also one actual random draw besides the expectation
    block: int | None = None  # phi summary block size (default min(k1, k2))
    intruder_k: int = 10  # top singular vectors of W0 + ΔW examined for intruder dimensions
    intruder_threshold: float = 0.5  # ... an intruder when its best |cosine| with W0's is below this
    niter: int = 2
    seed: int = 0

    def check(self, runs: Sequence[RunDeltas], pairs: Sequence[tuple[int, int]]) -> None:
        for a in self.analyses:
            if a not in ANALYSES:
                raise ConfigError("analyses", a, f"must be among {list(ANALYSES)}")
        if not self.analyses:
            raise ConfigError("analyses", "", f"choose at least one of {list(ANALYSES)}")
        if self.basis not in BASES:
            raise ConfigError("basis", self.basis, f"must be one of {list(BASES)}")
        _check_side(self.side)
        if self.dense_svd not in DENSE_SVD:
            raise ConfigError("dense_svd", self.dense_svd, f"must be one of {list(DENSE_SVD)}")
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError("energy", self.energy, "must be in (0, 1]")
        if self.dense_dirs < 1:
            raise ConfigError("dense_dirs", self.dense_dirs, "must be >= 1")
        if self.intruder_k < 1:
            raise ConfigError("intruder_k", self.intruder_k, "must be >= 1")
        if not 0.0 < self.intruder_threshold <= 1.0:
            raise ConfigError("intruder_threshold", self.intruder_threshold, "must be in (0, 1]")
        if self.table7_rank is not None and self.table7_rank < 1:
            raise ConfigError("rank", self.table7_rank, "must be >= 1")
        if "phi" in self.analyses:
            if len(runs) < 2:
                raise ConfigError("runs", [r.label for r in runs],
                                  "subspace similarity (phi) compares two runs and got one; pass a second "
                                  "run, or analyse a single run with --analyses spectra,table7")
            if not pairs:
                raise ConfigError("pairs", list(pairs), "no pair of runs to compare")


@dataclass
class PhiResult:
    pair: int
    module: str
    layer: int | None
    mtype: str
    basis: str
    d: int
    phi: torch.Tensor
    summary: dict


@dataclass
class AnalysisResult:
    labels: list[str]
    modules: list[str]
    pairs: list[tuple[int, int]]
    options: AnalysisOptions
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    spectra: list[dict] = field(default_factory=list)  # per (run, module); "S" holds the singular values
    phi: list[PhiResult] = field(default_factory=list)
    random: dict[tuple[int, str], dict] = field(default_factory=dict)  # (pair, mtype) -> baseline
    table7: list[dict] = field(default_factory=list)
    intruders: list[dict] = field(default_factory=list)  # per (run, module) with a W0
    notes: list[str] = field(default_factory=list)
    basis: str = ""

    def types(self) -> list[str]:
        return sorted({split_module_name(m)[1] for m in self.modules})


def _run_rank(run: RunDeltas, opts: AnalysisOptions, svd: SVD, factored: bool) -> int:
    """Table 7's r: the option, else the run's method r, else the factor width, else 8 (dense ΔW)."""
    if opts.table7_rank is not None:
        return opts.table7_rank
    if run.rank is not None:
        return run.rank
    return svd.k if factored else 8


def analyse_runs(runs: Sequence[RunDeltas], pairs: Sequence[tuple[int, int]] | None = None,
                 options: AnalysisOptions | None = None, progress: bool | None = None) -> AnalysisResult:
    """Spectra, effective ranks, phi for each pair (with random baselines) and Table 7, per module."""
    opts = options or AnalysisOptions()
    runs = list(runs)
    pairs = make_pairs(len(runs)) if pairs is None else list(pairs)
    if "phi" not in opts.analyses:
        pairs = []
    opts.check(runs, pairs)
    modules, unmatched = match_modules(runs)
    res = AnalysisResult([r.label for r in runs], modules, pairs, opts, unmatched)

    all_factored = all(r.factored[m] for r in runs for m in modules)
    basis = opts.basis
    if basis == "auto":
        basis = "factor" if all_factored else "delta"
    if basis == "factor" and not all_factored and pairs:
        dense = next(r.label for r in runs for m in modules if not r.factored[m])
        raise ConfigError("basis", "factor", f"run {dense!r} saved a dense ΔW (no factors); use --basis delta")
    res.basis = basis
    gen = torch.Generator().manual_seed(opts.seed)
    want_t7 = "table7" in opts.analyses
    rank_hint = opts.table7_rank or max((r.rank or 0) for r in runs) or 8
    dense_k = max(opts.dense_dirs, rank_hint)

    iterator = modules
    if progress is None:
        progress = len(modules) > 8
    if progress:
        iterator = tqdm(modules, desc="subspace analysis", unit="matrix", leave=False)
    missing_base = []
    for name in iterator:
        layer, mtype = split_module_name(name)
        with one_thread():  # reading and checking: elementwise work on thin factors, see one_thread
            deltas = [run.load(name) for run in runs]
        svds = [delta_svd(d, k=dense_k, method=opts.dense_svd, niter=opts.niter, generator=gen) for d in deltas]
        for run, d, s in zip(runs, deltas, svds):
            res.spectra.append({
                "run": run.label, "module": name, "layer": layer, "mtype": mtype, "kind": d.kind,
                "shape": tuple(d.shape), "k": s.k, "complete": s.complete, "S": s.S,
                "delta_norm": math.sqrt(s.energy),
                "effective_rank": effective_rank(s.S, opts.energy, s.energy),
            })
        if want_t7:
            _table7_for_module(res, runs, deltas, svds, name, layer, mtype, opts, gen, missing_base)
        if "intruders" in opts.analyses:
            _intruders_for_module(res, runs, deltas, name, layer, mtype, opts, missing_base)
        with one_thread():  # d x k bases only: small work, see one_thread
            for p, (a, b) in enumerate(pairs):
                _phi_for_module(res, p, deltas[a], deltas[b], svds[a], svds[b], name, layer, mtype, basis, opts, gen)
        del deltas, svds
    missing_base = list(dict.fromkeys(missing_base))
    if missing_base:
        skipped = " and ".join(a for a in ("Table 7", "intruder dimensions") if a in opts.analyses)
        res.notes.append(f"{skipped} skipped for {len(missing_base)} module(s) without a saved W0: "
                         + ", ".join(missing_base[:5]) + (" ..." if len(missing_base) > 5 else ""))
    return res


def _base_groups(runs, deltas, name, missing_base) -> list[tuple[torch.Tensor, list[int]]]:
    """The runs' W0 of one module, each distinct W0 with the indices of the runs that share it."""
    groups: list[tuple[torch.Tensor, list[int]]] = []
    for i, d in enumerate(deltas):
        if d.base is None:
            missing_base.append(f"{runs[i].label}:{name}")
            continue
        for W, members in groups:
            if W is d.base or (W.shape == d.base.shape and torch.equal(W, d.base)):
                members.append(i)
                break
        else:
            groups.append((d.base, [i]))
    return groups


def _intruders_for_module(res, runs, deltas, name, layer, mtype, opts, missing_base) -> None:
    for W, members in _base_groups(runs, deltas, name, missing_base):
        base_vectors = left_singular_vectors(W)  # once per W0
        for i in members:
            found = intruder_dimensions(W, deltas[i].to_dense(), opts.intruder_k, opts.intruder_threshold, base_vectors)
            res.intruders.append({"run": runs[i].label, "module": name, "layer": layer, "mtype": mtype,
                                  "k": int(found.similarity.numel()), "intruders": found.count,
                                  "positions": found.positions, "min_similarity": float(found.similarity.min())})


def _table7_for_module(res, runs, deltas, svds, name, layer, mtype, opts, gen, missing_base) -> None:
    for W, members in _base_groups(runs, deltas, name, missing_base):  # runs that share W0 share one pass
        ranks = [_run_rank(runs[i], opts, svds[i], runs[i].factored[name]) for i in members]
        rows = amplification_table(W, [svds[i] for i in members], ranks, w_row=opts.w_row,
                                   random_draw=opts.random_draw, niter=opts.niter, generator=gen)
        for i, row in zip(members, rows):
            res.table7.append({"run": runs[i].label, "module": name, "layer": layer, "mtype": mtype, **row})


def _phi_bases(delta: DeltaW, svd: SVD, basis: str, side: str, dense_dirs: int) -> torch.Tensor:
    if basis == "factor":
        return factor_basis(svd, side)
    return svd.basis(side, svd.k if delta.dense is None else min(dense_dirs, svd.k))


def _phi_for_module(res, p, d1, d2, s1, s2, name, layer, mtype, basis, opts, gen) -> None:
    U1 = _phi_bases(d1, s1, basis, opts.side, opts.dense_dirs)
    U2 = _phi_bases(d2, s2, basis, opts.side, opts.dense_dirs)
    phi = phi_matrix(U1, U2)
    d, k1, k2 = U1.shape[0], U1.shape[1], U2.shape[1]
    base = res.random.get((p, mtype))
    if base is None or base["shape"] != (d, k1, k2):  # first module of this type, or other shapes
        base = {"shape": (d, k1, k2), "phi": random_phi(d, k1, k2, gen),
                "expected": expected_random_phi(d, k1, k2)}
        res.random.setdefault((p, mtype), base)
    summary = phi_summary(phi, opts.block)
    b = summary["block"]
    cos2 = principal_cosines(U1, U2) ** 2
    summary.update({
        "k1": k1, "k2": k2, "d": d,
        "shared_dirs": int((cos2 > 0.5).sum()),
        "random_block_mean": float(base["phi"][:b, :b].mean()),
        "expected_block_mean": float(base["expected"][:b, :b].mean()),
    })
    res.phi.append(PhiResult(p, name, layer, mtype, basis, d, phi, summary))
