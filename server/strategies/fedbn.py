"""FedBN (Li et al., ICLR 2021): normalisation layers stay at each site; the rest is averaged.

Sites differ in scanner and protocol (covariate shift), which shows first in the feature
statistics; FedBN lets each site keep its own. The server never sends the normalisation keys
and sets ``local-norm`` in the config; a site then takes them from its own disk and leaves them
out of its reply (``client.client_app``), so they never leave the site. Aggregation is FedAvg's.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.records import LOCAL_NORM


class FedBN(FedAvg):
    """FedAvg over everything but ``local_keys`` (the state-dict keys of normalisation layers)."""

    def __init__(self, *args, local_keys: Iterable[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.local_keys = frozenset(local_keys)

    def _shared(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[LOCAL_NORM] = True
        return super().configure_train(server_round, self._shared(arrays), config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[LOCAL_NORM] = True
        return super().configure_evaluate(server_round, self._shared(arrays), config, grid)
