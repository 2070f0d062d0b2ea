"""Measuring the detector honestly: the evaluation report (:mod:`.report`), the design and transfer
studies (:mod:`.design_study`), the clean-shift study (:mod:`.shift_study`) and the cost benchmarks
(:mod:`.bank_cost`, :mod:`.search_benchmark`)."""
