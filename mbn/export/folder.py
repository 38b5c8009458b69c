"""Write an export folder: timm's Hugging Face layout, a model card, on request a state dict and an ONNX graph.

The layout: ``config.json``, ``model.safetensors`` and ``README.md``; ``--format pth`` adds ``pytorch_model.bin``
and ``--format onnx`` adds ``model.onnx``.

Every file is written into a hidden staging folder inside ``OUT_DIR`` and moved into place (one ``os.replace`` per
file) only when the whole export is done, so an export that fails half-way leaves ``OUT_DIR`` as it was (and with
``--force``, the previous export intact). ``OUT_DIR`` itself is kept: an existing empty folder, a mount point or a
symbolic link to a folder is filled, not replaced.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mbn
from mbn.errors import first_line
from mbn.export.trained import ExportError, TrainedNetwork

#: ``--format`` values: the Hugging Face folder (always written), a torch.save state dict, an ONNX graph.
FORMATS = ("hf", "pth", "onnx")
#: Entries of timm's pretrained_cfg that describe the weights a model started from, not the exported ones.
_SOURCE_WEIGHT_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "description", "hf_hub_id")
#: Test-time recommendations of those weights (another size or crop); an export is evaluated as its run was.
_TEST_TIME_KEYS = ("test_input_size", "test_crop_pct", "test_pool_size", "pool_size", "label_names")


#: What an export folder may hold: the files mbn-export writes, and staging folders an interrupted export left.
EXPORT_FILES = ("README.md", "config.json", "model.safetensors", "pytorch_model.bin", "model.onnx")
_STAGING = ".mbn-export-"
_STAGING_NAME = re.compile(r"^\.mbn-export-(\d+)$")


def _staging_pid(path: Path) -> int | None:
    """The process id in a staging folder's name (``.mbn-export-<pid>``), else None."""
    match = _STAGING_NAME.match(path.name)
    return int(match.group(1)) if match is not None and path.is_dir() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_out_dir(out_dir: Path, force: bool) -> None:
    """``OUT_DIR`` is new or empty, or (with ``force``) an earlier export to replace.

    ``force`` replaces only a folder mbn-export wrote (its ``config.json`` has an ``mbn`` entry) that holds nothing
    but export files: never a run directory, a clone with its history, or a folder with a run inside.

    Raises:
        ExportError: a file, or a non-empty folder that is not an earlier export or is one without ``force``.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder; choose another OUT_DIR")
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        pid = _staging_pid(path)
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise ExportError(f"{out_dir}: another mbn-export (process {pid}) is writing it; wait for it to finish")
    entries = [p for p in out_dir.iterdir() if _staging_pid(p) is None]
    if not entries:
        return
    others = sorted(p.name for p in entries if p.name not in EXPORT_FILES or not p.is_file())
    if not _is_export(out_dir):
        raise ExportError(f"{out_dir}: exists, is not empty and was not written by mbn-export; choose another OUT_DIR")
    if others:
        raise ExportError(
            f"{out_dir}: holds an earlier export and other things ({', '.join(others[:4])}); mbn-export replaces "
            "only its own files: choose another OUT_DIR"
        )
    if not force:
        raise ExportError(f"{out_dir}: holds an earlier export; choose another OUT_DIR or pass --force to replace it")


def _is_export(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("mbn"), dict)


def mbn_metadata(trained: TrainedNetwork) -> dict[str, Any]:
    """What ``config.json`` records of the run under its ``mbn`` key (timm ignores it)."""
    return {
        "version": mbn.__version__,
        "model": trained.model_name,
        "source": trained.source,
        "sources": list(trained.sources),
        "weights": trained.weights,
        "step": trained.state.get("step"),
        "run": trained.run_dir.name,  # names only: the folder may be published
        "checkpoint": trained.checkpoint.name,
    }


def plain_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's tensors, contiguous and unshared (what safetensors writes)."""
    return {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}


def timm_network(trained: TrainedNetwork) -> nn.Module:
    """The network as timm builds it (its ``pretrained_cfg`` and construction arguments), holding the weights.

    timm models are already timm's; mbn's CIFAR ResNets are rebuilt through timm's registry
    (:mod:`mbn.timm_models`) and loaded with the trained weights.
    """
    import timm

    from mbn.timm_models import GENERIC, architecture_name, register

    name = trained.model_name
    if name.startswith("timm."):
        net = trained.net
    else:
        from mbn.models import cifar_depth, cifar_resnet_layers

        depth = cifar_depth(name)
        if depth is None:
            raise ExportError(f"model {name!r}: timm cannot describe it (not a timm model or an mbn CIFAR ResNet)")
        register()
        arch = architecture_name(depth)
        kwargs: dict[str, Any] = {"num_classes": trained.num_classes, "width": trained.width}
        if arch == GENERIC:
            kwargs["layers"] = cifar_resnet_layers(depth)
        net = timm.create_model(arch, **kwargs)
        net.load_state_dict(trained.net.state_dict())
    if not isinstance(getattr(net, "pretrained_cfg", None), dict):
        raise ExportError(f"model {name!r}: timm cannot describe it (the network has no pretrained_cfg)")
    return net.eval()


def _write_timm(trained: TrainedNetwork, folder: Path) -> None:
    from timm.models import save_for_hf

    net = timm_network(trained)
    try:
        save_for_hf(
            net,
            str(folder),
            model_config={"label_names": list(trained.class_names), "mbn": mbn_metadata(trained)},
            safe_serialization=True,
        )
    except (ValueError, TypeError, AssertionError, AttributeError) as err:
        raise ExportError(f"model {trained.model_name!r}: timm cannot describe it ({first_line(err)})") from None
    # the run's preprocessing replaces what timm knows of the weights the model started from
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    pretrained_cfg = config["pretrained_cfg"]
    for key in (*_SOURCE_WEIGHT_KEYS, *_TEST_TIME_KEYS):
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update(trained.preprocessing.data_config())
    pretrained_cfg["num_classes"] = trained.num_classes
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _write_torchvision(trained: TrainedNetwork, folder: Path) -> None:
    from safetensors.torch import save_file

    prep = trained.preprocessing
    pretrained_cfg = {
        **prep.data_config(),
        "num_classes": trained.num_classes,
        "label_names": list(trained.class_names),
    }
    config = {
        "architecture": trained.model_name,
        "library": "torchvision",
        "num_classes": trained.num_classes,
        "label_names": list(trained.class_names),
        "model_args": {"num_classes": trained.num_classes},
        "pretrained_cfg": pretrained_cfg,
        "mbn": mbn_metadata(trained),
    }
    save_file(plain_state_dict(trained.net), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_onnx(trained: TrainedNetwork, folder: Path) -> None:
    from mbn.models import ImageClassifier

    prep = trained.preprocessing
    wrapped = ImageClassifier(trained.net, prep.mean, prep.std).eval()  # normalisation folded into the graph
    example = torch.rand(2, len(prep.mean), prep.image_size, prep.image_size)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch's exporter narrates its passes on stdout
            _onnx_export(wrapped, example, folder / "model.onnx")
    except ImportError as err:
        raise ExportError(f"--format onnx: {ONNX_EXTRA} ({first_line(err)})") from None
    except OSError:  # the folder, not the exporter
        raise
    except Exception as err:  # torch.onnx.OnnxExporterError and what the tracer raises
        raise ExportError(
            f"--format onnx: torch's exporter failed for {trained.model_name} ({type(err).__name__}: "
            f"{first_line(err)[:300]}); export without onnx"
        ) from None


ONNX_EXTRA = "needs the onnx extra: pip install 'mbn-advprop[onnx]'"


def check_formats(formats: Sequence[str]) -> None:
    """Known formats, and for ``onnx`` the packages torch's exporter needs, before anything is read or written.

    Raises:
        ExportError: an unknown format, or ``onnx`` without its packages.
    """
    import importlib.util

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"--format: unknown {', '.join(unknown)}; expected some of {', '.join(FORMATS)}")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if "onnx" in formats and missing:
        raise ExportError(f"--format onnx: {ONNX_EXTRA} (missing {', '.join(missing)})")


def _onnx_export(wrapped: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        wrapped,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        dynamo=True,
        external_data=False,
    )


def write_export(
    trained: TrainedNetwork,
    out_dir: Path,
    formats: Sequence[str] = ("hf",),
    *,
    force: bool = False,
    license_id: str | None = None,
) -> list[Path]:
    """Write ``trained`` into ``out_dir``; returns the files written.

    Raises:
        ExportError: a bad ``out_dir`` or format, or a model timm cannot describe; ``out_dir`` is left as it was.
    """
    from mbn.export.card import model_card

    check_formats(formats)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    created = _make_dirs(out_dir)
    before = _listing(out_dir)
    staging = out_dir / f"{_STAGING}{os.getpid()}"
    try:
        for stale in out_dir.iterdir():  # left by an export that was killed (check_out_dir refused live ones)
            if _staging_pid(stale) is not None:
                shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
        (_write_torchvision if trained.library == "torchvision" else _write_timm)(trained, staging)
        if license_id:
            _set_license(staging / "config.json", license_id)
        if "pth" in formats:
            torch.save(plain_state_dict(trained.net), staging / "pytorch_model.bin")
        if "onnx" in formats:
            _write_onnx(trained, staging)
        names = sorted([*(p.name for p in staging.iterdir()), "README.md"])
        (staging / "README.md").write_text(model_card(trained, names, license_id))
        _same_mode(staging)
        if _listing(out_dir) != before:  # another process wrote there meanwhile: replace nothing
            raise ExportError(f"{out_dir}: changed while this export was written; nothing was replaced, try again")
        _move_into(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):  # folders this call made, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return sorted(p for p in out_dir.iterdir() if p.name in EXPORT_FILES)


def _listing(out_dir: Path) -> dict[str, int]:
    """``OUT_DIR``'s entries other than staging folders, with their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir() if _staging_pid(p) is None}


def _make_dirs(out_dir: Path) -> list[Path]:
    """Create ``out_dir`` and its missing parents; returns those created, outermost first."""
    missing = [p for p in (out_dir, *out_dir.parents) if not p.exists()][::-1]
    out_dir.mkdir(parents=True, exist_ok=True)
    return missing


def _same_mode(staging: Path) -> None:
    """Every file readable as the user's umask allows (safetensors writes its file 0600)."""
    mode = (staging / "config.json").stat().st_mode & 0o777
    for path in staging.iterdir():
        path.chmod(mode)


def _set_license(config_path: Path, license_id: str) -> None:
    config = json.loads(config_path.read_text())
    config["pretrained_cfg"]["license"] = license_id
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _move_into(staging: Path, out_dir: Path) -> None:
    """Move the complete export into ``out_dir``: an earlier export's files that this one lacks go first."""
    new = {p.name for p in staging.iterdir()}
    for name in EXPORT_FILES:
        if name not in new and (out_dir / name).is_file():
            (out_dir / name).unlink()
    for name in sorted(new, key=lambda n: n == "config.json"):  # config.json last: a folder is an export once whole
        os.replace(staging / name, out_dir / name)
    staging.rmdir()
