"""Section 7: the factored-vs-dense SVD speed-up of ``analysis.bench_subspace``."""
from __future__ import annotations

import importlib
import inspect


def bench_subspace(cfg) -> dict:
    scfg = cfg.subspace
    try:
        module = importlib.import_module("analysis.bench_subspace")
    except Exception as error:  # noqa: BLE001
        return {"skipped": f"analysis.bench_subspace is not importable ({type(error).__name__}: {error})"}
    fn = getattr(module, "run_benchmark", None)
    if not callable(fn):
        return {"skipped": "analysis.bench_subspace has no run_benchmark()"}
    lines: list[str] = []
    wanted = {"d": int(scfg.d), "r": int(scfg.r), "r_small": int(scfg.r_small), "layers": int(scfg.layers),
              "repeats": int(scfg.repeats), "dense_repeats": int(scfg.dense_repeats),
              "factored_repeats": int(scfg.factored_repeats), "w_row": False, "out": lines.append}
    params = inspect.signature(fn).parameters
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in wanted
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        return {"skipped": f"analysis.bench_subspace.run_benchmark needs {missing}, which this benchmark does not set"}
    try:
        result = fn(**{k: v for k, v in wanted.items() if k in params})
    except Exception as error:  # noqa: BLE001 - that module's failure must not lose the other sections
        return {"skipped": f"analysis.bench_subspace.run_benchmark failed: {type(error).__name__}: {error}"}
    keep = ("d", "r", "factored_s", "dense_s", "ratio", "agreement")
    out = {k: result[k] for k in keep if isinstance(result, dict) and k in result}
    out["printed"] = lines
    if "ratio" not in out:
        out["skipped"] = "run_benchmark() returned no 'ratio'"
    return out
