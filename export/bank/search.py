"""The fingerprint search over a workspace's captured activations (Fisher, Shahar & Resheff, 2024,
Sec. 3.1-3.2): the bank of every class, bound to the data it was searched on.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from export.data.artifacts import load_activation_set, load_prepared
from export.data.workspace import Workspace
from export.models.activations import ActivationLayout
from kernels.bank import Bank
from kernels.fingerprint_search import SearchConfig, search_fingerprints


def searched_bank(ws: Workspace, config: SearchConfig = SearchConfig(), progress: bool = True) -> Bank:
    """Each class's fingerprints searched on the workspace's fit activations, as a bank (not saved)."""
    _, _, meta = load_prepared(ws)
    layout = ActivationLayout.load(ws.require(ws.activations / "layout.json", "capture"))
    config = replace(config, layer_starts=tuple(s.offset for s in layout.slices))
    clean, clean_meta = load_activation_set(ws, "fit_clean", mmap=False)
    attacked, attacked_meta = load_activation_set(ws, "fit_attacked", mmap=False)
    per_class = search_fingerprints(clean, clean_meta["label"], attacked, attacked_meta["label"],
                                    len(meta["class_names"]), config, progress)
    return Bank.from_fingerprints(per_class, layout.num_neurons, {
        "class_names": meta["class_names"], "layout": layout.to_json(), "search": config.to_json(),
        "search_results": [{"tried": fp.tried, "passed": fp.passed, "kept": len(fp.neurons),
                            "best_abs_d": float(np.abs(fp.cohen_d).max()) if len(fp.cohen_d) else None}
                           for fp in per_class]})


def bank_overlap(a: Bank, b: Bank) -> float:
    """Share of ``a``'s fingerprints (as neuron sets, within their class) that ``b`` also holds."""
    same = 0
    for c in range(a.num_classes):
        key = lambda bank, r: (c, tuple(bank.indices[r, : bank.lengths[r]]))  # noqa: E731
        theirs = {key(b, r) for r in range(b.class_offsets[c], b.class_offsets[c + 1])}
        same += sum(key(a, r) in theirs for r in range(a.class_offsets[c], a.class_offsets[c + 1]))
    return same / max(a.num_fingerprints, 1)
