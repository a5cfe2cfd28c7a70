"""The run as the server carries it out: ``common.run_config.RunConfig`` with the server's derived values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from common.config import PreprocessConfig
from common.presets import ModelConfig
from common.records import GAN_STAGE
from common.run_config import GanOptions, PrivacyOptions, RunConfig, StrategyOptions, parse_run_config
from common.validation import evaluated


@dataclass(frozen=True)
class ServerRunConfig:
    """What the server reads of the run config (keys and defaults: ``[tool.flwr.app.config]``),
    with the zeros that mean "none" or "the other key" resolved."""

    model: ModelConfig
    preprocess: PreprocessConfig
    seed: int
    rounds_stage1: int
    rounds_stage2: int
    timeout: float | None
    lr: float
    lr_stage2: float
    local_epochs: int
    local_steps: dict[int, int]  # per stage (TrainOptions.steps)
    max_pos_weight: float | None
    pos_weight: str
    strategy: StrategyOptions
    output_dir: Path
    run_name: str
    keep_checkpoints: int
    resume: bool
    #: ``privacy.secure-counts``: the counts round is a secure sum (server.secure_counts).
    secure_counts: bool
    #: ``rounds.census``: off | before | only (``server.census``).
    census: str
    #: ``privacy.secure-updates``: train rounds aggregate masked updates (server.secure_updates).
    secure_updates: bool
    #: ``train.init-checkpoint``: the global model's starting weights ("" : the seed's init).
    init_checkpoint: str
    #: ``eval.target-sensitivity``: 0 = Youden's threshold per marker (``common.validation``).
    target_sensitivity: float
    #: ``eval.test-rounds``: which rounds are scored (``common.validation.evaluated``).
    test_rounds: str
    #: ``privacy.*``: the server reads the site-level DP settings of it (``server.site_dp``).
    privacy: PrivacyOptions
    #: ``rounds.gan``: rounds of the federated GAN stage between stages 1 and 2 (docs/gan.md design (i)).
    rounds_gan: int
    #: ``gan.*``: the GAN preset and the local steps of a GAN round.
    gan: GanOptions

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ServerRunConfig:
        return cls.from_config(parse_run_config(rc))

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ServerRunConfig:
        model, pre = cfg.architecture()
        train = cfg.train
        return cls(
            model=model,
            preprocess=pre,
            seed=cfg.seed,
            rounds_stage1=cfg.rounds.stage1,
            rounds_stage2=cfg.rounds.stage2,
            timeout=cfg.rounds.timeout if cfg.rounds.timeout > 0 else None,
            lr=train.lr,
            lr_stage2=train.lr_stage2 or train.lr,
            local_epochs=train.local_epochs,
            local_steps={stage: train.steps(stage) for stage in (1, 2)},
            max_pos_weight=train.max_pos_weight if train.max_pos_weight > 0 else None,
            pos_weight=train.pos_weight,
            strategy=cfg.strategy,
            output_dir=Path(cfg.output.dir).expanduser().resolve(),
            run_name=cfg.output.name,
            keep_checkpoints=cfg.output.keep_checkpoints,
            resume=cfg.resume,
            secure_counts=cfg.privacy.secure_counts,
            census=cfg.rounds.census,
            secure_updates=cfg.privacy.secure_updates,
            init_checkpoint=train.init_checkpoint,
            target_sensitivity=cfg.eval.target_sensitivity,
            test_rounds=cfg.eval.test_rounds,
            privacy=cfg.privacy,
            rounds_gan=cfg.rounds.gan,
            gan=cfg.gan,
        )

    @property
    def total_rounds(self) -> int:
        return self.rounds_stage1 + self.rounds_gan + self.rounds_stage2

    def stage_of(self, server_round: int) -> int | str:
        """1, ``GAN_STAGE`` ("gan") or 2: the GAN stage's rounds come between the two stages."""
        if server_round <= self.rounds_stage1:
            return 1
        return GAN_STAGE if server_round <= self.rounds_stage1 + self.rounds_gan else 2

    def evaluates(self, server_round: int) -> bool:
        """Whether the sites score the global model after this stage-1 or stage-2 round
        (``eval.test-rounds``; GAN rounds leave the joint model as it was and are never scored)."""
        if self.stage_of(server_round) == GAN_STAGE:
            return False
        if server_round > self.rounds_stage1:
            server_round -= self.rounds_gan
        return evaluated(server_round, self.rounds_stage1, self.rounds_stage2, self.test_rounds)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "seed": self.seed,
            "rounds": {
                "stage1": self.rounds_stage1,
                "gan": self.rounds_gan,
                "stage2": self.rounds_stage2,
                "census": self.census,
            },
            "lr": self.lr,
            "lr_stage2": self.lr_stage2,
            "local_epochs": self.local_epochs,
            "local_steps": self.local_steps,
            "max_pos_weight": self.max_pos_weight,
            "pos_weight": self.pos_weight,
            "strategy": asdict(self.strategy),
            "secure_counts": self.secure_counts,
            "secure_updates": self.secure_updates,
            "init_checkpoint": self.init_checkpoint,
            "site_dp": {
                "mode": self.privacy.site_dp,
                "noise_multiplier": self.privacy.site_noise_multiplier,
                "clipping_norm": self.privacy.site_clipping_norm,
            },
        }


def resolve_run_dir(cfg: ServerRunConfig) -> Path:
    """The run's output folder: ``output.dir/output.name``. An empty name is a new timestamped
    folder, or with ``resume`` the most recent one. A named folder that already holds checkpoints
    is only reused with ``resume`` (no run silently overwrites another)."""
    if cfg.run_name:
        out = cfg.output_dir / cfg.run_name
        if not cfg.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            raise FileExistsError(
                f"{out} already holds a run: set resume = true to continue it, or choose another output.name"
            )
        return out
    if cfg.resume:
        runs = (
            sorted(p for p in cfg.output_dir.glob("*") if (p / "checkpoints").is_dir())
            if cfg.output_dir.is_dir()
            else []
        )
        if runs:
            return max(runs, key=lambda p: p.stat().st_mtime)
    return cfg.output_dir / datetime.now().strftime("%Y%m%d-%H%M%S")
