"""Datasets, CPU-side base transforms and resumable, deterministic loaders.

Every preloaded dataset is held in memory as uint8 NHWC arrays: CIFAR-10/100 through torchvision, an ImageFolder
tree (``<root>/{train,test}/<class>/*``, decoded once and cached as ``.npy``) or the embedded synthetic
shape set (:mod:`mbn.synthetic`). Training batches get the standard CIFAR base augmentation (zero-padded
random crop and horizontal flip, He et al. 2016) with albumentations in DataLoader workers; each
sample's augmentation is seeded from ``(seed, epoch, sample index)``, so an epoch's batches are
identical bit for bit whatever the worker count, and a resumed run can jump to any batch without
touching the ones before. A streamed ImageFolder (``data.preload=false``) is decoded batch by batch in the
workers instead. Batches are ``(uint8 NCHW images, int64 labels)``; :func:`to_device` turns them into float
images in [0, 1] on the training device, where the domains run.

Modules, each importing only those above it:

* :mod:`mbn.data.arrays`: :class:`ArraySplit`, :class:`DataStats`, :func:`subset_indices`, :func:`channel_stats`.
* :mod:`mbn.data.transforms`: :func:`base_transform`, :func:`resize_centre_crop`, ``random_resized_crop_box``.
* :mod:`mbn.data.files`: listing, checking, reading and decoding the image files of an ImageFolder tree.
* :mod:`mbn.data.loaders`: per-sample seeds, :class:`ResumableBatches` and the training and evaluation loaders.
* :mod:`mbn.data.fingerprints`: identities of a training set, checked on resume.
* :mod:`mbn.data.streamed`: a streamed ImageFolder, decoded in workers (or on the device).
* :mod:`mbn.data.shards`: WebDataset tar shards (``data.name=webdataset``); :mod:`mbn.data.make_shards` writes them.
* :mod:`mbn.data.preloaded`: CIFAR, a decoded and cached ImageFolder tree, synthetic; :func:`load_arrays`.
* :mod:`mbn.data.bundle`: :func:`build_data` and :class:`DataBundle`, from the ``data`` section of a recipe.
"""

from __future__ import annotations

from mbn.data.arrays import ArraySplit, DataStats, channel_stats, subset_indices
from mbn.data.bundle import DataBundle, build_data, build_streamed_data
from mbn.data.files import (
    check_image_files,
    check_tree,
    decode_image_file,
    folder_classes,
    folder_samples,
    read_image_file,
)
from mbn.data.fingerprints import streamed_fingerprints, training_set_fingerprint
from mbn.data.loaders import (
    AugmentedArrayDataset,
    Batch,
    DeviceTrainLoader,
    EvalLoader,
    ResumableBatches,
    TrainLoader,
    closing_workers,
    collate_batch,
    epoch_permutation,
    sample_seeds,
    to_device,
    worker_init_fn,
)
from mbn.data.preloaded import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    default_cache_dir,
    load_arrays,
    load_image_folder,
    load_image_folder_split,
    load_test_split,
)
from mbn.data.transforms import base_transform, resize_centre_crop

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "ArraySplit",
    "AugmentedArrayDataset",
    "Batch",
    "DataBundle",
    "DataStats",
    "DeviceTrainLoader",
    "EvalLoader",
    "ResumableBatches",
    "TrainLoader",
    "base_transform",
    "build_data",
    "build_streamed_data",
    "channel_stats",
    "check_image_files",
    "check_tree",
    "closing_workers",
    "collate_batch",
    "decode_image_file",
    "default_cache_dir",
    "epoch_permutation",
    "folder_classes",
    "folder_samples",
    "load_arrays",
    "load_image_folder",
    "load_image_folder_split",
    "load_test_split",
    "read_image_file",
    "resize_centre_crop",
    "sample_seeds",
    "streamed_fingerprints",
    "subset_indices",
    "to_device",
    "training_set_fingerprint",
    "worker_init_fn",
]
