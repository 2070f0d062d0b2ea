"""Does the false-positive rate still hold? A window of live scores against the calibration reference.

A threshold set on clean calibration images keeps its false-positive rate only while clean traffic
scores like those images did: new cameras, lighting or preprocessing move the clean scores and the
rate with them. The served models export the standardized score of every checked input as a
Prometheus histogram (``nfp_score``) whose buckets are the :data:`kernels.calibration.DRIFT_LEVELS`
quantiles of the held-out clean calibration scores (``Calibration.reference``), and the inputs and
flags per predicted class. :func:`compare` tests a window of them:

- **score shift**: Pearson's chi-square test of homogeneity between the reference's and the window's
  bucket counts (a two-sample test: the reference is itself a sample of ``n`` images), which sees a
  shift anywhere in the distribution, also one that lowers the flag rate (a detector gone blind);
- **flag rate**: the exact one-sided binomial test of ``flagged / inputs`` against the nominal rate.

An alarm is raised when either p-value is below ``alpha``. Both assume the window's inputs are
distinct clean images: attacks in the window also shift the scores, and one image sent many times is
one observation, not many. So watch traffic believed clean (a canary stream, a sample checked later),
or read an alarm as "clean traffic changed, or attacks arrived" and recalibrate only on the former.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kernels.errors import InvalidInputError


@dataclass(frozen=True)
class ScoreWindow:
    """Scores of a window of live traffic, as the served histogram holds them.

    Attributes:
        cumulative: ``(B,)`` inputs whose standardized score was at most each reference edge.
        scored: inputs with a score (checked ones).
        inputs: inputs answered (checked or not).
        flagged: inputs flagged as attacked.
    """

    cumulative: np.ndarray
    scored: int
    inputs: int
    flagged: int

    def __sub__(self, earlier: "ScoreWindow") -> "ScoreWindow":
        """The window between two cumulative readings of the server's metrics."""
        return ScoreWindow(self.cumulative - earlier.cumulative, self.scored - earlier.scored,
                           self.inputs - earlier.inputs, self.flagged - earlier.flagged)

    @classmethod
    def of_metrics(cls, reading: dict[str, Any]) -> "ScoreWindow":
        """From what ``client.metrics.score_histogram`` read off the server."""
        return cls(np.asarray(reading["cumulative"], np.int64), reading["scored"], reading["inputs"], reading["flagged"])

    @classmethod
    def of_scores(cls, scores: np.ndarray, flagged: np.ndarray, edges: np.ndarray) -> "ScoreWindow":
        """The window of standardized ``scores (B,)`` (NaN: unchecked) and ``flagged (B,) bool``."""
        scored = scores[np.isfinite(scores)]
        return cls((scored[None, :] <= np.asarray(edges)[:, None]).sum(1), len(scored), len(scores),
                   int(np.sum(flagged)))


@dataclass(frozen=True)
class DriftReport:
    """What :func:`compare` found; ``alarm`` when either test rejects at ``alpha``."""

    inputs: int
    scored: int
    flag_rate: float
    flag_rate_ci95: tuple[float, float]
    nominal_fpr: float
    flag_p_value: float
    shift_p_value: float
    shares: dict[str, list[float]] = field(default_factory=dict)
    alpha: float = 0.01

    @property
    def alarm(self) -> bool:
        return min(self.flag_p_value, self.shift_p_value) < self.alpha

    def reasons(self) -> list[str]:
        out = []
        if self.flag_p_value < self.alpha:
            out.append(f"the flag rate {self.flag_rate:.2%} is above the nominal {self.nominal_fpr:.2%} "
                       f"(binomial p = {self.flag_p_value:.2g})")
        if self.shift_p_value < self.alpha:
            out.append(f"the clean score distribution moved away from the calibration's "
                       f"(chi-square p = {self.shift_p_value:.2g})")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"alarm": self.alarm, "reasons": self.reasons(), "inputs": self.inputs, "scored": self.scored,
                "flag_rate": self.flag_rate, "flag_rate_ci95": list(self.flag_rate_ci95),
                "nominal_fpr": self.nominal_fpr, "flag_p_value": self.flag_p_value,
                "shift_p_value": self.shift_p_value, "alpha": self.alpha, "shares": self.shares}

    def to_text(self) -> str:
        lo, hi = self.flag_rate_ci95
        lines = [f"window: {self.inputs} inputs, {self.scored} scored",
                 f"flag rate {self.flag_rate:.2%} (95% CI {lo:.2%}-{hi:.2%}) at nominal {self.nominal_fpr:.2%}: "
                 f"binomial p = {self.flag_p_value:.3g}",
                 f"score distribution against the calibration reference: chi-square p = {self.shift_p_value:.3g}",
                 "share of scores at or below each reference quantile (reference -> window):",
                 "  " + ", ".join(f"{e}: {r:.1%} -> {w:.1%}" for e, r, w in
                                  zip(self.shares["edge"], self.shares["reference"], self.shares["window"]))]
        verdict = "; ".join(self.reasons()) if self.alarm else f"the false-positive rate holds (alpha {self.alpha:g})"
        return "\n".join(lines + [("ALARM: " if self.alarm else "OK: ") + verdict])


def compare(reference: dict[str, Any], window: ScoreWindow, nominal_fpr: float, alpha: float = 0.01) -> DriftReport:
    """Test ``window`` against a calibration ``reference`` (``Calibration.reference``: edges,
    cumulative counts of its ``n`` held-out clean scores) at the operating rate ``nominal_fpr``."""
    from scipy.stats import binomtest, chi2_contingency

    if window.inputs < 1 or window.scored < 1:
        raise InvalidInputError("the window holds no scored inputs: send traffic or widen the window")
    if not 0 < alpha < 1 or not 0 < nominal_fpr < 1:
        raise InvalidInputError(f"alpha and the nominal FPR must lie in (0, 1), got {alpha} and {nominal_fpr}")
    edges = np.asarray(reference["edges"], np.float64)
    ref_cum, live_cum = np.asarray(reference["cumulative"]), np.asarray(window.cumulative)
    if live_cum.shape != edges.shape:
        raise InvalidInputError(f"the window has {live_cum.size} buckets, the reference {edges.size}: "
                                f"the served bank is not the one whose calibration was given")
    bucket = lambda cum, n: np.diff(np.r_[0, cum, n])  # noqa: E731 (counts per bucket, the last above every edge)
    table = np.stack([bucket(ref_cum, reference["n"]), bucket(live_cum, window.scored)])
    table = table[:, table.sum(0) > 0]
    shift_p = float(chi2_contingency(table, correction=False)[1]) if table.shape[1] > 1 else 1.0
    flags = binomtest(int(window.flagged), int(window.inputs), nominal_fpr, alternative="greater")
    ci = binomtest(int(window.flagged), int(window.inputs), nominal_fpr).proportion_ci(0.95, method="wilson")
    shares = {"edge": [round(float(e), 3) for e in edges], "reference": (ref_cum / reference["n"]).tolist(),
              "window": (live_cum / window.scored).tolist()}
    return DriftReport(window.inputs, window.scored, window.flagged / window.inputs, (float(ci.low), float(ci.high)),
                       nominal_fpr, float(flags.pvalue), shift_p, shares, alpha)


def watch(calibration, fpr: float, read: Callable[[], ScoreWindow], window_s: float, alpha: float = 0.01,
          during: Callable[[], Any] | None = None) -> DriftReport:
    """:func:`compare` the next ``window_s`` seconds of a server's scores (``read()``: its cumulative
    histogram now; ``window_s`` 0: everything since it started) with the served detector's
    ``calibration`` at its operating rate ``fpr``; ``during()``, if given, runs inside the window."""
    if calibration.reference is None:
        raise InvalidInputError("the served bank has no calibration reference (calibrated by an older version): "
                                "run `nfp calibrate` and export it again")
    start = time.monotonic()
    first = read() if window_s > 0 else ScoreWindow(np.zeros(len(calibration.reference["edges"]), np.int64), 0, 0, 0)
    if during is not None:
        during()
    time.sleep(max(0.0, window_s - (time.monotonic() - start)))
    return compare(calibration.reference, read() - first, fpr, alpha)
