"""The served models' Prometheus metrics, read from Triton's metrics endpoint.

Parsed with the Prometheus project's own text-format parser (``prometheus_client``), not by hand.
"""
from __future__ import annotations

import urllib.request

DETECTOR_COUNTERS = ("nfp_inputs_total", "nfp_flagged_total", "nfp_unchecked_total", "nfp_kernel_microseconds_total",
                     "nfp_queries_total", "nfp_query_flagged_total")


def _samples(metrics_url: str, timeout_s: float):
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=timeout_s).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def detector_counters(metrics_url: str, model: str, timeout_s: float = 10.0) -> dict[str, float]:
    """``{counter: value}`` of the served detector ``model`` (``fingerprint_detector`` or
    ``guarded_classifier_fused``) so far, summed over predicted classes; 0 for a counter the server has
    not exported yet."""
    values = dict.fromkeys(DETECTOR_COUNTERS, 0.0)
    for sample in _samples(metrics_url, timeout_s):
        if sample.name in values and sample.labels.get("model") == model:
            values[sample.name] += sample.value
    return values


def signature_verified(metrics_url: str, timeout_s: float = 10.0) -> dict[str, bool]:
    """``{model: verified}``: whether each served model's folder was checked against its signature at
    load (the ``nfp_signature_verified`` gauge; :func:`model_repository.signing.verify_if_required`)."""
    return {s.labels["model"]: s.value == 1.0 for s in _samples(metrics_url, timeout_s)
            if s.name == "nfp_signature_verified"}


def score_histogram(metrics_url: str, model: str, buckets: int, predicted_class: int | None = None,
                    timeout_s: float = 10.0) -> dict[str, object]:
    """Everything ``model`` scored so far, as ``nfp drift`` reads it (:class:`kernels.drift.ScoreWindow`
    fields): ``cumulative``, the ``nfp_score`` histogram's counts at its ``buckets`` finite edges (the
    calibration reference's); ``scored``; and the ``inputs`` and ``flagged`` counters; summed over
    predicted classes or of ``predicted_class`` alone."""
    from kernels.errors import InvalidInputError

    edges: dict[str, list[tuple[float, float]]] = {}
    totals = dict.fromkeys(("nfp_score_count", "nfp_inputs_total", "nfp_flagged_total"), 0.0)
    for sample in _samples(metrics_url, timeout_s):
        labels = sample.labels
        if labels.get("model") != model or (predicted_class is not None and labels.get("class") != str(predicted_class)):
            continue
        if sample.name == "nfp_score_bucket" and float(labels["le"]) < float("inf"):
            edges.setdefault(labels.get("class", ""), []).append((float(labels["le"]), sample.value))
        elif sample.name in totals:
            totals[sample.name] += sample.value
    cumulative = [0] * buckets
    for c, values in edges.items():  # the server prints the edges rounded: match them by order
        if len(values) != buckets:
            raise InvalidInputError(f"{model} exports {len(values)} score buckets for class {c}, the calibration "
                                    f"reference has {buckets}: is it serving this bank?")
        cumulative = [a + int(v) for a, (_, v) in zip(cumulative, sorted(values))]
    return {"cumulative": cumulative, "scored": int(totals["nfp_score_count"]),
            "inputs": int(totals["nfp_inputs_total"]), "flagged": int(totals["nfp_flagged_total"])}
