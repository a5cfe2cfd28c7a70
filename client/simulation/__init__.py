"""Simulation only: partition manifests and injected faults for virtual sites. A deployed site never loads it."""
