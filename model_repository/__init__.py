"""The serving side, torch-free: the Triton models' code (``<model>/1/model.py``, shipped as package data)
and what serves them: :mod:`model_repository.serving` (the served detector), :mod:`model_repository.writer`
(writes a model repository from a pipeline output folder) and :mod:`model_repository.server` (starts
and stops a real Triton server)."""
