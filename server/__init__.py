"""The coordinator's side: from the sites' replies to a global model (docs/design.md §3).

``server_app`` runs the stage-aware schedule, ``strategies`` aggregate, ``checkpoints`` and
``history`` keep what each round produced.
"""
