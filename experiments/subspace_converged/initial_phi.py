"""phi between two LoRA runs' learned A and between the same runs' initial A (before the first step).

    python experiments/subspace_converged/initial_phi.py RUN_1 RUN_2 [RUN_3 ...] --out FILE.md

For each pair of runs and each adapted matrix, the LoRA paper's subspace similarity of the row spaces of A
(Section 7, as ``lora-lab-subspace --basis factor`` computes it) twice: for the trained factors and for the
factors the method started from (rebuilt with the run's seed: ``rebuild_trained(initial=True)``). If phi of
the trained A is well above phi of the initial A (and above the random expectation), the shared directions
were learned; if the two are alike, the initialisation explains them (two runs with the same seed start
with the same rows of A).
"""
from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from pathlib import Path

import torch

from lora_lab.analysis.sources import run_label
from lora_lab.analysis.subspace import (
    expected_random_phi,
    factor_basis,
    factored_svd,
    phi_matrix,
    phi_summary,
    split_module_name,
)
from lora_lab.markdown import markdown_table
from lora_lab.runtime.rebuild import rebuild_trained


def row_spaces(run_dir: Path, initial: bool) -> dict[str, torch.Tensor]:
    rebuilt = rebuild_trained(run_dir, initial=initial)
    deltas = rebuilt.method.delta_weights(rebuilt.model)
    return {name: factor_basis(factored_svd(d.B, d.A), "right") for name, d in deltas.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = [run_label(rebuild_trained(r, initial=True).record) for r in args.runs]
    spaces = {(i, initial): row_spaces(r, initial) for i, r in enumerate(args.runs) for initial in (False, True)}
    rows = []
    for a, b in itertools.combinations(range(len(args.runs)), 2):
        by_type = defaultdict(lambda: defaultdict(list))
        for name in sorted(spaces[(a, False)]):
            _, mtype = split_module_name(name)
            for initial in (False, True):
                U1, U2 = spaces[(a, initial)][name], spaces[(b, initial)][name]
                summary = phi_summary(phi_matrix(U1, U2))
                by_type[mtype][f"phi_11 {'initial' if initial else 'trained'}"].append(summary["phi_11"])
                by_type[mtype][f"block {'initial' if initial else 'trained'}"].append(summary["phi_block_mean"])
            block = min(U1.shape[1], U2.shape[1])
            by_type[mtype]["random"].append(float(expected_random_phi(U1.shape[0], U1.shape[1], U2.shape[1])[
                :block, :block].mean()))
        for mtype, values in by_type.items():
            mean = {k: sum(v) / len(v) for k, v in values.items()}
            rows.append([f"{labels[a]} vs {labels[b]}", mtype.rsplit(".", 1)[-1], len(values["random"]),
                         mean["phi_11 trained"], mean["phi_11 initial"], mean["block trained"],
                         mean["block initial"], mean["random"]])
    columns = ["pair", "matrix", "layers", "phi_11 trained A", "phi_11 initial A", "block mean trained",
               "block mean initial", "block mean, random expectation"]
    formatted = [[f"{v:.3f}" if isinstance(v, float) else v for v in row] for row in rows]
    text = ("phi(i, j) of the row spaces of A (means over layers), between the trained factors and between the "
            "factors the runs started from; block: i, j up to the smaller rank.\n\n"
            + markdown_table(columns, formatted) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
