"""Experiments as files: ``simulations/experiments/<name>.toml`` read into typed dataclasses.

An experiment is scenarios x methods x seeds under one training budget:

- a **scenario** says how the data become sites (``simulations.splits``): natural sites, the
  ``site`` column of a pooled dataset's labels.csv, Dirichlet label skew, quantity skew, an IID split, with optional scanner shift, faulty
  sites, and leave-one-site-out;
- a **method** is ``local`` (each site alone), ``pooled`` (all training patients in one place),
  ``federated`` (the Flower ServerApp/ClientApp on the simulation engine),
  ``location-finetune`` (paper §5.1.2) or ``radiomics`` (the handcrafted-feature baseline of
  ``simulations.radiomics_methods``, fitted per site, pooled or federated, on the masks of another
  method's U-Net), each with run-config overrides (the keys of
  ``[tool.flwr.app.config]``: ``model.*``, ``preprocess.*``, ``train.*``, ``strategy.*``), which the
  baselines read exactly as the federation does;
- the **budget** (rounds x local steps x batch size) is the same for every method: a federated
  run's sites together see ``rounds x local_steps x batch x sites`` samples per stage, the pooled
  model as many, every local model its site's share (``samples seen``, not epochs).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from client.simulation.faults import parse_fault
from common.config import MARKERS, check_known_keys

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
METHOD_KINDS: tuple[str, ...] = ("local", "pooled", "federated", "location-finetune", "radiomics")
#: Where a radiomics method's regression is fitted (``simulations.radiomics_methods``).
RADIOMICS_SCOPES: tuple[str, ...] = ("local", "pooled", "federated")
#: Kinds whose one trained U-Net a radiomics method can take its validation and test masks from (a
#: local method holds one per site).
UNET_KINDS: tuple[str, ...] = ("pooled", "federated")
SPLITS: tuple[str, ...] = ("natural", "site-column", "dirichlet", "quantity", "iid")


#: ``train.local-epochs`` under a budget: high enough never to cut a round's steps short (a site with
#: fewer training slices than its steps x batch loops over them; the pooled and local baselines do too).
BUDGET_EPOCHS = 1000


@dataclass(frozen=True)
class Budget:
    """Per stage: ``rounds`` of ``local_steps`` optimizer steps of ``batch_size`` slices per site."""

    rounds_stage1: int = 4
    rounds_stage2: int = 4
    local_steps: int = 16
    local_steps_stage2: int = 0  # 0: local_steps
    batch_size: int = 8
    batch_size_stage2: int = 0  # 0: batch_size
    val_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if min(self.rounds_stage1, self.rounds_stage2) < 0 or self.rounds_stage1 + self.rounds_stage2 == 0:
            raise ValueError(
                f"budget rounds must be >= 0 and not both 0, got {self.rounds_stage1}, {self.rounds_stage2}"
            )
        if self.local_steps < 1 or self.batch_size < 1 or self.local_steps_stage2 < 0:
            raise ValueError("budget local_steps and batch_size must be >= 1")
        if not (0 <= self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError("budget val_fraction and test_fraction must leave a training split")

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)

    def run_config(self) -> dict[str, Any]:
        """The budget as run-config values (what the ServerApp and ClientApp read)."""
        return {
            "rounds.stage1": self.rounds_stage1,
            "rounds.stage2": self.rounds_stage2,
            "train.local-steps": self.local_steps,
            "train.local-steps-stage2": self.local_steps_stage2,
            "train.local-epochs": BUDGET_EPOCHS,  # the budget is in steps: a site loops its slices until they are done
            "train.batch-size": self.batch_size,
            "train.batch-size-stage2": self.batch_size_stage2,
            "data.val-fraction": self.val_fraction,
            "data.test-fraction": self.test_fraction,
        }


@dataclass(frozen=True)
class Scenario:
    """How one dataset becomes the sites of one comparison (``simulations.splits``)."""

    name: str = "natural"
    split: str = "natural"
    n_sites: int = 12  # virtual sites of a pooled split (ignored by natural / site-column)
    alpha: float = 0.5  # Dirichlet concentration: label skew (dirichlet) or sizes (quantity)
    shift: float = 0.0  # scanner shift severity 0..1 (noise, blur, HU offset, resolution per site)
    leave_out: str = ""  # "": none; "all": every site in turn; or one site id
    bad_sites: int = 0  # robustness: the first k sites (sorted) misbehave ...
    fault: Mapping[str, Any] = field(default_factory=dict)  # ... like this (client.simulation.faults)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"scenario {self.name!r}: split must be one of {list(SPLITS)}, got {self.split!r}")
        if not 0.0 <= self.shift <= 1.0:
            raise ValueError(f"scenario {self.name!r}: shift must be in [0, 1], got {self.shift}")
        if self.alpha <= 0 or self.n_sites < 2:
            raise ValueError(f"scenario {self.name!r}: alpha must be > 0 and n_sites >= 2")
        if self.bad_sites and not self.fault:
            raise ValueError(f"scenario {self.name!r}: bad_sites = {self.bad_sites} needs a fault table")


@dataclass(frozen=True)
class Method:
    """One way of training: its kind and its run-config overrides."""

    name: str
    kind: str
    run_config: Mapping[str, Any] = field(default_factory=dict)
    split_by: str = "patient"  # "slice": the paper's random slice split (§5.1.1), pooled/local only
    finetune_steps: int = 0  # location-finetune: U-Net steps per location (0 = one stage-1 budget)
    scope: str = "pooled"  # radiomics: the regression per site (local), on all sites (pooled) or federated
    unet_from: str = ""  # radiomics: the (earlier) method whose trained U-Net segments the validation and test studies

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {list(METHOD_KINDS)}, got {self.kind!r}")
        if self.split_by not in ("patient", "slice"):
            raise ValueError(f"method {self.name!r}: split_by must be 'patient' or 'slice'")
        if self.split_by == "slice" and self.kind in ("federated", "radiomics"):
            raise ValueError(f"method {self.name!r}: a {self.kind} method always splits by patient at every site")
        self._check_radiomics()

    def _check_radiomics(self) -> None:
        """``scope`` and ``unet_from`` belong to radiomics methods, which need both to be sensible."""
        if self.kind != "radiomics":
            if self.scope != "pooled" or self.unet_from:
                raise ValueError(f"method {self.name!r}: scope and unet_from are for kind = 'radiomics' methods")
            return
        if self.scope not in RADIOMICS_SCOPES:
            raise ValueError(f"method {self.name!r}: scope must be one of {list(RADIOMICS_SCOPES)}, got {self.scope!r}")
        if not self.unet_from:
            raise ValueError(
                f"method {self.name!r}: a radiomics method needs unet_from, the name of an earlier pooled or "
                "federated method whose trained U-Net segments the validation and test studies"
            )

    @property
    def needs_engine(self) -> bool:
        """Whether the method runs on Flower's simulation engine."""
        return self.kind == "federated" or (self.kind == "radiomics" and self.scope == "federated")


@dataclass(frozen=True)
class Comparison:
    """A planned paired comparison: ``a`` minus ``b`` in one marker's study AUROC (``[[comparisons]]``),
    e.g. a method with SNGAN augmentation against the same method without."""

    a: str
    b: str
    marker: str

    def __post_init__(self) -> None:
        if self.marker not in MARKERS:
            raise ValueError(
                f"comparison {self.a!r} - {self.b!r}: marker must be one of {list(MARKERS)}, got {self.marker!r}"
            )


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    seeds: tuple[int, ...]
    budget: Budget
    scenarios: tuple[Scenario, ...]
    methods: tuple[Method, ...]
    run_config: Mapping[str, Any] = field(default_factory=dict)  # overrides shared by every method
    paper: Mapping[str, Any] = field(default_factory=dict)  # the source paper's figures, for the report
    comparisons: tuple[Comparison, ...] = ()  # planned paired differences in one marker's AUROC
    source: str = ""

    def method_run_config(self, method: Method) -> dict[str, Any]:
        """Run-config overrides of one method: budget, then the experiment's, then the method's. A
        radiomics method reads its U-Net method's under its own (the same preprocessing and model,
        so the same site caches)."""
        unet = self.method_named(method.unet_from).run_config if method.kind == "radiomics" else {}
        return {**self.budget.run_config(), **self.run_config, **unet, **method.run_config}

    def method_named(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"experiment {self.name!r} has no method {name!r}; methods: {[m.name for m in self.methods]}")


def _build(cls: type, d: Mapping[str, Any], what: str):
    check_known_keys(cls, d, what)
    return cls(**d)


def parse_experiment(doc: Mapping[str, Any], source: str = "") -> Experiment:
    """An experiment from its TOML table; unknown keys are errors naming the file."""
    where = source or "experiment"
    allowed = {f.name for f in fields(Experiment)} - {"source"}
    unknown = set(doc) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(allowed)}")
    methods = tuple(_build(Method, m, f"{where}: method") for m in doc.get("methods", []))
    if not methods:
        raise ValueError(f"{where}: no [[methods]]")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: method names must be unique, got {names}")
    check_unet_sources(methods, where)
    scenarios = tuple(_build(Scenario, s, f"{where}: scenario") for s in doc.get("scenarios", [{}]))
    comparisons = tuple(_build(Comparison, c, f"{where}: comparison") for c in doc.get("comparisons", []))
    for c in comparisons:
        if {c.a, c.b} - set(names):
            raise ValueError(f"{where}: comparison {c.a!r} - {c.b!r} names a method that is not in [[methods]] {names}")
    seeds = tuple(int(s) for s in doc.get("seeds", [0]))
    if not seeds:
        raise ValueError(f"{where}: seeds is empty")
    experiment = Experiment(
        name=str(doc.get("name", Path(source).stem or "experiment")),
        description=str(doc.get("description", "")),
        seeds=seeds,
        budget=_build(Budget, doc.get("budget", {}), f"{where}: budget"),
        scenarios=scenarios,
        methods=methods,
        run_config=dict(doc.get("run_config", {})),
        paper=dict(doc.get("paper", {})),
        comparisons=comparisons,
        source=source,
    )
    check_faults_without_secure_updates(experiment, where)
    return experiment


def check_faults_without_secure_updates(experiment: Experiment, where: str) -> None:
    """No federated method with ``privacy.secure-updates`` beside a scenario whose faulty sites corrupt their
    update or its weight: the site masks both inside its train handler, before the simulation's fault mod
    could corrupt them (``client.simulation.app``), so every faulty site's train round would fail."""
    masked = [
        m.name
        for m in experiment.methods
        if m.kind == "federated" and experiment.method_run_config(m).get("privacy.secure-updates")
    ]
    if not masked:
        return
    corrupting = [s.name for s in experiment.scenarios if s.bad_sites and not parse_fault(s.fault).corrupts_data]
    if corrupting:
        raise ValueError(
            f"{where}: scenario(s) {corrupting} have sites that corrupt their update, which privacy.secure-updates "
            f"masks before the fault is injected; run method(s) {masked} without secure updates, or use a "
            "'label-flip' fault"
        )


def check_unet_sources(methods: tuple[Method, ...], where: str) -> None:
    """Every radiomics method's ``unet_from`` names a pooled or federated method listed before it
    (the runner trains methods in the file's order and keeps each one's trained model)."""
    for i, m in enumerate(methods):
        if m.kind != "radiomics":
            continue
        earlier = {e.name: e for e in methods[:i]}
        source = earlier.get(m.unet_from)
        if source is None:
            later = " (it is listed after it: move it up)" if m.unet_from in {e.name for e in methods} else ""
            raise ValueError(
                f"{where}: radiomics method {m.name!r}: unet_from {m.unet_from!r} is not a method listed before it{later}"
            )
        if source.kind not in UNET_KINDS:
            raise ValueError(
                f"{where}: radiomics method {m.name!r}: unet_from {m.unet_from!r} is a {source.kind} method; "
                f"it must be one of kind {list(UNET_KINDS)} (one trained U-Net for every site)"
            )


def federated_run_name(run: str, scenario: str, method: str, seed: int | str) -> str:
    """The folder (and Flower ``output.name``) of one federated run of simulation output ``run``:
    only characters safe in a path; ``-s<seed>`` ends it."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{run}-{scenario}-{method}-s{seed}")


def load_experiment(name_or_file: str | Path) -> Experiment:
    """A bundled experiment by name (``default``, ``covariate_shift``, ...) or a TOML file's path."""
    path = Path(name_or_file)
    if not path.suffix:
        path = EXPERIMENTS_DIR / f"{name_or_file}.toml"
    if not path.is_file():
        bundled = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))
        raise FileNotFoundError(f"{name_or_file}: no such experiment file; bundled experiments: {bundled}")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    return parse_experiment(doc, str(path))
