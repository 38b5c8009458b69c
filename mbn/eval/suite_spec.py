"""``KIND[:LABEL]=DIR``: naming a published robustness suite (light: the recipe checks read it at load time)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = (
    "cifar10-c",
    "cifar100-c",
    "imagenet-c",
    "imagenet-a",
    "imagenet-r",
    "imagenet-sketch",
    "imagenet-v2",
    "stylized-imagenet",
    "folder",
)
"""Suite kinds ``mbn-eval --suite KIND=DIR`` reads."""

CORRUPTION_KINDS = ("cifar10-c", "cifar100-c", "imagenet-c")
WHERE = {
    "cifar10-c": "https://zenodo.org/records/2535967 (Hendrycks & Dietterich, ICLR 2019)",
    "cifar100-c": "https://zenodo.org/records/3555552 (Hendrycks & Dietterich, ICLR 2019)",
    "imagenet-c": "https://zenodo.org/records/2235448 (Hendrycks & Dietterich, ICLR 2019)",
    "imagenet-a": "https://github.com/hendrycks/natural-adv-examples (Hendrycks et al., CVPR 2021)",
    "imagenet-r": "https://github.com/hendrycks/imagenet-r (Hendrycks et al., ICCV 2021)",
    "imagenet-sketch": "https://github.com/HaohanWang/ImageNet-Sketch (Wang et al., NeurIPS 2019)",
    "imagenet-v2": "https://github.com/modestyachts/ImageNetV2 (Recht et al., ICML 2019)",
    "stylized-imagenet": "https://github.com/rgeirhos/Stylized-ImageNet (Geirhos et al., ICLR 2019)",
    "folder": "any ImageFolder-style tree",
}
"""Where each suite is published."""


class SuiteError(ValueError):
    """A suite specification, folder or file is unusable; the message names it and what was expected."""


@dataclass(frozen=True)
class SuiteSpec:
    """``KIND[:LABEL]=DIR``: the kind of suite, its key in ``eval.json`` (the label, else the kind) and its folder."""

    kind: str
    key: str
    root: Path
    origin: str = "--suite"  # where it was named: the command line, or the recipe's eval.suites

    @property
    def name(self) -> str:
        """How messages name the suite: ``--suite imagenet-a`` or ``key 'eval.suites.imagenet-a'``."""
        return f"key 'eval.suites.{self.key}'" if self.origin == "eval.suites" else f"{self.origin} {self.key}"

    @classmethod
    def parse(cls, text: str, what: str = "--suite", origin: str = "--suite") -> SuiteSpec:
        """Parse ``KIND[:LABEL]=DIR``.

        Raises:
            SuiteError: no ``=``, an unknown kind, or an empty label or folder.
        """
        name, sep, root = str(text).partition("=")
        kind, _, label = name.strip().partition(":")
        if not sep or not root.strip():
            raise SuiteError(f"{what}: expected KIND=DIR (KIND one of {', '.join(KINDS)}), got {text!r}")
        if kind not in KINDS:
            raise SuiteError(f"{what}: unknown suite {kind!r}; expected one of {', '.join(KINDS)}")
        if ":" in name and not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
            raise SuiteError(f"{what}: the label in {text!r} must be letters, digits, '_', '.' or '-' (KIND:LABEL=DIR)")
        return cls(kind, label or kind, Path(os.path.expanduser(root.strip())), origin)


def parse_specs(texts: Sequence[str], what: str = "--suite", origin: str = "--suite") -> list[SuiteSpec]:
    """Parse several specs; two with the same key are refused (give one a label: ``folder:sketch2=DIR``)."""
    specs = [SuiteSpec.parse(t, what, origin) for t in texts]
    seen: set[str] = set()
    for spec in specs:
        if spec.key in seen:
            raise SuiteError(f"{what}: {spec.key!r} named twice; give one a label (KIND:LABEL=DIR)")
        seen.add(spec.key)
    return specs
