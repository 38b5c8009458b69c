"""Class lists of the published suites, and the map from a suite's labels to a model's outputs.

ImageNet's synsets and the ImageNet-A / ImageNet-R subsets come from timm's own data files
(``timm/data/_info/imagenet_synsets.txt`` and ``imagenet_{a,r}_synsets.txt``), read where timm installed them;
CIFAR's label orders are the datasets' own ``batches.meta`` / ``meta`` names (both happen to be alphabetical).

Matching is by class *name*: a model trained on an ImageFolder tree stores its folder names (wnids for ImageNet),
one trained on CIFAR the names above; the suite's labels are looked up among them.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
"""CIFAR-10's label order (``batches.meta``): label ``i`` of CIFAR-10-C's ``labels.npy`` is class ``i``."""

# fmt: off
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
)
"""CIFAR-100's fine label order (``meta``: ``fine_label_names``)."""
# fmt: on


class ClassMatchError(ValueError):
    """A suite's classes do not fit the model's; the message names what is missing."""


def _timm_list(file: str) -> tuple[str, ...]:
    data = pkgutil.get_data("timm.data", f"_info/{file}")
    if data is None:  # pragma: no cover - timm always ships these files
        raise FileNotFoundError(f"timm does not ship _info/{file}")
    return tuple(line.strip() for line in data.decode("utf-8").splitlines() if line.strip())


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """ImageNet-1k's 1000 wnids in class-index order (timm's ``imagenet_synsets.txt``)."""
    return _timm_list("imagenet_synsets.txt")


@cache
def imagenet_subset(name: str) -> tuple[str, ...]:
    """The 200 wnids of ``imagenet-a`` or ``imagenet-r`` (timm's ``imagenet_{a,r}_synsets.txt``), in 1k order."""
    letter = {"imagenet-a": "a", "imagenet-r": "r"}[name]
    return _timm_list(f"imagenet_{letter}_synsets.txt")


def _shown(names: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(names[:limit])
    return f"{head} and {len(names) - limit} more" if len(names) > limit else head


@dataclass(frozen=True)
class ClassMap:
    """How a suite is scored by a model: which outputs compete, and each suite label's position among them.

    Attributes:
        outputs: the model's output indices that compete (all of them, or a suite's subset), shape ``(K,)``.
        targets: for each suite label ``i``, the position of its class in ``outputs``, shape ``(num suite labels,)``.
        restricted: whether ``outputs`` is a subset of the model's classes (ImageNet-A/-R, a partial folder).
    """

    outputs: torch.Tensor
    targets: torch.Tensor
    restricted: bool

    @property
    def num_classes(self) -> int:
        """Number of competing classes."""
        return int(self.outputs.numel())


def match_classes(
    what: str,
    suite_labels: Sequence[str],
    model_classes: Sequence[str],
    *,
    restrict_to: Sequence[str] | None = None,
) -> ClassMap:
    """Map a suite's label names onto the model's classes by name.

    Args:
        what: the suite, for messages (``--suite imagenet-a``).
        suite_labels: the class name of each suite label index.
        model_classes: the class names stored with the model, in output order.
        restrict_to: score only among these classes (the suite's class list); ``None``: among all the model's.

    Raises:
        ClassMatchError: no class in common, a suite label the model does not have, or (with ``restrict_to``)
            a suite class the model lacks; one line naming the first few.
    """
    index = {name: i for i, name in enumerate(model_classes)}
    if not any(name in index for name in suite_labels):
        raise ClassMatchError(
            f"{what}: no class in common with the model (suite classes {_shown(list(suite_labels))}; "
            f"model classes {_shown(list(model_classes))})"
        )
    competing = list(restrict_to) if restrict_to is not None else list(model_classes)
    missing = [name for name in dict.fromkeys([*competing, *suite_labels]) if name not in index]
    if missing:
        raise ClassMatchError(
            f"{what}: the model lacks {len(missing)} of the suite's classes ({_shown(missing)}); "
            "it must have been trained on all of them"
        )
    position = {name: j for j, name in enumerate(competing)}
    stray = [name for name in suite_labels if name not in position]
    if stray:
        raise ClassMatchError(f"{what}: images of classes outside the suite's class list ({_shown(stray)})")
    outputs = torch.as_tensor([index[name] for name in competing], dtype=torch.long)
    targets = torch.as_tensor([position[name] for name in suite_labels], dtype=torch.long)
    return ClassMap(outputs, targets, restricted=len(competing) < len(model_classes))
