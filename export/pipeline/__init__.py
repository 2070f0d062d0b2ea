"""The offline pipeline's stages in order (:mod:`.stages`: prepare, train, attack, capture, search,
calibrate, evaluate, export), each reading and writing one workspace."""
