"""Summaries of timing samples, after pyperf: percentiles, mean and spread, and the warnings
that say a result should not be trusted.

>>> summarize_samples([3, 1, 2, 4])["p50"]
2.5
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

UNSTABLE_STDEV = 0.10  # pyperf warns when the standard deviation is >= 10% of the mean


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, interpolated linearly between the
    closest ranks (numpy's default method)."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0-100, not {q}")
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_samples(values: Sequence[float]) -> dict[str, float]:
    """n, min, p50, p90, p99, max, mean and (sample) standard deviation of ``values``."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples to summarize")
    return {
        "n": len(ordered), "min": ordered[0], "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90), "p99": percentile(ordered, 99), "max": ordered[-1],
        "mean": statistics.fmean(ordered),
        "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
    }


def _spread(values: Sequence[float]) -> float:
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean else 0.0


def warnings(run_means: Sequence[float], run_p50s: Sequence[float] = ()) -> list[str]:
    """pyperf's stability rule (standard deviation >= 10% of the mean) applied across runs:

    * ``unstable``: the runs' p50s, the figure the table reports, disagree;
    * ``disturbed``: the runs' means disagree while their p50s may not: a few long outliers
      (preemption, interrupts) in some runs. Raw round trips always have such a tail, so the
      rule is not applied to single samples; their stdev is reported as it is.
    """
    out = []
    if len(run_p50s) > 1 and _spread(run_p50s) >= UNSTABLE_STDEV:
        out.append(f"unstable: run p50s differ by {_spread(run_p50s):.0%}")
    if len(run_means) > 1 and _spread(run_means) >= UNSTABLE_STDEV:
        out.append(f"disturbed: run means differ by {_spread(run_means):.0%}")
    return out


def unstable_runs(run_p50s: Sequence[float], run_means: Sequence[float]) -> list[int]:
    """Indexes of the runs whose p50 or mean is off the median of all runs' by the instability
    threshold or more: a run a noisy neighbour disturbed, to be measured again, not pooled."""
    def off(values: Sequence[float]) -> set[int]:
        if len(values) < 3:  # with two runs neither is the odd one out
            return set()
        mid = statistics.median(values)
        return {i for i, v in enumerate(values) if mid and abs(v - mid) / mid >= UNSTABLE_STDEV}

    return sorted(off(run_p50s) | off(run_means))


def stable_p50(run_p50s: Sequence[float], run_means: Sequence[float] = ()) -> float:
    """The median of the p50s of the runs :func:`unstable_runs` keeps: what ratios are made of."""
    bad = set(unstable_runs(run_p50s, run_means or run_p50s))
    kept = [v for i, v in enumerate(run_p50s) if i not in bad] or list(run_p50s)
    return statistics.median(kept)


# Two-sided 95% critical values of Student's t by degrees of freedom; between rows the next
# lower row is used, which errs towards "not significant".
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
        25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000,
        120: 1.980}


def t95(df: float) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if df > 120:
        return 1.960
    return _T95[max(k for k in _T95 if k <= df)]


def significant(a: Sequence[float], b: Sequence[float]) -> tuple[bool, float]:
    """Welch's t-test at 95% on two sets of run means: (significant?, t score).

    With fewer than two values on a side there is no variance to test: never significant.
    Identical constant sets are not significant; different constant sets are.
    """
    if len(a) < 2 or len(b) < 2:
        return False, 0.0
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return ma != mb, math.copysign(math.inf, ma - mb) if ma != mb else 0.0
    t = (ma - mb) / math.sqrt(va + vb)
    # Welch-Satterthwaite degrees of freedom
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0) + (vb ** 2 / (len(b) - 1) if vb else 0))
    return abs(t) >= t95(df), t
