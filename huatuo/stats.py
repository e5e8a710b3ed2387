"""Confidence intervals for the RL benches: numbers in, estimates out, no side effects.

    gain = paired_difference(sft_rewards, ppo_rewards)   # same questions, same order
    trend = slope(updates, train_rewards)
    print(gain.text(), gain.above_zero, trend.text())

paired_difference bootstraps over questions (seeded), so its interval says how much the gain depends on
which questions were asked. slope is the ordinary least-squares slope with its t-based interval from the
slope's standard error; the t quantile is computed here (exact for the integer degrees of freedom of a
regression), so nothing beyond numpy is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval [low, high]."""

    value: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def above_zero(self) -> bool:
        return self.low > 0

    def text(self, digits: int = 3) -> str:
        percent = f"{self.confidence:.0%}"
        return f"{self.value:+.{digits}f} ({percent} CI {self.low:+.{digits}f} to {self.high:+.{digits}f})"


def paired_difference(
    baseline: Sequence[float],
    treatment: Sequence[float],
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Estimate:
    """Mean of treatment[i] - baseline[i] over paired items, with a percentile bootstrap interval that
    resamples the items (with replacement) n_resamples times from a generator seeded with `seed`."""
    a, b = np.asarray(baseline, dtype=float), np.asarray(treatment, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two lists of the same length, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("paired_difference needs at least one pair")
    _check_confidence(confidence)
    differences = b - a
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(n_resamples, len(differences)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(float(differences.mean()), float(low), float(high), confidence)


def slope(xs: Sequence[float], ys: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Least-squares slope of ys on xs, with the interval slope +- t * standard error on n - 2 degrees of
    freedom. Two points fit a line exactly and leave no residual to judge it by: the interval is then
    unbounded."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"xs and ys must be two lists of the same length, got {x.shape} and {y.shape}")
    _check_confidence(confidence)
    sxx = float(((x - x.mean()) ** 2).sum())
    if len(x) < 2 or sxx == 0:
        raise ValueError("a slope needs at least two distinct x values")
    b = float(((x - x.mean()) * (y - y.mean())).sum()) / sxx
    if len(x) == 2:
        return Estimate(b, -math.inf, math.inf, confidence)
    intercept = y.mean() - b * x.mean()
    residuals = y - (intercept + b * x)
    df = len(x) - 2
    standard_error = math.sqrt(float((residuals**2).sum()) / df / sxx)
    half_width = t_critical(confidence, df) * standard_error
    return Estimate(b, b - half_width, b + half_width, confidence)


def t_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df, by the finite series of Abramowitz and Stegun 26.7.3-4
    in theta = atan(t / sqrt(df))."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2 == 0:
        for k in range(2, df, 2):  # 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ... up to c^(df-2)
            term *= c2 * (k - 1) / k
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(3, df, 2):  # 1 + (2/3) c^2 + (2*4)/(3*5) c^4 + ... up to c^(df-3)
        term *= c2 * (k - 1) / k
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_critical(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = confidence on df degrees of freedom (two-sided), found by bisection."""
    _check_confidence(confidence)
    low, high = 0.0, 1.0
    while t_coverage(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_coverage(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
