"""The fingerprint bank: its search (:mod:`.search`), its thresholds (:mod:`.calibrate`), the build as
one Ray task per class (:mod:`.ray_build`), rotation under a fresh secret seed (:mod:`.rotation`),
synthetic banks for serving benchmarks (:mod:`.synthetic`) and the one-call Python API
(:mod:`.fit`: model and images -> calibrated detector)."""
