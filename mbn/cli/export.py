"""``mbn-export RUN_OR_CHECKPOINT OUT_DIR [--source BN] [--weights trained|ema] [--format hf pth onnx]``.

Writes one BN source of a trained run as a plain network in timm's Hugging Face layout (``config.json`` with the
run's normalisation and labels, ``model.safetensors``, a model card), optionally a ``torch.save`` state dict and an
ONNX graph, and optionally uploads the folder to the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EPILOG = """examples:
  mbn-export runs/advprop exported/advprop                 # the main BN, timm's folder layout + model card
  mbn-export runs/advprop exported/advprop-adv --source adv   # the auxiliary BN's network
  mbn-export runs/advprop exported/advprop-ema --weights ema --format hf onnx
  mbn-export runs/advprop exported/advprop --force --push-to-hub me/cifar10-resnet20-advprop

load it:
  import mbn, timm; timm.create_model("local-dir:exported/advprop", pretrained=True)
  model, transform = mbn.load_exported("exported/advprop")
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    from mbn.export.folder import FORMATS

    p = argparse.ArgumentParser(
        prog="mbn-export",
        description="Export a trained mbn run as a plain network (one BN source kept) that timm, torchvision, the "
        "Hugging Face Hub and ONNX runtimes load, with its normalisation, labels and a model card.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="run directory (uses checkpoints/last.pt) or a checkpoint file")
    p.add_argument("out_dir", type=Path, help="folder to write (new or empty; see --force)")
    p.add_argument("--source", metavar="BN", help="the BN source to keep (default: the main one, e.g. clean)")
    p.add_argument(
        "--weights", choices=("trained", "ema"), default="trained", help="trained weights or their EMA (ema.decay > 0)"
    )
    p.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=["hf"],
        help="hf: config.json + model.safetensors + README.md (always written); pth: also pytorch_model.bin "
        "(torch.save of the plain state dict); onnx: also model.onnx (normalisation folded in; the onnx extra)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an earlier export in OUT_DIR (only once the new one is complete)"
    )
    p.add_argument("--license", metavar="ID", help="licence of the weights for config.json and the card (e.g. mit)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to the Hugging Face Hub as USER/NAME")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    return p.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for bad input, 1 for a failed write or upload)."""
    args = parse_args(argv)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a killed export cleans up as Ctrl-C does
    try:
        from mbn.export import ExportError, push_folder, read_trained, write_export
        from mbn.export.folder import check_formats, check_out_dir
        from mbn.export.hub import check_repo_id

        check_formats(args.format)
        check_out_dir(args.out_dir, args.force)
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)
        trained = read_trained(Path(args.path), args.source, args.weights)
        written = write_export(trained, args.out_dir, args.format, force=args.force, license_id=args.license)
    except ExportError as err:
        print(f"mbn-export: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, no permission: OUT_DIR keeps what it held
        print(f"mbn-export: error: cannot write {args.out_dir}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mbn-export: interrupted; OUT_DIR is as it was", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    names = ", ".join(p.name for p in written)
    print(f"mbn-export: wrote {args.out_dir} ({names}) from {trained.checkpoint}, BN {trained.source!r}, "
          f"{trained.weights} weights, in {time.perf_counter() - start:.1f} s")  # fmt: skip
    if args.push_to_hub:
        try:
            url = push_folder(args.out_dir, args.push_to_hub, private=args.private)
        except ExportError as err:
            print(f"mbn-export: error: {err}", file=sys.stderr)
            return 1
        print(f"mbn-export: uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
