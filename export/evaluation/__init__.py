"""Measuring the detector honestly: the evaluation report (:mod:`.report`), the design study
(:mod:`.design_study`), leave one attack family out (:mod:`.transfer`), query-based attackers through
the server (:mod:`.query_campaigns`), the clean-shift study (:mod:`.shift_study`) and the cost
benchmarks (:mod:`.bank_cost`, :mod:`.search_benchmark`)."""
