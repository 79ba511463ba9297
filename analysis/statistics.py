"""How sure a table is: bootstrap intervals of its cells, paired differences and their tests, and how
often each row ranks first.

A cell is the median (or mean) over seeds of one test metric. Its bootstrap resamples the seeds and,
when every run left its per-example test results (lora_lab.runtime.predictions), the test examples
too: one resample draws S seeds out of S and n examples out of n, each with replacement, recomputes
every drawn run's metric on the drawn examples and takes their median. So the interval covers both
the seed-to-seed spread and the finite test set, and one seed still gets an interval. The examples
drawn are the same for every run of a resample, since all of them scored the same test set.

Intervals are SciPy's percentile bootstrap (``scipy.stats.bootstrap``, which resamples the seed
positions and the example positions independently); p-values are SciPy's paired permutation test
(``scipy.stats.permutation_test``, ``permutation_type="samples"``: each unit's two results are swapped
at random, a unit being a (seed, test example) when both rows have per-example results, else a seed).
Every random draw comes from a generator seeded by the table's seed and the estimate's name, so a
table is the same each time it is made.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap, permutation_test, rankdata

from lora_lab.analysis.example_metrics import class_count, metric_values

LEVEL = 0.95
RESAMPLES = 9999
_GATHERED = 4_000_000  # gathered example entries per vectorised call: bounds the memory of a batch


def generator(seed: int, *name) -> np.random.Generator:
    """The random generator of one estimate: the same seed and name give the same draws, whatever
    else the table computes and in whatever order."""
    return np.random.default_rng([seed, zlib.crc32(repr(name).encode())])


def _aggregate(values: np.ndarray, agg: str) -> np.ndarray:
    return np.median(values, axis=-1) if agg == "median" else values.mean(-1)


@dataclass
class Sample:
    """The runs behind one cell: each run's seed and test value and, when every run has them, its
    per-example results (``ExamplePredictions``, all on the same test examples)."""
    task_type: str
    metric: str
    seeds: list
    values: np.ndarray
    agg: str = "median"
    examples: list | None = None

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        self.classes = max(class_count(e.fields) for e in self.examples) \
            if self.examples and self.task_type == "classification" else 0

    @property
    def size(self) -> int:
        """Test examples per run (0 without per-example results)."""
        return len(self.examples[0]) if self.examples else 0

    def run_values(self, idx: np.ndarray) -> np.ndarray:
        """Each run's metric on each example resample: idx (B, n) -> (S, B)."""
        return np.stack([metric_values(self.task_type, self.metric, {k: v[idx] for k, v in e.fields.items()},
                                       self.classes) for e in self.examples])

    def statistic(self, positions: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """The cell's value for each resample: ``positions`` (B, S') the runs drawn, ``idx`` (B, n) the
        examples drawn (None: each run's reported value)."""
        if idx is None:
            return _aggregate(self.values[positions], self.agg)
        per_run = self.run_values(idx)
        return _aggregate(per_run[positions, np.arange(len(idx))[:, None]], self.agg)


@dataclass
class Resampled:
    """A statistic and what a bootstrap resamples for it: ``data``, arrays each drawn with replacement
    independently; ``fn(*drawn)`` maps their draws, shape (B, len), to the statistic, shape (B,)."""
    data: tuple
    fn: Callable
    name: str = ""

    def __call__(self, *arrays, axis=-1):
        single = all(np.ndim(a) == 1 for a in arrays)
        out = self.fn(*(np.atleast_2d(a) for a in arrays))
        return out[0] if single else out


def _draws(sample: Sample, seeds: bool, examples: bool) -> tuple[tuple, Callable]:
    """What to resample for a sample (run positions, example positions) and how it gives the statistic."""
    data = ((np.arange(len(sample.values)),) if seeds else ()) + ((np.arange(sample.size),) if examples else ())

    def fn(*drawn):
        batch = len(drawn[0])
        positions = drawn[0] if seeds else np.zeros((batch, 1), dtype=np.int64)
        return sample.statistic(positions, drawn[-1] if examples else None)
    return data, fn


def cell_resampled(sample: Sample, name: str = "") -> Resampled | None:
    """The cell's bootstrap; None when there is nothing to resample (one seed, no per-example results)."""
    seeds, examples = len(sample.values) > 1, bool(sample.examples)
    if not seeds and not examples:
        return None
    return Resampled(*_draws(sample, seeds, examples), name=name)


def combine(parts: list[Resampled], weights: list[float], name: str = "") -> Resampled:
    """sum(weight * part) of independently resampled parts (e.g. the mean of several tasks' cells)."""
    cuts = np.cumsum([0] + [len(p.data) for p in parts])

    def fn(*drawn):
        return sum(w * p.fn(*drawn[lo:hi]) for p, w, lo, hi in zip(parts, weights, cuts[:-1], cuts[1:]))
    return Resampled(tuple(a for p in parts for a in p.data), fn, name)


def interval(resampled: Resampled, seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of a statistic (``scipy.stats.bootstrap``)."""
    longest = max(len(a) for a in resampled.data)
    result = bootstrap(resampled.data, resampled, n_resamples=resamples, batch=max(1, _GATHERED // longest),
                       vectorized=True, paired=False, axis=-1, confidence_level=level, method="percentile",
                       rng=generator(seed, "interval", resampled.name))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass
class Pairing:
    """Two cells on the runs of their common seeds and, when both have per-example results on the
    same test examples, example by example."""
    a: Sample
    b: Sample
    seeds: list
    examples: bool

    @property
    def units(self) -> str:
        return "seeds and test examples" if self.examples else "seeds"

    def _positions(self, sample: Sample) -> np.ndarray:
        return np.array([sample.seeds.index(s) for s in self.seeds])

    def difference(self, name: str = "") -> Resampled:
        """a - b, resampling the common seeds and (paired) the examples, the same draws for both."""
        pa, pb = self._positions(self.a), self._positions(self.b)
        seeds = len(self.seeds) > 1
        data = ((np.arange(len(self.seeds)),) if seeds else ()) + ((np.arange(self.a.size),) if self.examples else ())

        def fn(*drawn):
            positions = drawn[0] if seeds else np.zeros((len(drawn[0]), 1), dtype=np.int64)
            idx = drawn[-1] if self.examples else None
            return self.a.statistic(pa[positions], idx) - self.b.statistic(pb[positions], idx)
        return Resampled(data, fn, name)

    def p_value(self, seed: int, resamples: int = RESAMPLES, name: str = "") -> float:
        """Two-sided p-value of "a and b are exchangeable on every unit" (``scipy.stats.permutation_test``,
        paired: each unit's two results swapped at random; exact when 2^units <= ``resamples``)."""
        pa, pb = self._positions(self.a), self._positions(self.b)
        if self.examples:
            runs, n = len(self.seeds), self.a.size
            tables = {k: np.concatenate([np.stack([self.a.examples[i].fields[k] for i in pa]).ravel(),
                                         np.stack([self.b.examples[i].fields[k] for i in pb]).ravel()])
                      for k in self.a.examples[0].fields}
            classes = max(self.a.classes, self.b.classes)

            def side(units):
                fields = {k: v[units].reshape(len(units), runs, n) for k, v in tables.items()}
                return _aggregate(metric_values(self.a.task_type, self.a.metric, fields, classes), self.a.agg)
            data = (np.arange(runs * n), np.arange(runs * n) + runs * n)
        else:
            def side(values):
                return _aggregate(values, self.a.agg)
            data = (self.a.values[pa], self.b.values[pb])

        def statistic(x, y, axis=-1):
            single = np.ndim(x) == 1
            out = side(np.atleast_2d(x)) - side(np.atleast_2d(y))
            return out[0] if single else out
        result = permutation_test(data, statistic, permutation_type="samples", vectorized=True,
                                  n_resamples=resamples, batch=max(1, _GATHERED // len(data[0])),
                                  alternative="two-sided", axis=-1, rng=generator(seed, "p", name))
        return float(min(1.0, result.pvalue))


def pairing(a: Sample, b: Sample) -> Pairing | None:
    """How two cells pair: on their common seeds, example by example when every run of both scored
    the same test examples; None when they share neither a seed nor per-example results."""
    seeds = [s for s in dict.fromkeys(a.seeds) if s in b.seeds]
    examples = bool(a.examples and b.examples and a.task_type == b.task_type and a.metric == b.metric
                    and all(a.examples[0].pairs_with(e) for e in a.examples[1:] + b.examples))
    if not seeds:
        return None
    if len(seeds) < 2 and not examples:
        return None
    return Pairing(a, b, seeds, examples)


def difference(a: Sample, b: Sample, name: str = "") -> Resampled | None:
    """a - b: paired when they pair, else resampled independently; None when neither can be resampled."""
    paired = pairing(a, b)
    if paired is not None:
        return paired.difference(name)
    ra, rb = cell_resampled(a), cell_resampled(b)
    return None if ra is None or rb is None else combine([ra, rb], [1.0, -1.0], name)


def joint_distributions(samples: dict[str, Sample], seed: int, resamples: int = RESAMPLES,
                        name: str = "") -> dict[str, np.ndarray]:
    """Each row's statistic over the same ``resamples`` resamples: rows with the same seeds draw the same
    seed positions, rows on the same test examples the same example positions (so the comparison
    between rows is paired wherever it can be)."""
    rng = generator(seed, "joint", name)
    seed_draws, example_draws, out = {}, [], {}  # example_draws: (a test set's results, its draws)
    for row, sample in samples.items():
        key = tuple(sample.seeds)
        if key not in seed_draws:
            seed_draws[key] = rng.integers(0, len(sample.values), (resamples, len(sample.values)))
        idx = None
        if sample.examples:
            ex = sample.examples[0]
            idx = next((draws for other, draws in example_draws if other.pairs_with(ex)), None)
            if idx is None:
                idx = rng.integers(0, len(ex), (resamples, len(ex)))
                example_draws.append((ex, idx))
        step = max(1, _GATHERED // max(1, sample.size))
        out[row] = np.concatenate([sample.statistic(seed_draws[key][i:i + step],
                                                    None if idx is None else idx[i:i + step])
                                   for i in range(0, resamples, step)])
    return out


def rank_stability(distributions: dict[str, np.ndarray], higher_is_better: bool) -> dict[str, tuple[float, float]]:
    """Per row: the share of resamples in which it ranks first (ties share the first place) and its
    mean rank (ties get the mean of their places)."""
    rows = list(distributions)
    values = np.stack([distributions[r] for r in rows])  # (rows, B)
    score = -values if higher_is_better else values
    first = rankdata(score, axis=0, method="min") == 1
    mean = rankdata(score, axis=0, method="average").mean(1)
    return {row: (float(first[i].mean()), float(mean[i])) for i, row in enumerate(rows)}
