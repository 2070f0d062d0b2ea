"""Attacks by name, from IBM ART (:mod:`.art_attacks`): the targeted attacks that give a bank its data
and the evaluation suite."""
