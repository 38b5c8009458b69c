"""Export a trained run as a plain network the ecosystem loads (``mbn-export``), and load such a folder back.

* :mod:`mbn.export.trained`: :func:`read_trained`, one BN source of a run as a plain network, with its labels;
* :mod:`mbn.export.preprocessing`: :class:`Preprocessing`, the normalisation and evaluation transform it expects;
* :mod:`mbn.export.folder`: :func:`write_export`, timm's Hugging Face folder (+ ``pth``, ``onnx``);
* :mod:`mbn.export.card`: the model card; :mod:`mbn.export.hub`: :func:`push_folder`;
* :mod:`mbn.export.load`: :func:`load_exported`.
"""

from mbn.export.folder import FORMATS, write_export
from mbn.export.hub import push_folder
from mbn.export.load import load_exported
from mbn.export.preprocessing import Preprocessing
from mbn.export.trained import ExportError, TrainedNetwork, read_trained

__all__ = [
    "FORMATS",
    "ExportError",
    "Preprocessing",
    "TrainedNetwork",
    "load_exported",
    "push_folder",
    "read_trained",
    "write_export",
]
