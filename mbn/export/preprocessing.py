"""The input pipeline an exported model expects, in timm's terms and as a torchvision transform.

mbn keeps ``(x - mean) / std`` inside its models; an exported network does not, so the normalisation travels in
``config.json`` (timm's ``pretrained_cfg``) and in the model card. The evaluation transform is mbn's own: RGB, the
shorter side resized (bilinear, antialiased) to ``floor(image_size / crop_pct)``, the central ``image_size`` square,
scaled to [0, 1], then normalised. ``crop_pct`` is the run's ``data.crop_fraction`` for a streamed ImageNet-style
run and 1 otherwise (CIFAR arrays and preloaded trees are evaluated at their stored size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: The one resize mbn uses (torchvision's, antialiased).
INTERPOLATION = "bilinear"
#: What an exported config may name (torchvision's InterpolationMode values that resize images).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


class UnitFloat(nn.Module):
    """uint8 pixels to float32 in [0, 1] as mbn's loaders compute it (``x.float() / 255``)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image / 255`` in float32 (float images pass unchanged)."""
        return image.float().div(255.0) if image.dtype == torch.uint8 else image.float()


@dataclass(frozen=True)
class Preprocessing:
    """Mean/std (0-1 units), square input size, crop fraction and interpolation of an exported model."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    crop_pct: float = 1.0
    interpolation: str = INTERPOLATION

    @classmethod
    def of_run(cls, data: Any, mean: Any, std: Any, image_size: int) -> Preprocessing:
        """What a run's evaluation used: its data section (``preload``, ``augment``, ``crop_fraction``) and stats."""
        from mbn.data.transforms import eval_crop_fraction

        crop = eval_crop_fraction(data)
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std), int(image_size), crop)

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any]) -> Preprocessing:
        """Read back from a ``config.json``'s ``pretrained_cfg``.

        Raises:
            ValueError: a missing or malformed entry, named.
        """
        try:
            size = cfg["input_size"]
            if len(size) != 3 or size[1] != size[2] or int(size[1]) < 1:
                raise ValueError(f"input_size: expected [C, S, S] with S >= 1, got {size}")
            prep = cls(
                tuple(float(m) for m in cfg["mean"]),
                tuple(float(s) for s in cfg["std"]),
                int(size[1]),
                float(cfg.get("crop_pct", 1.0)),
                str(cfg.get("interpolation", INTERPOLATION)),
            )
            channels = int(size[0])
        except KeyError as err:
            raise ValueError(f"pretrained_cfg has no {err.args[0]!r} entry") from None
        except TypeError as err:
            raise ValueError(f"pretrained_cfg: malformed ({err})") from None
        if not len(prep.mean) == len(prep.std) == channels:
            raise ValueError(f"mean/std: expected {channels} values each, got {len(prep.mean)} and {len(prep.std)}")
        if min(prep.std) <= 0:
            raise ValueError(f"std: expected positive values, got {list(prep.std)}")
        if not 0 < prep.crop_pct <= 1:
            raise ValueError(f"crop_pct: expected a fraction in (0, 1], got {prep.crop_pct}")
        if prep.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {prep.interpolation!r}")
        return prep

    @property
    def resize_to(self) -> int:
        """The shorter side before the centre crop (timm's ``scale_size``)."""
        return math.floor(self.image_size / self.crop_pct) if self.crop_pct < 1.0 else self.image_size

    def data_config(self) -> dict[str, Any]:
        """The data config as timm writes it (the keys ``resolve_data_config`` returns)."""
        return {
            "input_size": (len(self.mean), self.image_size, self.image_size),
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "interpolation": self.interpolation,
        }

    def transform(self) -> nn.Module:
        """A torchvision transform from a PIL image or uint8 CHW tensor to the normalised float tensor.

        On uint8 tensors it computes exactly what mbn's evaluation feeds the model (the same resize call).
        """
        from torchvision.transforms import InterpolationMode, v2

        return v2.Compose(
            [
                v2.ToImage(),
                v2.RGB(),
                v2.Resize(self.resize_to, interpolation=InterpolationMode(self.interpolation), antialias=True),
                v2.CenterCrop(self.image_size),
                UnitFloat(),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )

    def describe(self) -> str:
        """The pipeline in words, for the model card."""
        mean = ", ".join(f"{m:.4f}" for m in self.mean)
        std = ", ".join(f"{s:.4f}" for s in self.std)
        crop = (
            f"resize the shorter side to {self.resize_to} px ({self.interpolation}, antialiased), then take the "
            f"central {self.image_size} x {self.image_size} crop (crop_pct {self.crop_pct:g})"
            if self.crop_pct < 1.0
            else f"resize the shorter side to {self.image_size} px ({self.interpolation}, antialiased) and take "
            f"the central {self.image_size} x {self.image_size} square"
        )
        words = (
            f"RGB images: {crop}; scale pixel values to [0, 1]; subtract the per-channel mean ({mean}) and divide "
            f"by the per-channel std ({std})."
        )
        if all(m == 0.5 for m in self.mean) and all(s == 0.5 for s in self.std):
            words += " Inputs end up in [-1, 1]."
        return words + " The network itself does not normalise: feed it normalised tensors."
