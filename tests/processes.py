"""Helpers for tests that start real Flower processes on loopback (they live in the library, where
the simulation harness uses them too)."""
from simulations.engine import BIN, flwr_env, free_port, stop_process_group, wait_for_port

__all__ = ["BIN", "flwr_env", "free_port", "stop_process_group", "wait_for_port"]
