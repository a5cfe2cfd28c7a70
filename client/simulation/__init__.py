"""Simulation only: partition manifests, injected faults for virtual sites and the simulation's ClientApp
(``client.simulation.app``). A deployed site never loads it."""
