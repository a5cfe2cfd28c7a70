"""The coordinator's Flower ServerApp: ``main`` runs one federation on the grid: the deep model's
(``server.federation``) or the radiomics baseline's (``server.radiomics``)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.run_config import parse_run_config
from server.federation import run_federation
from server.radiomics import run_radiomics_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The deep model's stage-aware schedule, or with ``radiomics.rounds`` > 0 the radiomics baseline's."""
    if parse_run_config(context.run_config).radiomics.rounds:
        run_radiomics_federation(grid, context.run_config)
    else:
        run_federation(grid, context.run_config)
