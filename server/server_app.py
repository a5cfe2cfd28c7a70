"""The coordinator's Flower ServerApp: ``main`` runs one federation (``server.federation``) on the grid."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context.run_config)
