"""DP-SGD at the site (Opacus): the private half, Poisson batches, the noise for a budget, the ledger.

With ``privacy.dp`` every site trains the half of the round (the U-Net in stage 1, the classifier in
stage 2 with the U-Net frozen) by DP-SGD: per-slice gradients (Opacus' ``GradSampleModule`` hooks on
that half only, so the state-dict keys stay as they are), each clipped to ``privacy.max-grad-norm``,
Gaussian noise of ``noise_multiplier * max_grad_norm`` added to their sum, batches drawn by Poisson
sampling (each usable training slice with probability batch / n). The balanced sampler cannot be
used: the privacy analysis needs every slice drawn with the same probability.

The unit protected is ``privacy.unit``: "patient" (the default) samples whole patients (each with
probability q, a batch is every usable slice of the patients drawn), sums each patient's per-slice
gradients and clips that sum, so the accountant's epsilon bounds what the update says about any one
patient; "slice" samples and clips single slices, and its epsilon is per slice only (a patient
contributes ~30 slices: docs/privacy.md).

``privacy.physical-batch`` splits each Poisson batch into micro-batches of whole patients (memory): their
clipped per-patient sums accumulate in Opacus' ``summed_grad`` (``DPOptimizer.signal_skip_step``, as
Opacus' ``BatchMemoryManager`` does), and the noise, the optimizer step and the accountant's step come
once per Poisson batch, so the update and the guarantee are those of the unsplit batch.

Accounting (RDP, Opacus' ``RDPAccountant``) covers the whole run, both stages together, at each
site. Each Flower message runs in a fresh process, so the accountant's history lives on the site's
disk (``privacy.json`` in the site's per-run folder, ``client.federation.store.SiteStore``), written after a
round's training and before its reply. A site whose next round would exceed its budget does not
train: it replies with num-examples 0 and ``PRIVACY_EXHAUSTED`` = 1.

Across runs, the site's own ledger (``client.federation.site_ledger``, passed in as ``budget``) counts
every run's spend under a plan id drawn here, not under the run name the server sends; with it the
plan is refused when the resolved delta or the site's lifetime budget breaks its policy
(``PolicyRefusal``), and a round that would take the site past ``max-lifetime-epsilon`` is not trained.

What is not covered: the label counts a site reports (and a local pos-weight derived from them),
num-examples, and the evaluation on the site's own test patients. The training loss is not sent
under DP (the reply carries NaN), because it is computed from the training slices without noise.
Noise and sampling draw from fresh OS entropy, never from the run's public seed.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.common.logger import log
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from client.data.dataset import holds_hematoma
from client.training.train import TrainConfig, TrainResult, train_stage
from common.config import LABELS
from common.presets import ModelConfig
from common.records import PRIVACY_DELTA, PRIVACY_EPSILON, PRIVACY_EXHAUSTED, TrainInstruction
from common.run_config import PrivacyOptions, RunConfig

if TYPE_CHECKING:
    from client.federation.site_ledger import SiteBudget

#: The site's accountant history and plan, in its per-run folder.
PRIVACY_FILE = "privacy.json"
#: The units ``privacy.unit`` may name: whose contribution the clipping bounds and the epsilon counts.
UNITS = ("patient", "slice")
#: Default delta under patient DP is at most this, and at most a tenth of 1 / patients (see ``default_delta``).
MAX_DEFAULT_DELTA = 1e-5
#: How far below the target epsilon the derived noise multiplier may land (Opacus' default).
EPSILON_TOLERANCE = 0.01
_MAX_SIGMA = 1e6


# --- pure helpers ---------------------------------------------------------------------------


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling probability of each slice: batch / n (1 when the batch holds them all)."""
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"sample rate needs n > 0 and batch size > 0, got n={n}, batch size={batch_size}")
    return min(1.0, batch_size / n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Poisson batches per epoch: n / batch, rounded down, at least 1 (Opacus draws 1 / q)."""
    return max(1, n // batch_size)


def round_steps(n: int, batch_size: int, epochs: int, max_steps: int) -> int:
    """Noisy steps of one round over n usable slices (``train_stage``'s count: epochs, capped)."""
    if n <= 0:
        return 0
    total = epochs * steps_per_epoch(n, batch_size)
    return min(total, max_steps) if max_steps > 0 else total


def epsilon_spent(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon of a composition of ``(noise_multiplier, sample_rate, steps)`` phases (RDP accountant)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history if int(k) > 0]
    return float(acc.get_epsilon(delta=delta)) if acc.history else 0.0


def noise_for_budget(
    target_epsilon: float, delta: float, phases: Iterable[tuple[float, int]], tolerance: float = EPSILON_TOLERANCE
) -> float:
    """The smallest noise multiplier (within ``tolerance`` in epsilon) whose run of ``phases``
    ``(sample_rate, steps)`` spends at most ``target_epsilon``: Opacus' ``get_noise_multiplier``
    search, over several phases (the two stages sample from different slices)."""
    phases = [(float(q), int(k)) for q, k in phases if int(k) > 0]
    if not phases:
        raise ValueError("no training steps planned: nothing to derive a noise multiplier for")

    def eps(sigma: float) -> float:
        return epsilon_spent([(sigma, q, k) for q, k in phases], delta)

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        eps_high = eps(sigma_high)
        if sigma_high > _MAX_SIGMA:
            raise ValueError(f"privacy.target-epsilon {target_epsilon} is too small for the planned steps")
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target_epsilon:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high


def default_delta(unit: str, n_slices: int, n_patients: int) -> float:
    """delta when ``privacy.delta`` is 0. Patient: min(1e-5, 0.1 / patients), well below 1 / patients,
    because a mechanism that publishes one whole random patient's record is (0, 1/patients)-DP: a
    delta near 1 / patients allows exactly that. Slice (kept as it was): 1 / slices, which is loose."""
    if unit == "slice":
        return 1.0 / max(n_slices, 1)
    return min(MAX_DEFAULT_DELTA, 0.1 / max(n_patients, 1))


def patient_groups(ds: Dataset) -> np.ndarray:
    """A patient number 0..P-1 for each item of ``ds`` (a ``SliceDataset`` or a ``Subset`` of one).
    The patient keys stay at the site: only their count is ever used outside this function."""
    if isinstance(ds, Subset):
        return patient_groups(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    cache = ds.cache
    patient_of_slice = np.asarray([s["patient"] for s in cache.studies])[cache.slice_study()]
    _, groups = np.unique(patient_of_slice[np.asarray(ds.indices)], return_inverse=True)
    return groups.astype(np.int64)


def usable_slices(ds: Dataset, stage: int, model_cfg: ModelConfig) -> np.ndarray:
    """Which training slices a stage learns from (``client.federation.site_data.usable_examples`` counts them):
    with a reference mask (stage 1); holding reference hematoma, with an annotated label of the model's
    outputs (stage 2, ``client.data.dataset.hematoma_slices``). DP-SGD samples from these only, so
    that every non-empty batch has something to learn from."""
    if not len(ds):
        return np.zeros(0, bool)
    if stage == 1:
        return np.asarray(ds.cache.mask_known()[ds.indices], bool)
    cols = [LABELS.index(name) for name in model_cfg.output_names]
    return holds_hematoma(ds) & (~np.isnan(ds.labels()[:, cols])).any(axis=1)


# --- Opacus glue for one train_stage call ----------------------------------------------------


class _CollateWithEmpty:
    """``default_collate``, and for an empty Poisson batch the same dict with a 0-length batch axis."""

    def __init__(self, template: Mapping[str, Tensor]) -> None:
        self.template = template

    def __call__(self, batch: list) -> dict[str, Tensor]:
        if batch:
            return default_collate(batch)
        return {k: torch.as_tensor(v).new_empty((0, *torch.as_tensor(v).shape)) for k, v in self.template.items()}


class PatientPoissonSampler:
    """Batches of whole patients: each patient drawn with probability ``q``, independently, and the
    batch is every item of the patients drawn. ``current`` holds the patient numbers of the items of
    the batch last drawn (the loader fetches a batch right after drawing it, in this process), for
    the optimizer to sum their per-slice gradients by patient."""

    def __init__(self, groups: np.ndarray, q: float, steps: int, generator: torch.Generator) -> None:
        self.groups = np.asarray(groups, dtype=np.int64)
        self.members = [np.flatnonzero(self.groups == g) for g in range(int(self.groups.max()) + 1)]
        self.q, self.steps, self.generator = float(q), int(steps), generator
        self.current = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            drawn = torch.rand(len(self.members), generator=self.generator) < self.q
            idx = [self.members[g] for g in np.flatnonzero(drawn.numpy())]
            batch = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
            self.current = self.groups[batch]
            yield batch.tolist()


def micro_batch_indices(groups: np.ndarray, physical: int) -> list[np.ndarray]:
    """The items of each micro-batch of one Poisson batch (``groups``: each item's patient): whole
    patients in batch order, packed up to ``physical`` items; a patient of more items than that alone.
    A patient is never split, so each micro-batch's per-patient sums are whole patients' (clipped whole).
    ``physical`` 0, or a batch that fits: one micro-batch of every item."""
    groups = np.asarray(groups)
    if physical <= 0 or groups.size <= physical:
        return [np.arange(groups.size)]
    patients, first = np.unique(groups, return_index=True)
    parts: list[np.ndarray] = []
    current: list[np.ndarray] = []
    size = 0
    for patient in patients[np.argsort(first)]:
        members = np.flatnonzero(groups == patient)
        if current and size + members.size > physical:
            parts.append(np.concatenate(current))
            current, size = [], 0
        current.append(members)
        size += members.size
    parts.append(np.concatenate(current))
    return parts


def sum_by_group(grad_sample: Tensor, groups: Tensor) -> Tensor:
    """Per-item gradients ``[B, ...]`` summed within each group: ``[distinct groups, ...]``."""
    if grad_sample.shape[0] != groups.numel():
        raise ValueError(f"{grad_sample.shape[0]} per-slice gradients for {groups.numel()} patient labels")
    _, inverse = torch.unique(groups, return_inverse=True)
    out = grad_sample.new_zeros((int(inverse.max()) + 1 if inverse.numel() else 0, *grad_sample.shape[1:]))
    return out.index_add_(0, inverse.to(grad_sample.device), grad_sample)


def _grouped_optimizer_class():
    """``DPOptimizer`` that clips per patient: before Opacus clips, the per-slice gradients of each
    patient in the batch are summed, so each patient's whole contribution is clipped to C."""
    from opacus.optimizers import DPOptimizer

    class GroupedDPOptimizer(DPOptimizer):
        def __init__(self, *args, groups_of_batch, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.groups_of_batch = groups_of_batch

        def clip_and_accumulate(self) -> None:
            groups = torch.as_tensor(self.groups_of_batch(), dtype=torch.long)
            for p in self.params:
                gs = self._get_flat_grad_sample(p)
                if gs.shape[0]:  # an empty batch's zero-length grad_sample is already per patient
                    p.grad_sample = sum_by_group(gs, groups)
            super().clip_and_accumulate()

    return GroupedDPOptimizer


def _entropy_seed() -> int:
    return secrets.randbits(63)


class DPSGD:
    """DP-SGD for one ``train_stage`` call: pass it as ``train_stage(..., privacy=DPSGD(...))``.

    ``attach`` puts Opacus' per-sample hooks on the half being trained, wraps the optimizer in a
    ``DPOptimizer`` and replaces the loader by Poisson batches over its dataset (sample rate
    batch / n); ``detach`` removes the hooks again. ``steps`` counts the noisy steps taken.
    ``seed`` fixes noise and sampling: tests and benchmarks only (a known seed voids the guarantee).
    ``groups`` (a patient number per item of the dataset, ``patient_groups``): per-patient DP-SGD,
    patients Poisson-sampled with q = batch / items and each patient's summed gradient clipped;
    None: per-slice DP-SGD. ``physical_batch`` > 0: ``micro_batches`` splits each Poisson batch into
    micro-batches of at most that many items (whole patients), accumulated into one noisy step.
    """

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float,
        seed: int | None = None,
        groups: np.ndarray | None = None,
        physical_batch: int = 0,
    ) -> None:
        if noise_multiplier < 0 or not max_grad_norm > 0 or physical_batch < 0:
            raise ValueError(
                f"need noise_multiplier >= 0, max_grad_norm > 0 and physical_batch >= 0, "
                f"got {noise_multiplier}, {max_grad_norm}, {physical_batch}"
            )
        self.noise_multiplier, self.max_grad_norm, self.seed = float(noise_multiplier), float(max_grad_norm), seed
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        self.physical_batch = int(physical_batch)
        self.steps = 0
        self.sample_rate = math.nan
        self._hooks = None
        self._sampler: PatientPoissonSampler | None = None
        self._optimizer = None
        self._part_groups = np.zeros(0, dtype=np.int64)  # the patients of the micro-batch being processed

    def make_loader(self, ds: Dataset, batch_size: int) -> DataLoader:
        """Poisson batches: each slice (or each patient, with ``groups``) of ``ds`` in each batch with
        probability batch / n, n the number of slices: a batch holds ``batch`` slices on average."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        n = len(ds)
        self.sample_rate = sample_rate(n, batch_size)
        g = torch.Generator().manual_seed(self.seed if self.seed is not None else _entropy_seed())
        collate = _CollateWithEmpty(ds[0])
        if self.groups is not None:
            if self.groups.size != n:
                raise ValueError(f"{self.groups.size} patient labels for {n} slices")
            self._sampler = PatientPoissonSampler(self.groups, self.sample_rate, steps_per_epoch(n, batch_size), g)
            return DataLoader(ds, batch_sampler=self._sampler, collate_fn=collate)
        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=self.sample_rate, generator=g, steps=steps_per_epoch(n, batch_size)
        )
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate)

    def attach(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        anchor: list[Tensor] | None = None,
        proximal_mu: float = 0.0,
    ):
        """Make ``module``'s training private; returns ``(dp_optimizer, poisson_loader)``.

        FedProx's proximal gradient mu (w - w_global) is added after the noise: it depends on the
        weights only, so it costs no privacy (through the loss it would be dropped by Opacus).
        """
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        if len(loader.dataset) == 0:
            raise ValueError("DP-SGD needs at least one training slice")
        modes = {m: m.training for m in module.modules()}
        module.train()  # the validator refuses a module in eval mode; train_stage sets the modes itself
        errors = ModuleValidator.validate(module, strict=False)
        for m, training in modes.items():
            m.training = training
        if errors:
            raise ValueError(
                f"the model cannot be trained privately (set privacy.dp, which forces model.norm='group'): {errors[0]}"
            )
        batch_size = int(loader.batch_size or 1)
        dp_loader = self.make_loader(loader.dataset, batch_size)
        self._hooks = GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=True)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = params[0].device if params else torch.device("cpu")
        noise = torch.Generator(device=device).manual_seed(self.seed + 1 if self.seed is not None else _entropy_seed())
        common = {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "loss_reduction": "mean",
            "generator": noise,
        }
        if self._sampler is None:
            dp_opt = DPOptimizer(optimizer, expected_batch_size=min(batch_size, len(loader.dataset)), **common)
        else:  # the mean is over patients: divide by the expected number of patients per batch
            sampler = self._sampler
            expected = self.sample_rate * len(sampler.members)
            dp_opt = _grouped_optimizer_class()(
                optimizer, expected_batch_size=expected, groups_of_batch=lambda: self._part_groups, **common
            )

        def after_noise(opt) -> None:
            self.steps += 1
            if anchor is not None and proximal_mu > 0:
                for p, a in zip(opt.params, anchor):
                    p.grad.add_(p.detach() - a, alpha=proximal_mu)

        dp_opt.attach_step_hook(after_noise)  # Opacus calls it on the noisy step only, not on skipped ones
        self._optimizer = dp_opt
        return dp_opt, dp_loader

    def micro_batches(self, batch: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
        """The Poisson batch just drawn, as micro-batches of whole patients (``micro_batch_indices``).
        Every micro-batch but the last is a skipped step of the optimizer (``signal_skip_step``): its
        clipped per-patient sums are kept, and noise, step and accounting come with the last one."""
        n = int(batch["image"].shape[0])
        groups = self._sampler.current if self._sampler is not None else np.arange(n)
        parts = micro_batch_indices(groups, self.physical_batch)
        for i, idx in enumerate(parts):
            self._part_groups = groups[idx]
            if i < len(parts) - 1:
                self._optimizer.signal_skip_step(do_skip=True)
            yield batch if len(parts) == 1 else {k: v[torch.as_tensor(idx)] for k, v in batch.items()}

    def empty_step(self, optimizer) -> None:
        """The step of an empty Poisson batch: noise only (skipping it would tell the batch was empty)."""
        optimizer.zero_grad(set_to_none=True)
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()

    def detach(self) -> None:
        """Remove the hooks and Opacus' attributes from the parameters (idempotent)."""
        if self._hooks is not None:
            module = self._hooks._module
            self._hooks.cleanup()
            for p in module.parameters():
                if hasattr(p, "summed_grad"):
                    delattr(p, "summed_grad")
            self._hooks = None


# --- the site's budget over a run ------------------------------------------------------------


@dataclass
class PrivacyLedger:
    """A site's DP plan and its RDP history for one run (JSON in the site's per-run folder)."""

    noise_multiplier: float
    delta: float
    target_epsilon: float
    max_grad_norm: float
    derived: bool  # noise_multiplier derived from target_epsilon (privacy.noise-multiplier = 0)
    planned: list[list[float]] = field(default_factory=list)  # [[sample rate, steps], ...] per stage
    history: list[list[float]] = field(default_factory=list)  # [[noise multiplier, sample rate, steps], ...]
    rounds: list[dict[str, Any]] = field(default_factory=list)  # {"round", "stage", "steps", "epsilon"}
    unit: str = "slice"  # whose contribution epsilon bounds: "patient" or "slice" (privacy.unit)
    max_grad_norm_stage2: float = 0.0  # stage 2's C (privacy.max-grad-norm-stage2 resolved); 0: max_grad_norm
    plan_id: str = ""  # the site's key of this run in its lifetime ledger (drawn at the site, never sent)

    def __post_init__(self) -> None:
        self.max_grad_norm_stage2 = self.max_grad_norm_stage2 or self.max_grad_norm  # a ledger from before the key

    def clip(self, stage: int) -> float:
        """The clipping bound C of a stage's noisy steps."""
        return self.max_grad_norm_stage2 if stage == 2 else self.max_grad_norm

    def epsilon(self, more: Iterable[Sequence[float]] = ()) -> float:
        return epsilon_spent([*self.history, *more], self.delta)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger | None:
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)


def plan_ledger(cfg: PrivacyOptions, delta: float, phases: list[tuple[float, int]]) -> PrivacyLedger:
    """The run's plan at a site: its noise multiplier, the given one or the one that spends
    ``target_epsilon`` over the planned ``(sample rate, steps)`` of both stages (no phases: the given one)."""
    derived = cfg.noise_multiplier == 0
    sigma = noise_for_budget(cfg.target_epsilon, delta, phases) if derived and phases else cfg.noise_multiplier
    planned = [list(p) for p in phases]
    return PrivacyLedger(
        sigma,
        delta,
        cfg.target_epsilon,
        cfg.max_grad_norm,
        derived,
        planned,
        unit=cfg.unit,
        max_grad_norm_stage2=cfg.clipping_bound(2),
    )


@dataclass
class SitePrivacy:
    """DP-SGD at one site for one train round: its slices, its ledger, and whether it may train."""

    config: PrivacyOptions
    ledger: PrivacyLedger
    path: Path
    train_set: Dataset
    stage: int
    server_round: int
    steps: int  # noisy steps this round would take
    sample_rate: float
    exhausted: bool = False
    budget: SiteBudget | None = None  # the site's policy and lifetime ledger (None: this run's budget only)
    lifetime_exhausted: bool = False  # the round would take the site past max-lifetime-epsilon

    @classmethod
    def open(
        cls,
        run: RunConfig,
        store_dir: Path,
        train: Dataset,
        order: TrainInstruction,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        budget: SiteBudget | None = None,
    ) -> SitePrivacy | None:
        """None when ``privacy.dp`` is off. On a site's first round of a run the plan is made and
        kept (refused, ``PolicyRefusal``, when ``budget``'s policy forbids its delta or its budget);
        later rounds (fresh processes) read it back."""
        pc = run.privacy
        if not pc.dp:
            return None
        usable = {s: usable_slices(train, s, model_cfg) for s in (1, 2)}
        path = Path(store_dir) / PRIVACY_FILE
        ledger = PrivacyLedger.load(path)
        if ledger is None:
            n_patients = int(patient_groups(train).max()) + 1 if len(train) else 0
            delta = pc.delta or default_delta(pc.unit, len(train), n_patients)
            if budget is not None:
                budget.check_plan(pc.unit, delta, n_patients, pc.target_epsilon)
            epochs = run.train.local_epochs
            rounds = {1: run.rounds.stage1, 2: run.rounds.stage2}
            phases = [
                (
                    sample_rate(int(u.sum()), run.train.batch(s)),
                    rounds[s] * round_steps(int(u.sum()), run.train.batch(s), epochs, run.train.steps(s)),
                )
                for s, u in usable.items()
                if u.sum() and rounds[s]
            ]
            ledger = plan_ledger(pc, delta, phases)
            log(
                INFO,
                "privacy: DP-SGD with noise multiplier %.4g, clipping %.3g (stage 2: %.3g), delta %.3g: budget "
                "epsilon %.3g for the run (per %s)",
                ledger.noise_multiplier,
                ledger.clip(1),
                ledger.clip(2),
                ledger.delta,
                ledger.target_epsilon,
                ledger.unit,
            )
        if not ledger.plan_id:  # a new plan, or one made before the site's ledger: counted from its next round
            ledger.plan_id = secrets.token_hex(16)  # drawn here: nothing the server sends names it
        _check_unchanged(ledger, pc)
        if cfg.oversample(order.stage):
            log(INFO, "privacy: oversampling is not used under DP-SGD (Poisson sampling draws every slice alike)")
        idx = np.flatnonzero(usable[order.stage])
        n = int(idx.size)
        steps = round_steps(n, cfg.batch_size, cfg.epochs, cfg.max_steps)
        q = sample_rate(n, cfg.batch_size) if n else 0.0
        out = cls(pc, ledger, path, Subset(train, idx.tolist()), order.stage, order.server_round, steps, q)
        out.budget = budget
        after = ledger.epsilon([(ledger.noise_multiplier, q, steps)]) if steps else 0.0
        if steps and after > ledger.target_epsilon * (1 + 1e-9):
            out.exhausted = True
        elif steps and budget is not None and budget.exceeded(ledger.plan_id, after):
            out.exhausted = out.lifetime_exhausted = True
        return out

    def train(self, model, cfg: TrainConfig, device, pos_weight: Tensor | None, seed: int | None = None) -> TrainResult:
        """Train the stage's half by DP-SGD and record the spend; or do nothing when the round
        would exceed the budget (or there is nothing to learn from). The loss is not released."""
        if self.lifetime_exhausted:
            log(
                WARNING,
                "site privacy budget spent (max-lifetime-epsilon %.3f per patient over every run): this round's "
                "%d steps would exceed it; not training in round %d",
                self.budget.policy.max_lifetime_epsilon,
                self.steps,
                self.server_round,
            )
            return TrainResult(math.nan, 0, 0, 0.0)
        if self.exhausted:
            log(
                WARNING,
                "privacy budget spent (epsilon %.3f of %.3f): this round's %d steps would exceed it; "
                "not training in round %d",
                self.ledger.epsilon(),
                self.ledger.target_epsilon,
                self.steps,
                self.server_round,
            )
            return TrainResult(math.nan, 0, 0, 0.0)
        if not self.steps:
            return TrainResult(math.nan, 0, 0, 0.0)
        dp = self.dpsgd(seed)
        loader = DataLoader(self.train_set, batch_size=cfg.batch_size)
        result = train_stage(model, loader, self.stage, cfg, device, pos_weight, privacy=dp)
        self.ledger.history.append([self.ledger.noise_multiplier, dp.sample_rate, dp.steps])
        eps = self.ledger.epsilon()
        self.ledger.rounds.append({"round": self.server_round, "stage": self.stage, "steps": dp.steps, "epsilon": eps})
        if self.budget is not None:  # the site's ledger first: a crash in between over-counts, never under-counts
            self.budget.record(
                self.ledger.plan_id,
                eps,
                unit=self.ledger.unit,
                delta=self.ledger.delta,
                target_epsilon=self.ledger.target_epsilon,
                run=self.path.parent.name,
            )
        self.ledger.save(self.path)  # before the reply leaves: every release is accounted for
        log(
            INFO,
            "privacy: round %d, stage %d: %d noisy steps, epsilon %.3f of %.3f spent",
            self.server_round,
            self.stage,
            dp.steps,
            eps,
            self.ledger.target_epsilon,
        )
        return TrainResult(math.nan, result.num_examples, result.steps, result.seconds)

    def dpsgd(self, seed: int | None = None) -> DPSGD:
        """The round's DP-SGD: the ledger's noise, the stage's clipping bound, patients as the unit (or
        slices), micro-batches of ``privacy.physical-batch`` (memory only, changeable between rounds)."""
        groups = patient_groups(self.train_set) if self.ledger.unit == "patient" else None
        return DPSGD(
            self.ledger.noise_multiplier,
            self.ledger.clip(self.stage),
            seed=seed,
            groups=groups,
            physical_batch=self.config.physical_batch,
        )

    def metrics(self) -> dict[str, float | int]:
        """What the reply says about privacy: numbers only."""
        return {
            PRIVACY_EPSILON: float(self.ledger.epsilon()),
            PRIVACY_DELTA: float(self.ledger.delta),
            PRIVACY_EXHAUSTED: int(self.exhausted),
        }


def _check_unchanged(ledger: PrivacyLedger, pc: PrivacyOptions) -> None:
    """A run's budget is fixed at its first round: a changed setting would make the history lie."""
    changed = [
        key
        for key, same in (
            ("privacy.target-epsilon", ledger.target_epsilon == pc.target_epsilon),
            ("privacy.max-grad-norm", ledger.max_grad_norm == pc.max_grad_norm),
            ("privacy.max-grad-norm-stage2", ledger.clip(2) == pc.clipping_bound(2)),
            ("privacy.unit", ledger.unit == pc.unit),
            ("privacy.delta", not pc.delta or ledger.delta == pc.delta),
            (
                "privacy.noise-multiplier",
                ledger.derived if pc.noise_multiplier == 0 else ledger.noise_multiplier == pc.noise_multiplier,
            ),
        )
        if not same
    ]
    if changed:
        raise ValueError(
            f"{', '.join(changed)} changed since this site's first round of the run; "
            "a run keeps its privacy settings (start a new run: another output.name)"
        )
