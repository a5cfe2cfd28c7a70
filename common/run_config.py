"""The app's run config (``[tool.flwr.app.config]`` of pyproject.toml), typed and checked in one place.

pyproject.toml holds every key and its default (Flower accepts overrides of those keys only); this
module holds their types and the rules between them. One frozen dataclass per key group, a field per
key: ``TrainOptions.lr_stage2`` is ``train.lr-stage2``; ``seed`` and ``resume`` sit on ``RunConfig``
itself. ``parse_run_config`` reads every key once, so the server, every site and the simulation
refuse a bad value at the same check, with an error naming the key. The dataclasses have no
defaults of their own: a second copy of pyproject's would drift from it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from logging import INFO
from typing import Any, get_type_hints

from flwr.common.logger import log

from common.config import PreprocessConfig
from common.gan import GAN_PRESETS
from common.presets import ModelConfig, get_preset
from common.validation import TEST_ROUNDS

#: Why an aggregate is not the plain mean that site-level DP noise is sized for (``NOT_A_PLAIN_MEAN``).
_ROBUST_AGGREGATE = "a median, trimmed mean or Krum's pick moves by more than C / n when one site changes"
_SERVER_OPTIMISER = (
    "Flower adds the noise after the server optimiser's step, which rescales the mean per coordinate "
    "by moments of earlier means without noise"
)


@dataclass(frozen=True)
class StrategyTraits:
    """What the rest of the system must know about an aggregation strategy, declared once here
    (``server.strategies.STRATEGIES`` builds each one), so that no module special-cases a name.

    ``site_norms``: the sites keep their normalisation layers (FedBN): the server never averages them,
    the simulation evaluates each site with its own, ``hemexp predict`` needs ``--site-norms``.
    ``robust``: it bounds the influence of outlying sites (so it cannot be combined with the
    positive-weighted head or secure updates, which need every site's own update).
    ``not_plain_mean``: why its aggregate is not the plain mean of the updates ("" when it is)."""

    site_norms: bool = False
    robust: bool = False
    not_plain_mean: str = ""


#: ``strategy.name`` values and their traits.
STRATEGY_TRAITS: dict[str, StrategyTraits] = {
    "fedavg": StrategyTraits(),
    "fedprox": StrategyTraits(),
    "fedadam": StrategyTraits(not_plain_mean=_SERVER_OPTIMISER),
    "fedyogi": StrategyTraits(not_plain_mean=_SERVER_OPTIMISER),
    "fedbn": StrategyTraits(site_norms=True),
    "fedmedian": StrategyTraits(robust=True, not_plain_mean=_ROBUST_AGGREGATE),
    "fedtrimmedavg": StrategyTraits(robust=True, not_plain_mean=_ROBUST_AGGREGATE),
    "krum": StrategyTraits(robust=True, not_plain_mean=_ROBUST_AGGREGATE),
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGY_TRAITS)
#: Strategies that bound the influence of outlying sites (the positive-weighted head would not).
ROBUST_STRATEGIES = frozenset(name for name, t in STRATEGY_TRAITS.items() if t.robust)


def strategy_traits(name: str | None) -> StrategyTraits:
    """The traits of strategy ``name``; a plain FedAvg-like strategy's for None or an unknown name (a
    checkpoint's ``meta`` may predate a strategy: it is then treated as averaging everything)."""
    return STRATEGY_TRAITS.get(name or "", StrategyTraits())


#: ``rounds.census``: no data census, one before training, or the census alone.
CENSUS_MODES: tuple[str, ...] = ("off", "before", "only")
#: Where stage 2's marker weights come from (``train.pos-weight``).
POS_WEIGHT_MODES: tuple[str, ...] = ("global", "local", "none")
#: Stage-2 sampling: natural draws (the paper) or marker-positive slices oversampled to about half.
MARKER_SAMPLING = ("natural", "balanced")
#: ``privacy.site-dp``: no site-level DP, or Flower's fixed-clipping wrapper with the server or the site clipping.
SITE_DP_MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed")
#: Strategies whose aggregate is not the plain mean of the updates that Flower's site-level noise is sized
#: for (``privacy.site-dp``), and why.
NOT_A_PLAIN_MEAN: dict[str, str] = {name: t.not_plain_mean for name, t in STRATEGY_TRAITS.items() if t.not_plain_mean}


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError unless ``value`` is one of ``choices`` (``key``: the run-config key, for the message)."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelOptions:
    """``model.*``: the preset and what the run overrides of it (``RunConfig.architecture`` applies them)."""

    preset: str
    image_size: int  # 0: the preset's size
    classifier: str  # wavelet | vgg
    masked_input: bool
    norm: str  # batch | group
    predict_expansion: bool  # a study's expansion as one more output, trained in stage 2 (docs/gan.md)
    classifier_input: str  # roi (hematoma-centred crops, common/roi.py) | slice (the paper's whole slice)
    roi_mask_channel: bool  # the ROI crop carries the hematoma mask as a second channel


@dataclass(frozen=True)
class PreprocessOptions:
    """``preprocess.*``: the paper's preprocessing steps, each switchable for its ablation."""

    denoise: bool
    strip_skull: bool
    centre: bool


@dataclass(frozen=True)
class DataOptions:
    """``data.*``: where a simulation's sites are (root, cache-dir, partitions) and every site's split."""

    root: str
    cache_dir: str
    partitions: str
    val_fraction: float
    test_fraction: float
    expansion_ratio: float  # expansion: follow-up >= ratio x baseline volume (client/data/expansion.py)
    expansion_ml: float  # 0: off; else expansion also where the hematoma grew by this many ml

    def __post_init__(self) -> None:
        val, test = self.val_fraction, self.test_fraction
        if not (0 <= val and 0 < test and val + test < 1):
            raise ValueError(f"data.val-fraction ({val}) and data.test-fraction ({test}) must leave a training split")
        if not self.expansion_ratio > 1 or self.expansion_ml < 0:
            raise ValueError(
                f"data.expansion-ratio must be > 1 and data.expansion-ml >= 0, "
                f"got {self.expansion_ratio} and {self.expansion_ml}"
            )

    @property
    def split(self) -> tuple[float, float, float]:
        """(train, val, test) fractions of every site's patients."""
        return 1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction


@dataclass(frozen=True)
class TrainOptions:
    """``train.*``: local training at every site, and stage 2's marker weights."""

    batch_size: int
    batch_size_stage2: int  # stage 2's own batch (ROI crops are small); 0: batch_size
    eval_batch_size: int
    lr: float
    lr_stage2: float  # 0: train.lr
    local_epochs: int
    local_steps: int  # 0: whole epochs
    local_steps_stage2: int  # stage 2's own cap (the ROI classifier is cheap per step); 0: local_steps
    weight_decay: float
    optimizer: str
    augment: bool
    balanced: bool  # stage 1: oversample hematoma slices
    marker_sampling: str  # stage 2: "natural" (the paper's) | "balanced" (oversample marker positives)
    #: "global": the server's neg/pos of every site's summed counts (the imbalance-aware default);
    #: "local": each site's own neg/pos (what global replaces); "none": unweighted BCE.
    pos_weight: str
    max_pos_weight: float  # 0: no cap
    #: A checkpoint the global model starts from (every site gets it in round 1), e.g. pretrained on
    #: synthetic data at no privacy cost before private fine-tuning; "": the seed's random init.
    init_checkpoint: str

    def steps(self, stage: int) -> int:
        """Optimizer steps per round and site in ``stage`` (0: whole epochs)."""
        return self.local_steps_stage2 or self.local_steps if stage == 2 else self.local_steps

    def batch(self, stage: int) -> int:
        """Slices per optimizer step in ``stage``."""
        return self.batch_size_stage2 or self.batch_size if stage == 2 else self.batch_size

    def __post_init__(self) -> None:
        _check_choice("train.marker-sampling", self.marker_sampling, MARKER_SAMPLING)
        _check_choice("train.pos-weight", self.pos_weight, POS_WEIGHT_MODES)


@dataclass(frozen=True)
class RoundOptions:
    """``rounds.*``: the schedule (a data census, stage-1 rounds, then stage-2 rounds) and the reply timeout."""

    stage1: int
    stage2: int
    timeout: float  # seconds; 0: no limit
    census: str  # off | before (a census, then training) | only (the census alone; server.census)
    #: Rounds of the federated GAN stage between stages 1 and 2 (docs/gan.md design (i)); 0: none.
    gan: int

    def __post_init__(self) -> None:
        _check_choice("rounds.census", self.census, CENSUS_MODES)
        rounds = self.stage1, self.stage2
        if min(rounds) < 0 or sum(rounds) == 0:
            raise ValueError(f"rounds.stage1 and rounds.stage2 must be >= 0 and not both 0, got {rounds}")
        if self.gan < 0:
            raise ValueError(f"rounds.gan must be >= 0 (0: no GAN stage), got {self.gan}")
        if self.gan and not self.stage2:
            raise ValueError("rounds.gan > 0 trains the generator stage 2 samples from, but rounds.stage2 is 0")


@dataclass(frozen=True)
class StrategyOptions:
    """``strategy.*``: the aggregation strategy and its parameters (``server.strategies.build_strategy``)."""

    name: str
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    accept_failures: bool
    imbalance_head: bool
    proximal_mu: float
    server_lr: float
    tau: float
    trim_beta: float
    num_malicious: int
    #: No site is weighted by more than this times the median of the others' num-examples, nor by more
    #: than it declared in the counts round; 0: no bound (server.validation.bound_examples).
    max_examples_factor: float
    #: The size bound of a reply in MiB; 0: the half being trained plus 1 MiB (server.validation).
    max_reply_mb: float

    def __post_init__(self) -> None:
        for key, value in (("max-examples-factor", self.max_examples_factor), ("max-reply-mb", self.max_reply_mb)):
            if not value >= 0:
                raise ValueError(f"strategy.{key} must be >= 0 (0: no bound / the default), got {value}")
        if self.name not in STRATEGY_NAMES:
            raise KeyError(f"strategy.name: unknown strategy {self.name!r}; valid strategies: {sorted(STRATEGY_NAMES)}")
        if self.imbalance_head and self.name in ROBUST_STRATEGIES:
            raise ValueError(
                f"strategy.imbalance-head averages every site's head rows, which would undo "
                f"{self.name}'s robustness to outlying sites; use it with {sorted(set(STRATEGY_NAMES) - ROBUST_STRATEGIES)}"
            )


@dataclass(frozen=True)
class PrivacyOptions:
    """``privacy.*``: DP-SGD at the site (docs/privacy.md) and the secure counts round.

    ``noise_multiplier`` 0: derived at each site from ``target_epsilon`` over the run's planned
    steps; ``target_epsilon``: the site's whole budget for the run, both stages together;
    ``delta`` 0: min(1e-5, 0.1 / patients) per patient, 1 / slices per slice; ``max_grad_norm``: the
    clipping bound C of one unit's gradient (``max_grad_norm_stage2`` > 0: stage 2's own, since the U-Net's
    and the classifier's gradients differ in scale; ``clipping_bound``); ``physical_batch`` > 0: each
    Poisson batch is processed in micro-batches of at most this many slices, split at patient boundaries,
    with one noisy step per Poisson batch (memory only: the guarantee is the same); ``unit``: "patient" (sample and clip whole patients) or
    "slice" (per-slice DP-SGD, whose epsilon does not protect a patient);
    ``secure_counts``: label counts leave a site only masked (docs/secure-aggregation.md);
    ``site_dp``: site-level DP by Flower's fixed-clipping wrappers (``server.site_dp``): each site's
    update is clipped to ``site_clipping_norm`` C, and the mean of the n sites' updates gets Gaussian
    noise of std ``site_noise_multiplier`` x C / n.
    """

    dp: bool
    unit: str
    noise_multiplier: float
    target_epsilon: float
    delta: float
    max_grad_norm: float
    max_grad_norm_stage2: float  # 0: privacy.max-grad-norm
    physical_batch: int  # 0: the whole Poisson batch at once
    secure_counts: bool
    #: Train replies carry masked fixed-point updates only; the server unmasks their weighted mean
    #: (``common.secure_updates``, docs/secure-aggregation.md).
    secure_updates: bool
    site_dp: str
    site_noise_multiplier: float
    site_clipping_norm: float

    def __post_init__(self) -> None:
        _check_choice("privacy.site-dp", self.site_dp, SITE_DP_MODES)
        if not (self.site_noise_multiplier >= 0 and self.site_clipping_norm > 0):
            raise ValueError(
                f"privacy.site-noise-multiplier must be >= 0 and privacy.site-clipping-norm > 0, "
                f"got {self.site_noise_multiplier} and {self.site_clipping_norm}"
            )
        if not self.noise_multiplier >= 0:
            raise ValueError(
                f"privacy.noise-multiplier must be >= 0 (0: derived from privacy.target-epsilon), "
                f"got {self.noise_multiplier}"
            )
        if not self.target_epsilon > 0:
            raise ValueError(f"privacy.target-epsilon must be > 0, got {self.target_epsilon}")
        if not 0 <= self.delta < 1:
            raise ValueError(f"privacy.delta must be in [0, 1) (0: a default per privacy.unit), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"privacy.max-grad-norm must be > 0, got {self.max_grad_norm}")
        if not self.max_grad_norm_stage2 >= 0:
            raise ValueError(
                f"privacy.max-grad-norm-stage2 must be >= 0 (0: privacy.max-grad-norm), got {self.max_grad_norm_stage2}"
            )
        if self.physical_batch < 0:
            raise ValueError(f"privacy.physical-batch must be >= 0 (0: no micro-batches), got {self.physical_batch}")
        if self.unit not in ("patient", "slice"):
            raise ValueError(f"privacy.unit must be 'patient' or 'slice', got {self.unit!r}")

    def clipping_bound(self, stage: int) -> float:
        """C of a stage: ``max_grad_norm``, or in stage 2 ``max_grad_norm_stage2`` when set."""
        return self.max_grad_norm_stage2 if stage == 2 and self.max_grad_norm_stage2 > 0 else self.max_grad_norm


@dataclass(frozen=True)
class GanOptions:
    """``gan.*``: stage-2 augmentation by each site's own conditional SNGAN (docs/gan.md).

    ``augment_ratio`` 0: off; else each site adds ``augment_ratio`` x its training slices of
    generated ones (half marker-positive) to stage 2, from a GAN of ``preset`` trained for ``steps``
    generator updates on its training crops, kept at the site. With ``rounds.gan`` > 0 the GAN is
    federated instead: ``local_steps`` generator updates per site per GAN round, and ``steps`` is unused.
    """

    augment_ratio: float
    preset: str
    steps: int
    local_steps: int

    def __post_init__(self) -> None:
        if self.augment_ratio < 0 or self.steps < 1 or self.local_steps < 1:
            raise ValueError(
                f"gan.augment-ratio must be >= 0, gan.steps and gan.local-steps >= 1, "
                f"got {self.augment_ratio}, {self.steps}, {self.local_steps}"
            )
        if self.preset not in GAN_PRESETS:
            raise ValueError(f"gan.preset: unknown GAN preset {self.preset!r}; valid: {sorted(GAN_PRESETS)}")


@dataclass(frozen=True)
class OutputOptions:
    """``output.*``: where the server writes the run (history, checkpoints, the global model)."""

    dir: str
    name: str  # "": a new timestamped folder (with resume: the latest one)
    keep_checkpoints: int  # 0: all


@dataclass(frozen=True)
class EvalOptions:
    """``eval.*``: how the operating point is chosen on validation (``common.validation``)."""

    target_sensitivity: float  # 0: Youden's threshold; else the highest threshold reaching this sensitivity
    test_rounds: str  # every | stage-ends | last: which rounds are scored on the test patients

    def __post_init__(self) -> None:
        _check_choice("eval.test-rounds", self.test_rounds, TEST_ROUNDS)
        if not 0 <= self.target_sensitivity <= 1:
            raise ValueError(f"eval.target-sensitivity must be in [0, 1] (0: Youden), got {self.target_sensitivity}")


def parse_l2(text: str) -> tuple[float, ...]:
    """``radiomics.l2`` ("0.01 0.1 1", commas allowed) as 1 to 8 strengths > 0; ValueError otherwise."""
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"radiomics.l2 must be numbers separated by spaces, got {text!r}") from None
    if not values or min(values) <= 0 or len(values) > 8:
        raise ValueError(f"radiomics.l2 must hold 1 to 8 strengths > 0, got {text!r}")
    return values


@dataclass(frozen=True)
class RadiomicsOptions:
    """``radiomics.*``: the radiomics baseline (``common.radiomics``; docs/simulations.md). ``rounds`` 0:
    the run is the deep model's schedule; > 0: the radiomics federation instead (a feature-statistics
    round, then ``rounds`` FedAvg rounds of per-marker logistic weights, each site taking
    ``local_steps`` gradient steps of rate ``lr`` for every L2 strength of ``l2``, each marker's chosen
    on the sites' summed validation sums). The simulation's local and pooled radiomics methods read
    ``l2`` too."""

    rounds: int
    local_steps: int
    lr: float
    l2: str

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.local_steps < 1 or not self.lr > 0:
            raise ValueError(
                f"radiomics.rounds must be >= 0, radiomics.local-steps >= 1 and radiomics.lr > 0, "
                f"got {self.rounds}, {self.local_steps}, {self.lr}"
            )
        parse_l2(self.l2)

    @property
    def l2_values(self) -> tuple[float, ...]:
        return parse_l2(self.l2)


@dataclass(frozen=True)
class RunConfig:
    """The whole run config, typed: ``seed``, ``resume`` and one options object per key group."""

    seed: int
    resume: bool
    model: ModelOptions
    preprocess: PreprocessOptions
    data: DataOptions
    train: TrainOptions
    rounds: RoundOptions
    strategy: StrategyOptions
    privacy: PrivacyOptions
    output: OutputOptions
    gan: GanOptions
    eval: EvalOptions
    radiomics: RadiomicsOptions

    def __post_init__(self) -> None:
        self._check_gan_stage()
        self._check_radiomics()
        if self.privacy.secure_counts and self.strategy.imbalance_head:
            raise ValueError(
                "strategy.imbalance-head weights each head row by every site's own positive counts, "
                "which privacy.secure-counts keeps from the server (only their sum is learnt): "
                "switch one of the two off"
            )
        if self.privacy.dp and self.gan.augment_ratio > 0:
            raise ValueError(
                "gan.augment-ratio > 0 trains a GAN on the site's slices without DP-SGD, which would void "
                "privacy.dp's guarantee: switch one of the two off"
            )

        if self.privacy.secure_updates and (self.strategy.name in ROBUST_STRATEGIES or self.strategy.imbalance_head):
            what = (
                "strategy.imbalance-head" if self.strategy.imbalance_head else f"strategy.name {self.strategy.name!r}"
            )
            raise ValueError(
                f"privacy.secure-updates hands the server only the weighted mean of the updates, but {what} needs "
                f"every site's own update (a median, a trimmed mean, Krum's distances, per-site head weights): "
                f"use it with {sorted(set(STRATEGY_NAMES) - ROBUST_STRATEGIES)} and no imbalance head"
            )
        self._check_site_dp()

    def _check_radiomics(self) -> None:
        """``radiomics.rounds`` > 0 sends plain feature sums and weights, which no privacy option of the
        deep schedule covers (its need of ``train.init-checkpoint`` is checked by the server, ``server.radiomics``)."""
        if not self.radiomics.rounds:
            return
        privacy = self.privacy
        clashes = (
            (privacy.dp, "privacy.dp"),
            (privacy.secure_counts, "privacy.secure-counts"),
            (privacy.secure_updates, "privacy.secure-updates"),
            (privacy.site_dp != "off", "privacy.site-dp"),
        )
        for clash, other in clashes:
            if clash:
                raise ValueError(
                    f"radiomics.rounds > 0 cannot be used with {other}: the radiomics federation sends plain feature "
                    "sums and logistic weights, which that option does not cover; switch one of the two off"
                )

    def _check_gan_stage(self) -> None:
        """``rounds.gan`` > 0 (docs/gan.md design (i)) only where it has a use and no privacy option it would break."""
        if not self.rounds.gan:
            return
        if self.gan.augment_ratio <= 0:
            raise ValueError(
                "rounds.gan > 0 trains a federated generator for stage-2 augmentation, but gan.augment-ratio is 0: "
                "set gan.augment-ratio > 0 or rounds.gan = 0"
            )
        clashes = (
            (self.privacy.dp, "privacy.dp", "G and D train on the sites' crops without DP-SGD"),
            (
                self.privacy.secure_updates,
                "privacy.secure-updates",
                "the GAN rounds send each site's G and D in the clear, which the masked updates are there to prevent",
            ),
            (
                self.privacy.site_dp != "off",
                f"privacy.site-dp {self.privacy.site_dp!r}",
                "the GAN rounds' updates are neither clipped nor noised",
            ),
        )
        for clash, other, why in clashes:
            if clash:
                raise ValueError(f"rounds.gan > 0 cannot be used with {other}: {why}; switch one of the two off")

    def _check_site_dp(self) -> None:
        """Flower's site-level noise (sigma C / n) is sized for the plain mean of n clipped updates that
        the server itself aggregates; a run whose aggregate is anything else is refused."""
        mode = self.privacy.site_dp
        if mode == "off":
            return
        clashes = (
            (
                self.privacy.secure_updates,
                "privacy.secure-updates",
                "the server sees only the unmasked mean of the updates, never one site's update to clip or check",
            ),
            (
                self.strategy.name in NOT_A_PLAIN_MEAN,
                f"strategy.name {self.strategy.name!r}",
                f"{NOT_A_PLAIN_MEAN.get(self.strategy.name)}, so noise of std sigma C / n would not cover it "
                f"(use one of {sorted(set(STRATEGY_NAMES) - set(NOT_A_PLAIN_MEAN))})",
            ),
            (
                self.strategy.imbalance_head,
                "strategy.imbalance-head",
                "its head rows are weighted by each site's positives, not the plain mean the noise is sized for",
            ),
        )
        for clash, other, why in clashes:
            if clash:
                raise ValueError(
                    f"privacy.site-dp {mode!r} cannot be used with {other}: {why}; switch one of the two off"
                )

    def architecture(self) -> tuple[ModelConfig, PreprocessConfig]:
        """The architecture and the preprocessing every site and the server share.

        ``model.image-size`` 0 keeps the preset's size; the preprocessing size always equals it.
        ``model.classifier``, ``model.masked-input`` and ``model.norm`` override the preset. With
        ``privacy.dp`` the norm is always group (Opacus cannot privatise BatchNorm, whose statistics
        mix the slices of a batch), at every site and the server alike; with ``privacy.site-dp`` too
        (its noise would make a running variance negative, and its integer step counter cannot be scaled).
        """
        norm = self.model.norm
        if (self.privacy.dp or self.privacy.site_dp != "off") and norm != "group":
            key, why = (
                ("privacy.dp", "DP-SGD cannot use BatchNorm")
                if self.privacy.dp
                else ("privacy.site-dp", "site-level DP would clip and noise BatchNorm's statistics and step counter")
            )
            log(INFO, "%s: model.norm %r replaced by 'group' (GroupNorm; %s)", key, norm, why)
            norm = "group"
        overrides: dict[str, Any] = {
            "classifier": self.model.classifier,
            "masked_input": self.model.masked_input,
            "norm": norm,
            "predict_expansion": self.model.predict_expansion,
            "classifier_input": self.model.classifier_input,
            "roi_mask_channel": self.model.roi_mask_channel,
        }
        if self.model.image_size:
            overrides["image_size"] = self.model.image_size
        model = get_preset(self.model.preset, **overrides)
        pre = PreprocessConfig(
            size=model.image_size,
            denoise=self.preprocess.denoise,
            strip_skull=self.preprocess.strip_skull,
            centre=self.preprocess.centre,
        )
        return model, pre


def run_config_key(group: str, name: str) -> str:
    """The run-config key of a field: ``("train", "lr_stage2")`` -> ``train.lr-stage2``; no group: top-level."""
    key = name.replace("_", "-")
    return f"{group}.{key}" if group else key


def run_config_keys() -> list[str]:
    """Every key ``parse_run_config`` reads, in field order (what pyproject's table must hold)."""
    keys = []
    for f, kind in _field_types(RunConfig).items():
        keys += [run_config_key(f, g) for g in _field_types(kind)] if is_dataclass(kind) else [f]
    return keys


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The run config as Flower hands it over (``context.run_config``), typed and checked.

    A missing key is a KeyError, a value of the wrong type or out of range a ValueError; both name the key.
    """
    values = {
        f: _parse_group(kind, f, run_config) if is_dataclass(kind) else _read(run_config, run_config_key("", f), kind)
        for f, kind in _field_types(RunConfig).items()
    }
    return RunConfig(**values)


def model_from_run_config(run_config: Mapping[str, Any]) -> tuple[ModelConfig, PreprocessConfig]:
    """``parse_run_config(run_config).architecture()``: for callers that need nothing else of the run."""
    return parse_run_config(run_config).architecture()


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _parse_group(cls: type, group: str, run_config: Mapping[str, Any]) -> Any:
    return cls(
        **{name: _read(run_config, run_config_key(group, name), kind) for name, kind in _field_types(cls).items()}
    )


def _read(run_config: Mapping[str, Any], key: str, kind: type) -> Any:
    return _typed(key, _value(run_config, key), kind)


def _typed(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (bool, int, float or str); a value that is not one is refused, never
    guessed at (``bool("false")`` is True)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return str(value)
    if kind is bool and (isinstance(value, bool) or (number and value in (0, 1))):
        return bool(value)
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and number:
        return float(value)
    raise ValueError(f"run config {key!r} must be {kind.__name__}, got {value!r}")


def _value(run_config: Mapping[str, Any], key: str) -> Any:
    """One run-config value; a missing key names itself (every key has a default in pyproject.toml)."""
    try:
        return run_config[key]
    except KeyError:
        raise KeyError(
            f"run config has no key {key!r}: every key needs a default in [tool.flwr.app.config] of pyproject.toml"
        ) from None
