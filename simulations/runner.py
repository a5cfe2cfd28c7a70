"""Run an experiment: every scenario x seed x method, evaluated the same way at the same sites.

Per scenario and seed the data become sites (``simulations.splits`` -> ``simulations.virtual``);
then every method trains under the experiment's budget and is scored on every evaluation site's
test patients (the ClientApp's own patient-wise split, same fractions, same seed), or, for a
leave-one-site-out fold, on all patients of the held-out site. Results are long-table rows
``{scenario, method, seed, site, marker, metric, value}`` plus per-round curves, ROC arrays and
timings, handed to ``simulations.report``.

Local-only and pooled training run in this process with the ClientApp's own training code and
configuration (``SiteRunConfig.train_config``: same optimiser, augmentation, sampling and
per-round seeds); federated methods run on Flower's simulation engine (``simulations.engine``).

Every method reports the model chosen on validation, never on test, by the federation's rule
(``common.validation``): after every round the training sites' validation patients score the model
(stage 2: pooled validation macro study-AUROC, stage 1: pooled validation Dice), the best round is
kept, and its per-marker temperature and thresholds come from the same validation studies. A
federated method is scored from the server's ``best.pt``; local and pooled baselines sum the same
``ValidationStats`` in this process. In a leave-one-site-out fold "local (best site)" is the local
model with the best score on its own site's validation patients. The per-study test outputs of
every method, seed and site (``Results.studies``: pseudonymous study and patient keys, logits,
labels) stay in this process and go to the report: the simulation holds all data anyway, whereas
a federated server only ever sees sums and scalars.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from client.data.cache import SiteCache
from client.data.dataset import SliceDataset, brain_slices, hematoma_slices, pooled, split_slices
from client.federation.site_gan import GENERATOR, gan_augment
from client.federation.site_run import SiteRunConfig
from client.federation.store import SiteStore
from client.training.evaluate import evaluate
from client.training.gan_augment import GanAugment, NoGanData, augmented_training_set, fit_generator
from client.training.stage2_features import with_unet_vectors
from client.training.train import train_stage
from common.checkpoint import build_from_checkpoint, load_checkpoint
from common.config import MARKERS
from common.gan import Generator, build_gan, load_gan_state_dict
from common.losses import label_counts
from common.model import JointModel, build_joint_model, norm_state_keys
from common.records import GAN_STAGE, HALF_OF_STAGE, TrainInstruction
from common.run_config import TrainOptions, model_from_run_config, parse_run_config, strategy_traits
from common.runtime import machine_cpu_seconds, resolve_device
from common.study_metrics import StudyOutputs
from common.validation import (
    OperatingPoint,
    ValidationStats,
    calibration_meta,
    evaluated,
    selectable,
    selection_score,
)
from simulations.baselines import stage_pos_weight
from simulations.engine import SimulationEngine
from simulations.experiment import Experiment, Method, Scenario, federated_run_name
from simulations.report.cost_section import stage_costs
from simulations.report.expansion_section import comparator_record
from simulations.report.gan_section import DEFAULT_LIMIT, draw_grid, measure
from simulations.report.tables import mean_sd, slug
from simulations.sites import prepare_caches
from simulations.splits import (
    SitePlan,
    dirichlet_plans,
    iid_plans,
    natural_plans,
    quantity_plans,
    site_column_plans,
    with_shift_and_faults,
)
from simulations.virtual import plan_cache, write_manifest

Log = Callable[[str], None]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Flower warnings that say nothing about the run (the SuperNode count is set explicitly; Ray
#: stops its actors at the end of every run).
FLOWER_NOISE = ("default simulated SuperNodes changed", "Manually terminating ClientAppActor")


@dataclass
class EvalSite:
    """Where a method is scored: a site id and the slices (its test patients, or all of a held-out site)."""

    site_id: str
    data: SliceDataset


#: What the GAN figures of one generator need: it, the trained model (features), the training and
#: the held-out datasets of its site(s).
GanSite = tuple[Generator, JointModel, list[Dataset], list[Dataset]]


@dataclass
class Case:
    """One scenario (or leave-one-site-out fold) at one seed: training sites and evaluation sites."""

    name: str
    seed: int
    plans: list[SitePlan]
    caches: list[SiteCache]
    train: list[SliceDataset]
    evaluate: list[EvalSite]
    held_out: str = ""
    val: list[EvalSite] = field(default_factory=list)  # the training sites' validation patients


@dataclass
class Results:
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    roc: dict[str, dict[str, Any]] = field(default_factory=dict)  # "scenario/method" -> arrays (first seed)
    timings: list[dict[str, Any]] = field(default_factory=list)
    sites: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # scenario -> site descriptions
    privacy: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, JointModel] = field(default_factory=dict)  # "scenario/method" -> a model (first seed)
    #: Per scenario, method, seed and evaluation site: the test ``StudyOutputs`` (``outputs``), the
    #: model's validation ``temperature`` and ``thresholds`` (arrays over ``outputs.names``) and the
    #: per-study Dice counts (``dice_counts``: study key -> TP, FP, FN).
    studies: list[dict[str, Any]] = field(default_factory=list)
    #: Model choices made on validation: {scenario, method, seed, model, validation_score, chosen}.
    selections: list[dict[str, Any]] = field(default_factory=list)
    #: GAN figures per scenario, method, seed and site (``simulations.report.gan_section``), and per
    #: scenario the one picture grid drawn ({path, method, seed, site}).
    gan: list[dict[str, Any]] = field(default_factory=list)
    gan_grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Per scenario and seed whose methods predict expansion: the comparators of its test studies
    #: (``simulations.report.expansion_section.comparator_record``; in memory only).
    expansion: list[dict[str, Any]] = field(default_factory=list)
    #: Per federated run and stage: rounds, seconds per round, payload bytes per site per round
    #: (``simulations.report.cost_section.stage_costs``).
    costs: list[dict[str, Any]] = field(default_factory=list)
    #: Per method, seed and selectable round: the pooled validation score the round is chosen by
    #: (stage 2: macro study AUROC over all sites' validation patients) and the seconds since the
    #: method started ({scenario, method, seed, round, stage, score, seconds}): the learning curves.
    validation: list[dict[str, Any]] = field(default_factory=list)


# --- metrics as long-table rows ----------------------------------------------------------------


def macro_slice_auc(metrics: dict[str, Any]) -> float:
    values = [metrics.get(f"auc_slice/{m}", math.nan) for m in MARKERS]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def metric_rows(metrics: dict[str, Any], **key: Any) -> list[dict[str, Any]]:
    """``client.training.evaluate.evaluate``'s flat metrics as rows (marker "" for whole-model metrics)."""
    rows = []
    for name, value in metrics.items():
        if name == "arrays" or not isinstance(value, (int, float, np.floating, np.integer)):
            continue
        metric, _, marker = name.partition("/")
        rows.append({**key, "marker": marker, "metric": metric, "value": float(value)})
    rows.append({**key, "marker": "", "metric": "macro_auc_slice", "value": macro_slice_auc(metrics)})
    return rows


# --- the cases of a scenario --------------------------------------------------------------------


def scenario_plans(scenario: Scenario, sources: Sequence[SiteCache], seed: int, log: Log) -> list[SitePlan]:
    if scenario.split == "natural":
        plans = natural_plans(sources)
    elif scenario.split == "site-column":
        plans, problems = site_column_plans(sources)
        for p in problems:
            log(f"  note: {p}")
    elif scenario.split == "iid":
        plans = iid_plans(sources, scenario.n_sites, seed)
    elif scenario.split == "dirichlet":
        plans = dirichlet_plans(sources, scenario.n_sites, scenario.alpha, seed)
    else:
        plans = quantity_plans(sources, scenario.n_sites, scenario.alpha, seed)
    return with_shift_and_faults(plans, scenario.shift, seed, scenario.bad_sites, scenario.fault)


def make_cases(
    scenario: Scenario,
    sources: Sequence[SiteCache],
    seed: int,
    fractions: tuple[float, float, float],
    work: Path,
    log: Log,
) -> list[Case]:
    """The scenario's sites at this seed; with ``leave_out`` one case per held-out site."""
    plans = scenario_plans(scenario, sources, seed, log)
    caches = [plan_cache(p, sources, work / "sites") for p in plans]
    splits = [split_slices(c, fractions, seed=seed, by="patient") for c in caches]
    train = [SliceDataset(c, s["train"]) for c, s in zip(caches, splits)]
    val = [EvalSite(p.site_id, SliceDataset(c, s["val"])) for p, c, s in zip(plans, caches, splits)]
    if not scenario.leave_out:
        evals = [EvalSite(p.site_id, SliceDataset(c, s["test"])) for p, c, s in zip(plans, caches, splits)]
        return [Case(scenario.name, seed, plans, caches, train, evals, val=val)]
    ids = [p.site_id for p in plans]
    held = ids if scenario.leave_out == "all" else [scenario.leave_out]
    unknown = set(held) - set(ids)
    if unknown:
        raise ValueError(f"scenario {scenario.name!r}: leave_out {sorted(unknown)} is not a site; sites: {ids}")
    cases = []
    for site in held:
        k = ids.index(site)
        keep = [i for i in range(len(plans)) if i != k]
        cases.append(
            Case(
                f"{scenario.name}/without-{site}",
                seed,
                [plans[i] for i in keep],
                [caches[i] for i in keep],
                [train[i] for i in keep],
                [EvalSite(site, SliceDataset(caches[k], brain_slices(caches[k])))],
                held_out=site,
                val=[val[i] for i in keep],
            )
        )
    return cases


def describe_sites(case: Case) -> list[dict[str, Any]]:
    """Per site: sizes, positives per marker, scanner shift, fault (for the report)."""
    out = []
    for plan, cache, train in zip(case.plans, case.caches, case.train):
        labels = train.labels()[:, : len(MARKERS)]
        pos, _ = label_counts(labels) if len(train) else (np.zeros(len(MARKERS), int), None)
        out.append(
            {
                "site": plan.site_id,
                "studies": len(cache.studies),
                "patients": len({s["patient"] for s in cache.studies}),
                "train_slices": len(train),
                "positives": {m: int(v) for m, v in zip(MARKERS, pos)},
                "shift": plan.shift.describe() if not plan.shift.is_identity else "",
                "fault": dict(plan.fault),
                "cache": str(cache.path),
            }
        )
    return out


# --- training under the budget (local-only and pooled) ----------------------------------------


def stage2_weight(train: TrainOptions, model: JointModel, ds: Dataset) -> torch.Tensor | None:
    """neg/pos of the training slices this model sees (a pooled model: all sites' = the federation's
    global weight; a local model: its own site's), or none with ``train.pos-weight = none``."""
    if train.pos_weight == "none" or not len(ds):
        return None
    max_w = train.max_pos_weight
    return stage_pos_weight(model, ds, max_w if max_w > 0 else None)


def stage2_data(ds: Dataset, site_run: SiteRunConfig, seed: int) -> tuple[Dataset, Generator | None]:
    """Stage 2's training set: ``ds`` plus SNGAN-generated slices with ``gan.augment-ratio`` > 0
    (one GAN, trained once on ``ds``'s crops, as a site does: ``client.federation.site_gan``), and
    that GAN's generator (None without one: the report's GAN section measures it)."""
    aug = gan_augment(site_run)
    if aug is None or not len(ds):
        return ds, None
    try:
        augmented, G, _ = augmented_training_set(ds, aug, seed)
    except NoGanData:  # as at a site: no generated slices where no GAN can be trained
        return ds, None
    return augmented, G


def train_rounds(
    model: JointModel,
    ds: Dataset,
    rc: dict,
    sites: int,
    seed: int,
    after_round: Callable[[int, int], None] | None = None,
    device: torch.device | str = "cpu",
) -> Generator | None:
    """The federation's schedule without the federation: ``rounds.stage1`` rounds of stage 1, then
    ``rounds.stage2`` of stage 2, each a fresh optimiser for ``sites`` x the stage's local steps
    (``train.local-steps``, ``train.local-steps-stage2``; a pooled model trains for the whole
    federation) at the round's seed (the run's seed plus the round; a federated site draws from its own
    ``site_seed``), as a site trains in a round (``SiteRunConfig.train_config``). Returns
    stage 2's generator with ``gan.augment-ratio`` > 0 (else None)."""
    site_run = SiteRunConfig.from_run_config({**rc, "seed": seed})
    cfg = site_run.config
    lr1 = cfg.train.lr
    lr2 = cfg.train.lr_stage2 or lr1
    r1, r2 = cfg.rounds.stage1, cfg.rounds.stage2
    weight = stage2_weight(cfg.train, model, ds)
    augmented, generator = stage2_data(hematoma_slices(ds), site_run, seed) if r2 else (ds, None)
    data_of = {1: ds, 2: augmented}
    for rnd in range(1, r1 + r2 + 1):
        stage = 1 if rnd <= r1 else 2
        if rnd == r1 + 1:  # the U-Net is frozen from here on: its vectors are computed once
            data_of[2] = with_unet_vectors(model, augmented, device)
        steps = cfg.train.steps(stage) * sites
        order = TrainInstruction(
            server_round=rnd,
            stage=stage,
            lr=lr1 if stage == 1 else lr2,
            local_steps=steps,
            # enough passes over the data for the steps (a pass is len / batch steps)
            local_epochs=max(1, math.ceil(steps * cfg.train.batch(stage) / max(len(data_of[stage]), 1))),
        )
        train = site_run.train_config(order)
        loader = train.loader(data_of[stage], stage)
        if len(ds):
            train_stage(model, loader, stage, train, device, weight if stage == 2 else None)
        if after_round is not None:
            after_round(rnd, stage)
    return generator


class BestOnValidation:
    """Keeps the state of the best round on validation (the federation's rule, ``common.validation``):
    a later stage beats an earlier one, within a stage the higher pooled validation score."""

    def __init__(
        self,
        model: JointModel,
        val: Sequence[EvalSite],
        batch_size: int,
        target_sensitivity: float,
        device: torch.device | str = "cpu",
        stage2_rounds: int = 1,
    ) -> None:
        self.model, self.batch_size, self.target, self.device = model, batch_size, target_sensitivity, device
        self.val = [v for v in val if len(v.data)]
        self.stage2_rounds = stage2_rounds
        self.key: tuple[int, float] | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.stats: ValidationStats | None = None
        self.round = 0
        self.t0 = time.perf_counter()
        #: (round, stage, score, seconds since this selector was made) of every round scored.
        self.scores: list[tuple[int, int, float, float]] = []

    def __call__(self, rnd: int, stage: int) -> None:
        if not selectable(stage, self.stage2_rounds):
            return
        parts = []
        for v in self.val:
            m = evaluate(self.model, v.data, self.device, self.batch_size)["arrays"]
            parts.append(ValidationStats.from_outputs(m["studies"], m["dice_counts"].values()))
        if not parts:
            return
        stats = sum(parts[1:], parts[0])
        markers = [c for c, n in enumerate(self.model.output_names) if n in MARKERS]
        value = selection_score(stats, stage, markers)
        self.scores.append((rnd, stage, value, time.perf_counter() - self.t0))
        if not math.isnan(value) and (self.key is None or (stage, value) > self.key):
            self.key, self.stats, self.round = (stage, value), stats, rnd
            self.state = copy.deepcopy(self.model.state_dict())

    def chosen_round(self, last: int) -> int:
        """The round ``restore`` loads: the best on validation, else the ``last`` (nothing chosen)."""
        return self.round if self.state is not None else last

    @property
    def score(self) -> float:
        return self.key[1] if self.key is not None else math.nan

    def restore(self) -> dict[str, Any]:
        """Load the best round's state into the model; its calibration meta (``{}`` without validation)."""
        if self.state is None or self.stats is None:
            return {}
        self.model.load_state_dict(self.state)
        return calibration_meta(self.stats, self.model.output_names, self.target)


class TestCurve:
    """The test scores after each round ``eval.test-rounds`` scores: ``point`` records each as a curve
    point; the last scored round's scores are kept so the final scoring of that same model is not
    repeated (``scores_at``)."""

    def __init__(
        self,
        stage1: int,
        stage2: int,
        test_rounds: str,
        scores: Callable[[], dict[str, dict[str, Any]]],
        point: Callable[[int, int, dict[str, dict[str, Any]]], None],
    ) -> None:
        self.stage1, self.stage2, self.test_rounds = stage1, stage2, test_rounds
        self.scores, self.point = scores, point
        self.last_round = stage1 + stage2
        self.kept: tuple[int, dict[str, dict[str, Any]]] | None = None

    def __call__(self, rnd: int, stage: int) -> None:
        if not evaluated(rnd, self.stage1, self.stage2, self.test_rounds):
            return
        per_site = self.scores()
        self.kept = (rnd, per_site)
        self.point(rnd, stage, per_site)

    def scores_at(self, rnd: int) -> dict[str, dict[str, Any]] | None:
        """The scores of round ``rnd`` if it was the last one scored (None otherwise)."""
        return self.kept[1] if self.kept is not None and self.kept[0] == rnd else None


def chained(*steps: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
    """One ``after_round`` callback that runs each of ``steps`` (None skipped) in turn."""

    def after_round(rnd: int, stage: int) -> None:
        for step in steps:
            if step is not None:
                step(rnd, stage)

    return after_round


def score(
    model: JointModel, sites: Sequence[EvalSite], batch_size: int, device: torch.device | str = "cpu"
) -> dict[str, dict[str, Any]]:
    return {s.site_id: evaluate(model, s.data, device, batch_size) for s in sites if len(s.data)}


def validation_curve(history: dict[str, Any], **key: Any) -> list[dict[str, Any]]:
    """A federated run's validation score per scored round, with the run's seconds up to that round."""
    rows, seconds = [], 0.0
    for r in history["rounds"]:
        seconds += float(r.get("seconds") or 0.0)
        score = (r.get("evaluate") or {}).get("validation", {}).get("score")
        if score is not None:
            rows.append({**key, "round": r["round"], "stage": r["stage"], "score": float(score), "seconds": seconds})
    return rows


def curve_point(per_site: dict[str, dict[str, Any]], **key: Any) -> dict[str, Any]:
    """Mean over sites of Dice and macro-AUCs after one round (sites without a value skipped)."""
    return {
        **key,
        "dice": mean_sd(m.get("dice") for m in per_site.values())[0],
        "macro_auc_slice": mean_sd(macro_slice_auc(m) for m in per_site.values())[0],
        "macro_auc_study": mean_sd(m.get("macro_auc_study") for m in per_site.values())[0],
    }


# --- one method on one case ---------------------------------------------------------------------


class Runner:
    """Runs an experiment's methods case by case; collects rows, curves, ROC arrays and timings."""

    def __init__(
        self,
        exp: Experiment,
        out_dir: Path,
        log: Log = print,
        engine: SimulationEngine | None = None,
        device: torch.device | str = "auto",
        gan_samples: int | None = None,
    ) -> None:
        """``device``: where the local, pooled and fine-tuning baselines train and every model is scored;
        ``gan_samples``: crops per set in the report's GAN figures (0: none measured; default
        ``simulations.report.gan_section.DEFAULT_LIMIT``)."""
        self.exp, self.out_dir, self.log, self.engine = exp, out_dir, log, engine
        self.gan_samples = DEFAULT_LIMIT if gan_samples is None else gan_samples
        self.device = resolve_device(str(device))
        self.results = Results()
        self.eval_batch = 32
        #: "scenario/method" -> the model that method trained at the current seed (``results.models``
        #: keeps the first seed's, for the report): the U-Net of a radiomics method's ``unet_from``.
        self.seed_models: dict[str, JointModel] = {}

    def record(
        self, case: Case, method: str, per_site: dict[str, dict[str, Any]], calibration: dict[str, Any] | None = None
    ) -> None:
        """Rows, ROC arrays and per-study outputs of one method's scores; ``calibration``: the
        temperature and thresholds its model chose on validation (``calibration_meta``)."""
        for site, metrics in per_site.items():
            self.results.rows += metric_rows(metrics, scenario=case.name, method=method, seed=case.seed, site=site)
            arrays = metrics["arrays"]
            outputs: StudyOutputs | None = arrays.get("studies")
            if outputs is not None:
                temp, th = OperatingPoint.of(outputs.names, calibration or {}).arrays(outputs.names)
                self.results.studies.append(
                    {
                        "scenario": case.name,
                        "method": method,
                        "seed": case.seed,
                        "site": site,
                        "outputs": outputs,
                        "temperature": temp,
                        "thresholds": th,
                        "dice_counts": arrays.get("dice_counts", {}),
                    }
                )
        key = f"{case.name}/{method}"
        roc = self.results.roc.setdefault(key, {"seed": case.seed, "names": [], "labels": [], "scores": []})
        if roc["seed"] == case.seed:  # the first seed's test slices of every site (local: one call per site)
            for m in per_site.values():
                roc["names"] = m["arrays"]["names"]
                roc["labels"].append(m["arrays"]["slice_labels"])
                roc["scores"].append(m["arrays"]["slice_scores"])

    def run_method(self, case: Case, method: Method) -> None:
        rc = full_run_config(self.exp.method_run_config(method), case.seed)
        t0, cpu0 = time.perf_counter(), machine_cpu_seconds()
        key = f"{case.name}/{method.name}"
        first = self.results.models.pop(key, None)  # the first seed's stays the report's; this seed's is noted
        if method.kind == "local":
            self.run_local(case, method, rc)
        elif method.kind == "pooled":
            self.run_pooled(case, method, rc)
        elif method.kind == "location-finetune":
            self.run_location_finetune(case, method, rc)
        elif method.kind == "radiomics":
            self.run_radiomics(case, method, rc)
        else:
            self.run_federated(case, method, rc)
        if (model := self.results.models.get(key)) is not None:
            self.seed_models[key] = model
        if first is not None:
            self.results.models[key] = first
        if parse_run_config(rc).model.predict_expansion:
            self._expansion_comparators(case)
        seconds = time.perf_counter() - t0
        # The machine's busy CPU seconds meanwhile (every process: Ray workers, Flower's), beside the wall
        # time: their ratio is the cores the method kept busy (benchmarks.bench_simulate prints it).
        cpu = machine_cpu_seconds() - cpu0
        self.results.timings.append(
            {"scenario": case.name, "method": method.name, "seed": case.seed, "seconds": seconds, "cpu_seconds": cpu}
        )
        self.log(f"  {method.name}: done in {seconds:.0f} s")

    def run_radiomics(self, case: Case, method: Method, rc: dict) -> None:
        """The radiomics baseline (``simulations.radiomics_methods``) on the masks of the U-Net that
        ``method.unet_from`` trained at this seed."""
        from simulations.radiomics_methods import run_radiomics

        run_radiomics(self, case, method, rc)

    def _expansion_comparators(self, case: Case) -> None:
        """Once per case: its test studies' expansion comparators for the report's expansion section."""
        if not any(r["scenario"] == case.name and r["seed"] == case.seed for r in self.results.expansion):
            tests = [e.data for e in case.evaluate]
            self.results.expansion.append(comparator_record(case.name, case.seed, case.train, tests))

    def _gan_figures(self, case: Case, method: str, rc: dict, sites: dict[str, GanSite]) -> None:
        """The report's GAN figures of each site's generator (``simulations.report.gan_section``), and
        the scenario's picture grid from the first generator measured."""
        aug = gan_augment(SiteRunConfig.from_run_config({**rc, "seed": case.seed}))
        if aug is None or self.gan_samples <= 0:
            return
        for site, (G, model, train, held) in sites.items():
            key = {"scenario": case.name, "method": method, "seed": case.seed, "site": site}
            figures = measure(G, model, train, held, aug.cfg, self.gan_samples, case.seed)
            if figures is not None:
                self.results.gan.append({**key, **figures})
            if case.name not in self.results.gan_grids:
                path = draw_grid(self.out_dir / "figures" / f"{slug(case.name)}_gan_grid.png", G, held, aug.cfg)
                if path is not None:
                    self.results.gan_grids[case.name] = {"path": str(path), **key}

    def _curve(self, case: Case, method: str, models: Callable[[], dict[str, JointModel]], rc: dict) -> TestCurve:
        """A curve point after every round that ``eval.test-rounds`` scores (as the federation does)."""
        cfg = parse_run_config(rc)

        def point(rnd: int, stage: int, per_site: dict[str, dict[str, Any]]) -> None:
            self.results.curves.append(
                curve_point(per_site, scenario=case.name, method=method, seed=case.seed, round=rnd, stage=stage)
            )

        def scores() -> dict[str, dict[str, Any]]:
            return {
                s.site_id: evaluate(models()[s.site_id], s.data, self.device, self.eval_batch)
                for s in case.evaluate
                if len(s.data)
            }

        return TestCurve(cfg.rounds.stage1, cfg.rounds.stage2, cfg.eval.test_rounds, scores, point)

    def _final_scores(
        self, model: JointModel, sites: Sequence[EvalSite], curve: TestCurve, best: BestOnValidation
    ) -> dict[str, dict[str, Any]]:
        """The chosen model's test scores: the curve's, where it already scored the chosen round
        (one test pass fewer; with ``eval.test-rounds = "last"`` and one stage-2 round, always)."""
        return curve.scores_at(best.chosen_round(curve.last_round)) or score(model, sites, self.eval_batch, self.device)

    def _resplit(self, case: Case, method: Method) -> tuple[list[Dataset], list[EvalSite], list[EvalSite]]:
        """Training sets, evaluation sites and validation sites for the method's split (the paper's
        random slice split puts slices of one patient on all sides)."""
        if method.split_by == "patient" or case.held_out:
            return list(case.train), case.evaluate, case.val
        fr = self.exp.budget.fractions
        splits = [split_slices(c, fr, seed=case.seed, by="slice") for c in case.caches]

        def sites(part: str) -> list[EvalSite]:
            return [EvalSite(p.site_id, SliceDataset(c, s[part])) for p, c, s in zip(case.plans, case.caches, splits)]

        return [SliceDataset(c, s["train"]) for c, s in zip(case.caches, splits)], sites("test"), sites("val")

    def _selector(self, model: JointModel, val: Sequence[EvalSite], rc: dict) -> BestOnValidation:
        cfg = parse_run_config(rc)
        return BestOnValidation(
            model, val, self.eval_batch, cfg.eval.target_sensitivity, self.device, cfg.rounds.stage2
        )

    def run_local(self, case: Case, method: Method, rc: dict) -> None:
        """Each site alone, its share of the budget, its round chosen on its own validation patients;
        scored at its own test patients (or, in a leave-one-site-out fold, every local model at the
        held-out site: the mean, and the model whose own validation score is best)."""
        cfg = parse_run_config(rc)
        model_cfg, _ = cfg.architecture()
        trains, evals, vals = self._resplit(case, method)
        val_of = {v.site_id: v for v in vals}
        models: dict[str, JointModel] = {}
        for plan in case.plans:
            models[plan.site_id] = build_joint_model(model_cfg, seed=case.seed)
        gans: dict[str, GanSite] = {}
        if case.held_out:
            per_model, chosen = [], []
            for site_id, ds in zip(models, trains):
                best = self._selector(models[site_id], [val_of[site_id]] if site_id in val_of else [], rc)
                G = train_rounds(models[site_id], ds, rc, 1, case.seed, best, self.device)
                gans.update(gan_site(site_id, G, models[site_id], [ds], held_out_of(site_id, vals, evals)))
                calibration = best.restore()
                per_model.append(score(models[site_id], evals, self.eval_batch, self.device)[case.held_out])
                chosen.append((_nan_low(best.score), calibration))
            k = max(range(len(per_model)), key=lambda i: chosen[i][0])  # validation only: never the held-out site
            self.results.selections += [
                {
                    "scenario": case.name,
                    "method": f"{method.name} (best site)",
                    "seed": case.seed,
                    "model": site_id,
                    "validation_score": chosen[i][0],
                    "chosen": i == k,
                }
                for i, site_id in enumerate(models)
            ]
            self.record(case, method.name, {case.held_out: _mean_metrics(per_model)})
            self.record(case, f"{method.name} (best site)", {case.held_out: per_model[k]}, chosen[k][1])
            self._gan_figures(case, method.name, rc, gans)
            return
        by_site = {e.site_id: e for e in evals}
        for n, (site_id, ds) in enumerate(zip(models, trains), 1):
            one = [by_site[site_id]]
            self.log(f"  {method.name}: site {n}/{len(models)} {site_id} ({len(ds)} training slices)")
            after = self._curve(
                Case(case.name, case.seed, [], [], [], one), f"{method.name}@{site_id}", lambda: models, rc
            )
            best = self._selector(models[site_id], [val_of[site_id]] if site_id in val_of else [], rc)
            G = train_rounds(models[site_id], ds, rc, 1, case.seed, chained(after, best), self.device)
            gans.update(gan_site(site_id, G, models[site_id], [ds], held_out_of(site_id, vals, evals)))
            calibration = best.restore()
            self.record(case, method.name, self._final_scores(models[site_id], one, after, best), calibration)
        self._merge_local_curves(case, method.name)
        self._gan_figures(case, method.name, rc, gans)
        self.results.models.setdefault(f"{case.name}/{method.name}", next(iter(models.values())))

    def _merge_local_curves(self, case: Case, name: str) -> None:
        """Per-site local curves -> one curve: the mean over sites at each round."""
        mine = [
            c
            for c in self.results.curves
            if c["method"].startswith(f"{name}@") and c["scenario"] == case.name and c["seed"] == case.seed
        ]
        self.results.curves = [c for c in self.results.curves if c not in mine]
        for rnd in sorted({c["round"] for c in mine}):
            at = [c for c in mine if c["round"] == rnd]
            self.results.curves.append(
                {
                    "scenario": case.name,
                    "method": name,
                    "seed": case.seed,
                    "round": rnd,
                    "stage": at[0]["stage"],
                    **{k: mean_sd(c[k] for c in at)[0] for k in ("dice", "macro_auc_slice", "macro_auc_study")},
                }
            )

    def run_pooled(self, case: Case, method: Method, rc: dict) -> None:
        """All sites' training patients in one place; the whole federation's budget (sites x steps)."""
        cfg = parse_run_config(rc)
        model_cfg, _ = cfg.architecture()
        trains, evals, vals = self._resplit(case, method)
        ds = pooled(trains)
        model = build_joint_model(model_cfg, seed=case.seed)
        steps = cfg.train.local_steps * len(trains)
        steps2 = cfg.train.steps(2) * len(trains)
        self.log(
            f"  {method.name}: {len(ds)} training slices from {len(trains)} sites, "
            f"{steps} (stage 1) / {steps2} (stage 2) steps per round"
        )
        curve = self._curve(
            Case(case.name, case.seed, [], [], [], evals), method.name, lambda: {e.site_id: model for e in evals}, rc
        )
        best = self._selector(model, vals, rc)  # every training site's validation patients, pooled
        G = train_rounds(model, ds, rc, len(trains), case.seed, chained(curve, best), self.device)
        self.results.validation += [
            {
                "scenario": case.name,
                "method": method.name,
                "seed": case.seed,
                "round": r,
                "stage": st,
                "score": v,
                "seconds": t,
            }
            for r, st, v, t in best.scores
        ]
        calibration = best.restore()
        self.record(case, method.name, self._final_scores(model, evals, curve, best), calibration)
        self.results.models.setdefault(f"{case.name}/{method.name}", model)
        held = [s.data for s in (*vals, *evals)]
        self._gan_figures(case, method.name, rc, gan_site("pooled", G, model, trains, held))

    def run_location_finetune(self, case: Case, method: Method, rc: dict) -> None:
        """Paper §5.1.2: a U-Net trained on every location, then fine-tuned on one location's
        patients; Dice per location before and after (rows ``site = location:<name>``)."""
        cfg = parse_run_config(rc)
        model_cfg, _ = cfg.architecture()
        ds = pooled(case.train)
        base = build_joint_model(model_cfg, seed=case.seed)
        steps = cfg.train.local_steps * len(case.train)
        train_rounds(base, ds, {**rc, "rounds.stage2": 0}, len(case.train), case.seed, device=self.device)
        site_run = SiteRunConfig.from_run_config({**rc, "seed": case.seed})
        for location, (train_loc, test_loc) in location_subsets(case).items():
            key = dict(scenario=case.name, seed=case.seed, site=f"location:{location}")
            before = evaluate(base, test_loc, self.device, self.eval_batch)
            tuned = copy.deepcopy(base)
            tune = site_run.train_config(
                TrainInstruction(
                    server_round=1,
                    stage=1,
                    lr=site_run.config.train.lr,
                    local_steps=method.finetune_steps or steps,
                )
            )
            loader = tune.loader(train_loc, 1)
            train_stage(tuned, loader, 1, tune, self.device)
            after = evaluate(tuned, test_loc, self.device, self.eval_batch)
            for name, m in ((f"{method.name}: all locations", before), (f"{method.name}: fine-tuned", after)):
                self.results.rows += [
                    {**key, "method": name, "marker": "", "metric": k, "value": float(m[k])}
                    for k in ("dice", "dice_per_study", "iou")
                ]
            self.log(f"  {location}: dice {before['dice']:.3f} -> {after['dice']:.3f} after fine-tuning")

    def run_federated(self, case: Case, method: Method, rc: dict) -> None:
        """The ServerApp and ClientApp on Flower's simulation engine, one virtual SuperNode per site."""
        if self.engine is None:
            raise RuntimeError("federated methods need a SimulationEngine")
        run_dir = self.out_dir / "federated"
        name = federated_run_name(self.out_dir.name, case.name, method.name, case.seed)
        manifest = write_manifest(run_dir / f"{name}.partitions.json", case.plans, case.caches)
        overrides = {
            **self.exp.method_run_config(method),
            "seed": case.seed,
            "data.partitions": str(manifest),
            "output.dir": str(run_dir),
            "output.name": name,
        }
        cfg = parse_run_config(rc)
        total = cfg.rounds.stage1 + cfg.rounds.gan + cfg.rounds.stage2
        self.log(f"  {method.name}: flwr run on {len(case.plans)} virtual SuperNodes ({total} rounds)")
        self.engine.run(overrides, len(case.plans), run_dir / f"{name}.log", on_line=self._flower_progress(method.name))
        history = json.loads((run_dir / name / "history.json").read_text())
        self.results.validation += validation_curve(history, scenario=case.name, method=method.name, seed=case.seed)
        self.results.costs += [
            {"scenario": case.name, "method": method.name, "seed": case.seed, **row} for row in stage_costs(history)
        ]
        for r in history["rounds"]:
            if not r.get("evaluate"):  # a round eval.test-rounds does not score
                continue
            per_site = {
                site: m
                for site, m in r.get("evaluate", {}).get("sites", {}).items()
                if site in {e.site_id for e in case.evaluate}
            }
            if r["stage"] != GAN_STAGE:  # a GAN round trains no half of the model and is not evaluated
                self.results.curves.append(
                    curve_point(
                        per_site,
                        scenario=case.name,
                        method=method.name,
                        seed=case.seed,
                        round=r["round"],
                        stage=r["stage"],
                    )
                )
            for f in r.get("failures", []) + r.get("rejected", []):  # the report lists both
                self.results.failures.append(
                    {"scenario": case.name, "method": method.name, "seed": case.seed, "round": r["round"], **f}
                )
            for site, m in r.get("train", {}).get("sites", {}).items():
                if "privacy-epsilon" in m:
                    self.results.privacy.append(
                        {
                            "scenario": case.name,
                            "method": method.name,
                            "seed": case.seed,
                            "round": r["round"],
                            "site": site,
                            "epsilon": m["privacy-epsilon"],
                        }
                    )
        chosen = run_dir / name / "best.pt"  # the round chosen on the sites' validation patients
        ckpt = load_checkpoint(chosen if chosen.is_file() else run_dir / name / "global.pt")
        model = build_from_checkpoint(ckpt)
        if strategy_traits(cfg.strategy.name).site_norms:
            per_site = {
                e.site_id: evaluate(with_site_norms(model, case, e.site_id, name), e.data, self.device, self.eval_batch)
                for e in case.evaluate
                if len(e.data)
            }
        else:
            per_site = score(model, case.evaluate, self.eval_batch, self.device)
        self.record(case, method.name, per_site, ckpt.meta)
        self.results.models.setdefault(f"{case.name}/{method.name}", model)
        aug = gan_augment(SiteRunConfig.from_run_config({**rc, "seed": case.seed}))
        if aug is not None:  # each site's own generator (design ii), or the one they all sampled from (i)
            shared = final_global_generator(run_dir / name, aug) if cfg.rounds.gan else None
            gans: dict[str, GanSite] = {}
            for plan, train in zip(case.plans, case.train):
                G = shared if shared is not None else stored_generator(site_store(case, plan.site_id, name), aug)
                gans.update(
                    gan_site(plan.site_id, G, model, [train], held_out_of(plan.site_id, case.val, case.evaluate))
                )
            self._gan_figures(case, method.name, rc, gans)

    def _flower_progress(self, method: str) -> Callable[[str], None]:
        """Show the ServerApp's round lines and its warnings (a site failing, an update rejected)."""

        def show(line: str) -> None:
            line = ANSI.sub("", line)
            if any(noise in line for noise in FLOWER_NOISE):
                return
            if "[ROUND" in line or "site(s) evaluated" in line or "WARNING" in line or "ERROR" in line:
                self.log(f"    {method} | {re.sub(r'^.*?(INFO|WARNING|ERROR) *: *', '', line).strip()}")

        return show


def site_store(case: Case, site_id: str, run_name: str) -> SiteStore | None:
    """Where a federated site of ``case`` kept its own state in run ``run_name`` (``SiteStore.for_run``);
    None for a site that did not train."""
    ids = [p.site_id for p in case.plans]
    if site_id not in ids:
        return None
    return SiteStore(case.caches[ids.index(site_id)].path.parent / "federation" / site_id / run_name)


def stored_generator(store: SiteStore | None, aug: GanAugment) -> Generator | None:
    """A federated site's SNGAN generator from its store (None where it trained none: ``NoGanData``)."""
    state = store.load(GENERATOR) if store is not None else None
    return fit_generator([], aug, 0, state=state)[0] if state is not None else None


def final_global_generator(run_dir: Path, aug: GanAugment) -> Generator | None:
    """Design (i): the generator every site sampled from in stage 2, the last GAN round's global G
    (from that round's checkpoint on the coordinator); None without a GAN round checkpoint."""
    for path in sorted((run_dir / "checkpoints").glob("round-*.pt"), reverse=True):
        state = load_checkpoint(path).gan
        if state:
            G, _ = build_gan(aug.cfg, 0)
            load_gan_state_dict(G, None, state)
            return G
    return None


def gan_site(
    site: str, G: Generator | None, model: JointModel, train: list[Dataset], held: list[Dataset]
) -> dict[str, GanSite]:
    """``{site: (G, model, train, held)}``, or nothing without a generator."""
    return {site: (G, model, list(train), held)} if G is not None else {}


def held_out_of(site_id: str, *groups: Sequence[EvalSite]) -> list[Dataset]:
    """The site's held-out datasets (its validation and test patients) among ``groups`` of sites."""
    return [s.data for group in groups for s in group if s.site_id == site_id]


def with_site_norms(model: JointModel, case: Case, site_id: str, run_name: str) -> JointModel:
    """FedBN: the global model with one site's own normalisation layers (kept at that site)."""
    store = site_store(case, site_id, run_name)
    if store is None:
        return model
    local = copy.deepcopy(model)
    state = local.state_dict()
    keys = norm_state_keys(local)
    for half in HALF_OF_STAGE.values():
        path = store.root / f"norm-{half}.pt"
        if path.is_file():
            state.update({k: v for k, v in torch.load(path, weights_only=True).items() if k in keys})
    local.load_state_dict(state)
    return local


def location_subsets(case: Case) -> dict[str, tuple[Dataset, Dataset]]:
    """Per hematoma location: (training slices, test slices) over every site (location from labels.csv)."""
    out: dict[str, tuple[list, list]] = {}
    for train, ev in zip(case.train, case.evaluate):
        for ds, slot in ((train, 0), (ev.data, 1)):
            if not len(ds):
                continue
            study = ds.cache.slice_study()[ds.indices]
            locations = np.asarray([s.get("location", "") for s in ds.cache.studies])[study]
            for loc in sorted(set(locations) - {""}):
                out.setdefault(str(loc), ([], []))[slot].append(SliceDataset(ds.cache, ds.indices[locations == loc]))
    return {loc: (pooled(tr), pooled(te)) for loc, (tr, te) in out.items() if tr and te}


def full_run_config(overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    """The app's pyproject run config with the method's overrides, as ``flwr run`` fuses it."""
    from flwr.common.config import get_fused_config_from_dir

    from simulations.engine import REPO

    return {**dict(get_fused_config_from_dir(REPO, {k: v for k, v in overrides.items()})), "seed": seed}


def _nan_low(v: float | None) -> float:
    return -1.0 if v is None or math.isnan(v) else float(v)


def _mean_metrics(per_model: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each scalar metric over several models' scores at one site (NaN skipped)."""
    out: dict[str, Any] = {}
    for key in per_model[0]:
        if key == "arrays":
            continue
        vals = [
            float(m[key]) for m in per_model if isinstance(m.get(key), (int, float)) and not math.isnan(float(m[key]))
        ]
        out[key] = float(np.mean(vals)) if vals else math.nan
    # Slice arrays for the ROC picture only: the mean of several models has no study outputs of its own.
    out["arrays"] = {k: v for k, v in per_model[0]["arrays"].items() if k not in ("studies", "dice_counts")}
    return out


#: Run-config keys that change what a site cache holds: methods that differ in them need their own caches.
CACHE_KEYS: tuple[str, ...] = ("preprocess.", "model.preset", "model.image-size")


def iterate_cases(exp: Experiment, data_root: Path, work: Path, log: Log) -> Iterator[tuple[Case, list[Method]]]:
    """(case, methods) in run order. Methods are grouped by their preprocessing; each group's site
    caches are built (or reused) once, then cut into every scenario's sites at every seed."""
    groups: dict[str, list[Method]] = {}
    for m in exp.methods:
        rc = full_run_config(exp.method_run_config(m), exp.seeds[0])
        groups.setdefault(json.dumps(sorted((k, v) for k, v in rc.items() if k.startswith(CACHE_KEYS))), []).append(m)
    sources: dict[str, list[SiteCache]] = {}
    for scenario in exp.scenarios:
        for seed in exp.seeds:
            for key, methods in groups.items():
                if key not in sources:
                    log("site caches (built once per preprocessing, reused after):")
                    _, pre = model_from_run_config(full_run_config(exp.method_run_config(methods[0]), seed))
                    caches, problems = prepare_caches(data_root, pre, progress=True)
                    if problems:
                        log(
                            f"  {len(problems)} data problem(s) while building caches (run 'hemexp check SITE_DIR' for the list)"
                        )
                    sources[key] = list(caches.values())
                for case in make_cases(scenario, sources[key], seed, exp.budget.fractions, work, log):
                    yield case, methods
