"""The served models' Prometheus metrics, read from Triton's metrics endpoint.

Parsed with the Prometheus project's own text-format parser (``prometheus_client``), not by hand.
"""
from __future__ import annotations

import urllib.request

DETECTOR_COUNTERS = ("nfp_inputs_total", "nfp_flagged_total", "nfp_unchecked_total", "nfp_kernel_microseconds_total")


def _samples(metrics_url: str, timeout_s: float):
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=timeout_s).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def detector_counters(metrics_url: str, model: str, timeout_s: float = 10.0) -> dict[str, float]:
    """``{counter: value}`` of the served detector ``model`` (``fingerprint_detector`` or
    ``guarded_classifier_fused``) so far; 0 for a counter the server has not exported yet."""
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
