"""The white-box attacker with a local copy and what is tried against it: the detector-aware attack
(:mod:`.attacker`), the defences (:mod:`.defences`), the experiment (:mod:`.whitebox`) and its report
(:mod:`.report`)."""
