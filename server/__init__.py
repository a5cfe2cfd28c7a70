"""The coordinator's side: from the sites' replies to a global model (docs/design.md §3).

``server_app`` is the Flower app; ``federation`` runs the stage-aware schedule (``server_config``: the
run config as the server reads it; ``replies``: the message exchange; ``counts`` and ``secure_counts``:
the counts round), ``strategies`` aggregate, ``checkpoints`` and ``history`` keep what each round produced.
"""
