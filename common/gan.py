"""Conditional SNGAN for marker-conditioned hematoma crops (docs/gan.md).

"Classification of Hematoma Expansion Markers by Deep Learning", §6, trains a conditional SNGAN
whose generator makes hypodensity and non-hypodensity images, and adds them to the classifier's
training data (hypodensity AUC 0.702 -> 0.721). The paper names the model and draws the label
entering both networks (its Fig. 4) but gives no architecture, so this module follows the two
papers that define a conditional SNGAN:

- Miyato et al. 2018, "Spectral Normalization for Generative Adversarial Networks": every weight
  of the discriminator is divided by its largest singular value (power iteration), which bounds
  its Lipschitz constant without a gradient penalty; hinge loss; Adam with beta1 = 0.
- Miyato & Koyama 2018, "cGANs with Projection Discriminator": the discriminator's output is
  ``psi(h) + <embed(y), h>`` (the label projected onto the image features) and the generator
  uses class-conditional batch normalisation. Projection is what "conditional SNGAN" means in
  both papers, and it beat the concatenation of a one-hot label to the input (the layout that
  Fig. 4 could also be read as) in their class-conditional experiments.

The networks work on hematoma-region crops (``client.data.crops``), not whole slices: the markers
live inside the hematoma, and a crop spends every pixel of a small GAN on it, so a site's few
hundred hematoma slices suffice. Sizes are data (:class:`GanConfig`, ``GAN_PRESETS``), one preset
per model preset: tiny and small train on a CPU, paper needs a GPU.

Images are single-channel, in [-1, 1] (the generator ends in ``tanh``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from common.config import MARKERS, check_known_keys
from common.records import GAN_D_PREFIX, GAN_G_PREFIX

#: Side of the generator's first feature map; every block doubles it.
BASE_SIDE: int = 4


@dataclass(frozen=True)
class GanConfig:
    """Architecture and optimisation of the conditional SNGAN, as data (travels as ``to_dict``).

    Attributes
    ----------
    marker: the label the GAN is conditioned on (the paper: hypodensity only).
    n_classes: number of label values (0 = marker absent, 1 = present).
    z_dim: length of the generator's noise vector.
    g_channels: generator widths: the 4x4 map has ``g_channels[0]``; block i outputs
        ``g_channels[i]`` at twice the side, so the image side is ``4 * 2 ** len(g_channels)``.
    d_channels: discriminator widths, one down-sampling residual block each (to side
        ``image_size / 2 ** len(d_channels)``), then global sum pooling.
    lr_g, lr_d, betas: Adam settings (Miyato et al.: beta1 = 0, beta2 = 0.9).
    n_dis: discriminator updates per generator update.
    batch_size: real crops per discriminator update (and generated crops per update).
    balanced: draw real crops class-balanced, so that a rare positive class is learnt too.
    crop_margin: context kept around the hematoma's bounding box, as a fraction of its side.
    crop_min_side: smallest crop side in model pixels, so that a tiny hematoma is not blown up.
    """

    marker: str = "hypodensity"
    n_classes: int = 2
    z_dim: int = 128
    g_channels: tuple[int, ...] = (512, 256, 128, 64, 32)
    d_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.9)
    n_dis: int = 5
    batch_size: int = 64
    balanced: bool = True
    crop_margin: float = 0.25
    crop_min_side: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "g_channels", tuple(int(c) for c in self.g_channels))
        object.__setattr__(self, "d_channels", tuple(int(c) for c in self.d_channels))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.marker not in MARKERS:
            raise ValueError(f"marker must be one of {list(MARKERS)}, got {self.marker!r}")
        if self.n_classes < 2 or self.z_dim < 1 or self.n_dis < 1 or self.batch_size < 1:
            raise ValueError("n_classes must be >= 2; z_dim, n_dis and batch_size >= 1")
        if not self.g_channels or not self.d_channels or min(self.g_channels + self.d_channels) < 1:
            raise ValueError("g_channels and d_channels need at least one positive width each")
        if self.image_size % 2 ** len(self.d_channels):
            raise ValueError(f"{len(self.d_channels)} discriminator blocks cannot halve side {self.image_size}")
        if self.crop_margin < 0 or self.crop_min_side < 1:
            raise ValueError("crop_margin must be >= 0 and crop_min_side >= 1")

    @property
    def image_size(self) -> int:
        """Side of the generated (and cropped) images in pixels."""
        return BASE_SIDE * 2 ** (len(self.g_channels))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(g_channels=list(self.g_channels), d_channels=list(self.d_channels), betas=list(self.betas))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GanConfig:
        return cls(**check_known_keys(cls, d, "GAN config"))


#: One preset per model preset (common.presets.PRESETS). tiny: unit tests (32 px, a few ms per
#: step); small: CPU demo (64 px); paper: GPU (128 px, Miyato & Koyama's 128-px generator
#: at half width, n_dis = 5 as in both papers).
GAN_PRESETS: dict[str, GanConfig] = {
    "tiny": GanConfig(z_dim=32, g_channels=(64, 32, 16), d_channels=(16, 32, 64), lr_d=4e-4, n_dis=1, batch_size=16),
    "small": GanConfig(
        z_dim=64, g_channels=(128, 64, 32, 16), d_channels=(16, 32, 64, 128), lr_d=4e-4, n_dis=1, batch_size=32
    ),
    "paper": GanConfig(),
}


def get_gan_preset(name: str, **overrides: Any) -> GanConfig:
    """The GAN preset called ``name`` with ``overrides`` applied (validated like any config)."""
    try:
        base = GAN_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown GAN preset {name!r}; valid: {sorted(GAN_PRESETS)}") from None
    return replace(base, **overrides) if overrides else base


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose gain and bias are looked up by class (Miyato & Koyama 2018, generator)."""

    def __init__(self, channels: int, n_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(n_classes, channels)
        self.bias = nn.Embedding(n_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class GeneratorBlock(nn.Module):
    """Residual up-sampling block: CBN-ReLU-up-conv-CBN-ReLU-conv, plus an up-sampled 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, n_classes: int) -> None:
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(c_in, n_classes)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(c_out, n_classes)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    """z [B, z_dim], class y [B] -> image [B, 1, S, S] in [-1, 1]."""

    def __init__(self, cfg: GanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.g_channels
        self.fc = nn.Linear(cfg.z_dim, c[0] * BASE_SIDE * BASE_SIDE)
        self.blocks = nn.ModuleList(GeneratorBlock(a, b, cfg.n_classes) for a, b in zip(c, c[1:] + c[-1:]))
        self.out_bn = nn.BatchNorm2d(c[-1])
        self.out_conv = nn.Conv2d(c[-1], 1, 3, padding=1)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], self.cfg.g_channels[0], BASE_SIDE, BASE_SIDE)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class DiscriminatorBlock(nn.Module):
    """Residual down-sampling block with spectrally normalised convolutions.

    ``first`` omits the leading ReLU (the input is an image, Miyato et al.'s "optimized" block).
    """

    def __init__(self, c_in: int, c_out: int, first: bool) -> None:
        super().__init__()
        self.first = first
        self.conv1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.shortcut = spectral_norm(nn.Conv2d(c_in, c_out, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(x)
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(h))), 2)
        return h + self.shortcut(F.avg_pool2d(x, 2))


class Discriminator(nn.Module):
    """Projection discriminator: image [B, 1, S, S], class y [B] -> score [B] (real > 0 > fake)."""

    def __init__(self, cfg: GanConfig) -> None:
        super().__init__()
        c = (1,) + cfg.d_channels
        self.blocks = nn.ModuleList(DiscriminatorBlock(a, b, first=i == 0) for i, (a, b) in enumerate(zip(c, c[1:])))
        self.linear = spectral_norm(nn.Linear(c[-1], 1))
        self.embed = spectral_norm(nn.Embedding(cfg.n_classes, c[-1]))

    def features(self, x: Tensor) -> Tensor:
        """Globally sum-pooled features ``h`` [B, C] (also usable as a feature extractor)."""
        for block in self.blocks:
            x = block(x)
        return F.relu(x).sum(dim=(2, 3))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.features(x)
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


def build_gan(cfg: GanConfig, seed: int) -> tuple[Generator, Discriminator]:
    """Generator and discriminator with weights (and power-iteration vectors) fixed by ``seed``.

    The global RNG is left as it was, so building a GAN does not shift other seeded code.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(cfg), Discriminator(cfg)


def d_hinge_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Discriminator hinge loss (Miyato et al. 2018): scores beyond the +-1 margin cost nothing."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def g_hinge_loss(fake_scores: Tensor) -> Tensor:
    """Generator loss of the hinge GAN: raise the discriminator's score of generated images."""
    return -fake_scores.mean()


def spectral_norms(module: nn.Module) -> dict[str, float]:
    """Largest singular value of every spectrally normalised weight, as SN sees it (reshaped to 2-D).

    Reading ``weight`` runs the parametrisation, so call it after forward passes in train mode
    (each does one power iteration); values near 1 mean the normalisation works.
    """
    out = {}
    for name, sub in module.named_modules():
        if torch.nn.utils.parametrize.is_parametrized(sub, "weight"):
            w = sub.weight.detach()
            out[name] = float(torch.linalg.svdvals(w.reshape(w.shape[0], -1)).max())
    return out


# --- the federated GAN stage (docs/gan.md design (i)) -----------------------------------------

#: State-dict key endings of spectral norm's power-iteration vectors (``parametrizations.weight.0._u``).
POWER_VECTORS: tuple[str, ...] = ("._u", "._v")


def gan_state_dict(G: Generator, D: Discriminator | None = None) -> dict[str, Tensor]:
    """G's (and D's) state dict under ``gan.g.`` / ``gan.d.`` keys: what a GAN round exchanges.

    D's spectral-normalised layers appear as ``parametrizations.weight.original`` (the raw weight)
    plus the power-iteration vectors ``_u``, ``_v``; the normalised weight is a function of these,
    so averaging them and loading the mean back gives one consistent discriminator."""
    out = {GAN_G_PREFIX + k: v for k, v in G.state_dict().items()}
    if D is not None:
        out |= {GAN_D_PREFIX + k: v for k, v in D.state_dict().items()}
    return out


def load_gan_state_dict(G: Generator, D: Discriminator | None, state: Mapping[str, Tensor]) -> None:
    """``gan_state_dict`` reversed, strictly: every key of G (and of D, when given) must be there."""
    G.load_state_dict({k[len(GAN_G_PREFIX) :]: v for k, v in state.items() if k.startswith(GAN_G_PREFIX)})
    if D is not None:
        D.load_state_dict({k[len(GAN_D_PREFIX) :]: v for k, v in state.items() if k.startswith(GAN_D_PREFIX)})


def with_unit_power_vectors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every power-iteration vector scaled to unit length.

    A weighted mean of unit vectors is shorter than 1; in eval mode spectral norm reads sigma as
    ``u @ W @ v`` from the stored vectors without normalising them, so an averaged D would be
    mis-scaled. (In train mode the next power iteration normalises them anyway.)"""
    return {k: F.normalize(v, dim=0, eps=1e-12) if k.endswith(POWER_VECTORS) else v for k, v in state.items()}
