"""``mbn-export`` and ``mbn.load_exported``: timm's folder layout, fresh-process loading, equal logits and accuracy,
the run's normalisation and labels, ``--source``/``--weights``, ONNX, the Hub upload (offline), timm's split BN, and
one-line errors."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mbn
from mbn.checkpoint import load_checkpoint
from mbn.cli.eval import main as eval_main
from mbn.cli.export import main as export_main
from mbn.eval.loading import load_run
from mbn.export import ExportError, Preprocessing, load_exported, read_trained
from tests import runs

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("apple", "bus", "cloud")
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def make_tree(root: Path, per_class: dict[str, int]) -> Path:
    """A tiny ImageFolder tree of 32-px PNGs (lossless: every reader sees the same pixels), one colour per class."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 96, (32, 32, 3), dtype=np.uint8)
                image[..., c] += 150  # learnable in a few steps: the class is the brightest channel
                Image.fromarray(image).save(root / split / name / f"{i:03d}.png")
    return root


def train(out: Path, *extra: str) -> Path:
    """A 3-step AdvProp run of the tiny setting (:mod:`tests.runs`) into ``out``."""
    code = runs.train(REPO / "recipes" / "advprop.yaml", out, "trainer.max_steps=3", "logging.tensorboard=false",
                      "data.batch_size=12", *extra)  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"), {"train": 12, "test": 8})


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """The decoded-image cache of this module's runs, apart from the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MBN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def evaluated_run(out: Path, tree: Path, *extra: str) -> Path:
    """A run on the tree, evaluated by mbn-eval (clean and per-BN accuracy)."""
    run = train(out, "data.name=imagefolder", f"data.root={tree}", *extra)
    assert eval_main([str(run), "--device", "cpu"]) == 0
    return run


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory: pytest.TempPathFactory, tree: Path, cache: None) -> Path:
    """An AdvProp run (clean + adv BNs, weight EMA) of a CIFAR ResNet on the tree."""
    return evaluated_run(tmp_path_factory.mktemp("cifar") / "run", tree, "ema.decay=0.5", "optim.lr=0.05")


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory, tree: Path, cache: None) -> Path:
    """A timm network trained one step on the tree."""
    return evaluated_run(tmp_path_factory.mktemp("timm") / "run", tree, "model.name=timm.resnet10t",
                         "trainer.max_steps=1")  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, cifar_run: Path, timm_run: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    folders = {
        "cifar": (cifar_run, []),
        "cifar_adv": (cifar_run, ["--source", "adv"]),
        "cifar_ema": (cifar_run, ["--weights", "ema"]),
        "timm": (timm_run, []),
    }
    for name, (run, flags) in folders.items():
        assert export_main([str(run), str(out / name), *flags]) == 0
    return {name: out / name for name in folders}


def reference_logits(run: Path, x: torch.Tensor, source: str = "clean", weights: str = "model") -> torch.Tensor:
    """What ``mbn.export_model`` gives for images in [0, 1] (normalisation inside)."""
    loaded = load_run(run, "cpu", weights=weights)
    with torch.no_grad():
        return mbn.export_model(loaded.model, source).eval()(x)


FRESH = r"""
import json, sys, torch, torchvision
import mbn, timm  # mbn first: the import hook registers its CIFAR ResNets when timm is imported
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    x = torch.load(sys.argv[2])
    config = timm.data.resolve_data_config({}, model=model)
    with torch.no_grad():
        logits = model(torchvision.transforms.functional.normalize(x, config["mean"], config["std"]))
    torch.save(logits, f"{sys.argv[3]}/{name}.pt")
    entry = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
             "label_names": model.pretrained_cfg.get("label_names")}
    if name in ("cifar", "timm"):  # accuracy through timm's own transform pipeline on the test tree
        dataset = torchvision.datasets.ImageFolder(sys.argv[4], transform=timm.data.create_transform(**config))
        index = [entry["label_names"].index(c) for c in dataset.classes]
        with torch.no_grad():
            predicted = [int(model(img.unsqueeze(0)).argmax(1)) for img, _ in dataset]
        entry["predicted"] = predicted
        entry["correct"] = sum(p == index[label] for p, (_, label) in zip(predicted, dataset.samples))
        entry["images"] = len(dataset)
    out[name] = entry
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, exported: dict[str, Path], tree: Path) -> dict:
    """Every export loaded by ``timm.create_model("local-dir:...")`` in a new interpreter."""
    scratch = tmp_path_factory.mktemp("fresh")
    torch.manual_seed(0)
    torch.save(torch.rand(6, 3, 32, 32), scratch / "x.pt")
    folders = json.dumps({k: str(v) for k, v in exported.items()})
    done = subprocess.run(
        [sys.executable, "-c", FRESH, folders, str(scratch / "x.pt"), str(scratch), str(tree / "test")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=scratch,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in exported:
        result[name]["logits"] = torch.load(scratch / f"{name}.pt")
    result["x"] = torch.load(scratch / "x.pt")
    return result


def test_folder_is_timms_layout_with_the_runs_normalisation_and_labels(exported, cifar_run):
    folder = exported["cifar"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    data = load_checkpoint(cifar_run / "checkpoints" / "last.pt")["data"]
    assert config["architecture"] == "mbn_cifar_resnet8"
    assert config["num_classes"] == 3 and config["label_names"] == list(CLASSES) == data["class_names"]
    cfg = config["pretrained_cfg"]
    assert cfg["mean"] == pytest.approx(data["mean"]) and cfg["std"] == pytest.approx(data["std"])
    assert cfg["mean"] != pytest.approx(IMAGENET_MEAN)
    assert cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    assert config["mbn"]["source"] == "clean" and config["mbn"]["sources"] == ["clean", "adv"]
    from safetensors.torch import load_file

    keys = set(load_file(str(folder / "model.safetensors")))
    assert keys and not any(k.startswith("net.") or ".bns." in k for k in keys)  # plain, un-prefixed keys


def test_timm_loads_each_export_in_a_fresh_process_with_mbns_logits(fresh, cifar_run, timm_run):
    x = fresh["x"]
    torch.testing.assert_close(fresh["cifar"]["logits"], reference_logits(cifar_run, x))
    torch.testing.assert_close(fresh["timm"]["logits"], reference_logits(timm_run, x))
    torch.testing.assert_close(fresh["cifar_adv"]["logits"], reference_logits(cifar_run, x, "adv"))
    torch.testing.assert_close(fresh["cifar_ema"]["logits"], reference_logits(cifar_run, x, weights="ema"))
    # the auxiliary BN and the average are other networks, not copies of the main one
    assert not torch.allclose(fresh["cifar_adv"]["logits"], fresh["cifar"]["logits"])
    assert not torch.allclose(fresh["cifar_ema"]["logits"], fresh["cifar"]["logits"])


@pytest.mark.parametrize("name", ["cifar", "timm"])
def test_timms_transform_pipeline_gives_mbn_evals_accuracy(fresh, cifar_run, timm_run, name):
    entry = fresh[name]
    report = json.loads(((cifar_run if name == "cifar" else timm_run) / "eval.json").read_text())
    assert entry["images"] == report["num_images"] == 24
    assert entry["correct"] / entry["images"] == pytest.approx(report["clean_acc"])
    loaded = load_run(cifar_run if name == "cifar" else timm_run, "cpu")  # image by image, not only the count
    x = torch.from_numpy(loaded.test.images).permute(0, 3, 1, 2).float().div(255.0)
    with torch.no_grad():
        assert entry["predicted"] == mbn.export_model(loaded.model, "clean").eval()(x).argmax(1).tolist()
    assert entry["label_names"] == list(CLASSES)
    assert entry["config"]["crop_pct"] == 1.0 and entry["config"]["mean"] != pytest.approx(IMAGENET_MEAN)


def test_load_exported_returns_the_model_and_mbns_exact_transform(exported, cifar_run):
    model, transform = load_exported(exported["cifar"])
    loaded = load_run(cifar_run, "cpu")
    images = loaded.test.images[:5]  # uint8 NHWC, as mbn-eval feeds them
    pil = [transform(Image.fromarray(img)) for img in images]
    tensors = [transform(torch.from_numpy(img).permute(2, 0, 1)) for img in images]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    plain = mbn.export_model(loaded.model, "clean").eval()
    torch.testing.assert_close(torch.stack(pil), plain.normalize(x), rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(tensors), plain.normalize(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.stack(pil)), plain(x))


def test_model_card_describes_training_bn_results_and_inputs(exported, cifar_run):
    card = (exported["cifar_adv"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: pytorch")  # the class is mbn's: the Hub's timm snippet would fail
    assert "through the `adv` BN" in card and "| adv | pgd | adv (exported) |" in card
    assert "No `mbn-eval` report" in card  # the run was evaluated through its main BN only
    card = (exported["cifar"] / "README.md").read_text()
    report = json.loads((cifar_run / "eval.json").read_text())
    assert f"{100 * report['clean_acc']:.2f}" in card and "The mbn-eval report" in card
    assert "|\n\n## Usage" in card  # the report's last table ends before the next heading
    mean = json.loads((exported["cifar"] / "config.json").read_text())["pretrained_cfg"]["mean"]
    assert f"{mean[0]:.4f}" in card and "subtract the per-channel mean" in card
    assert "import mbn" in card and 'timm.create_model("local-dir:FOLDER"' in card


def test_torchvision_model_exports_a_state_dict_for_its_constructor(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    run = train(
        tmp_path / "run",
        "data.name=synthetic",
        "data.synthetic_train_size=12",
        "data.synthetic_test_size=4",
        "model.name=torchvision.resnet18",
        "trainer.max_steps=1",
    )
    assert export_main([str(run), str(tmp_path / "out"), "--format", "hf", "pth"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "torchvision.resnet18" and config["library"] == "torchvision"
    x = torch.rand(2, 3, 32, 32)
    reference = reference_logits(run, x)
    for weights in (load_file(str(tmp_path / "out" / "model.safetensors")),
                    torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)):  # fmt: skip
        net = torchvision.models.resnet18(num_classes=10).eval()
        net.load_state_dict(weights)
        prep = Preprocessing.from_pretrained_cfg(config["pretrained_cfg"])
        with torch.no_grad():
            normalised = torchvision.transforms.functional.normalize(x, prep.mean, prep.std)
            torch.testing.assert_close(net(normalised), reference)
    model, _ = load_exported(tmp_path / "out")
    assert isinstance(model, torchvision.models.ResNet)


def test_onnx_graph_has_the_normalisation_folded_in(cifar_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert export_main([str(cifar_run), str(tmp_path / "out"), "--format", "onnx"]) == 0
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    x = torch.rand(5, 3, 32, 32)  # another batch size than the export's example: the batch axis is dynamic
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), reference_logits(cifar_run, x), rtol=1e-4, atol=1e-5)
    assert "normalisation folded in" in (tmp_path / "out" / "README.md").read_text()


def test_push_to_hub_uploads_the_folder_through_huggingface_hub(cifar_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls: dict[str, object] = {}

    class FakeApi:
        def __init__(self, **kwargs):
            calls["client"] = kwargs

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def repo_info(self, repo_id):
            return type("Info", (), {"private": calls["create"][1]})()  # a new repository, as created

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()), commit_message)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    assert export_main([str(cifar_run), str(out), "--push-to-hub", "someone/advprop-r8", "--private",
                        "--license", "mit"]) == 0  # fmt: skip
    assert calls["create"] == ("someone/advprop-r8", True, True)
    assert calls["upload"][:2] == ("someone/advprop-r8", ["README.md", "config.json", "model.safetensors"])
    assert calls["client"]["library_name"] == "mbn-advprop"
    assert "license: mit" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["license"] == "mit"
    assert "uploaded to https://huggingface.co/someone/advprop-r8" in capsys.readouterr().out


def test_a_failed_upload_is_one_line_and_keeps_the_folder(cifar_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    class OfflineApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, *args, **kwargs):
            raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    assert export_main([str(cifar_run), str(tmp_path / "out"), "--push-to-hub", "someone/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Network is unreachable" in err and "push it again later" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_mbns_cifar_resnets_are_in_timms_registry_whichever_is_imported_first():
    script = (
        "import importlib.util; import {first}; importlib.util.find_spec('timm'); import {second}; import timm, torch; "
        "m = timm.create_model('mbn_cifar_resnet20', num_classes=7); "
        "g = timm.create_model('mbn_cifar_resnet', layers=[4, 4, 4], width=4); "
        "print(m(torch.rand(1, 3, 32, 32)).shape[1], len(g.layers[0]), sorted(timm.list_models('mbn_*'))[0])"
    )
    for first, second in (("mbn", "timm"), ("timm", "mbn"), ("mbn", "timm.layers")):  # a probe first changes nothing
        done = subprocess.run([sys.executable, "-c", script.format(first=first, second=second)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-1500:]
        assert done.stdout.split() == ["7", "4", "mbn_cifar_resnet"]


def test_timm_registered_cifar_resnet_equals_mbns_own():
    import timm

    from mbn.models import cifar_resnet20

    ours = cifar_resnet20(num_classes=5, width=8).eval()
    theirs = timm.create_model("mbn_cifar_resnet20", num_classes=5, width=8).eval()
    assert theirs.load_state_dict(ours.state_dict()) is not None
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(theirs(x), ours(x))
    assert theirs.pretrained_cfg["architecture"] == "mbn_cifar_resnet20" and theirs.num_features == 32


# ----------------------------------------------------------------------------------------------- timm split BN


def test_timm_split_bn_checkpoint_gives_timms_outputs_per_source(tmp_path):
    import timm
    from timm.layers import convert_splitbn_model

    torch.manual_seed(0)
    base = timm.create_model("resnet10t", num_classes=5)
    split = convert_splitbn_model(copy.deepcopy(base), 3)
    for module in split.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # every BN of every split its own affine pair
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    chunks = [torch.rand(4, 3, 32, 32) * scale for scale in (1.0, 0.5, 2.0)]
    split.train()
    with torch.no_grad():
        split(torch.cat(chunks))  # running statistics of every split move apart
    args = argparse.Namespace(model="resnet10t", split_bn=True)  # what timm's CheckpointSaver stores
    torch.save(
        {"epoch": 3, "arch": "resnet10t", "state_dict": split.state_dict(), "args": args}, tmp_path / "c.pth.tar"
    )

    ckpt = mbn.convert.read_timm_checkpoint(tmp_path / "c.pth.tar")
    assert ckpt.arch == "resnet10t" and ckpt.args["split_bn"] is True
    state = ckpt.state
    assert mbn.convert.split_bn_count(state) == 3
    model = mbn.convert.load_split_bn(copy.deepcopy(base), state, ("clean", "aug1", "aug2"))
    assert mbn.model_sources(model) == ("clean", "aug1", "aug2")
    x = torch.cat(chunks)
    with torch.no_grad():
        expected = split(x)  # timm: split i through its own BN, batch statistics
        with mbn.split_sources(model.train(), {"clean": 4, "aug1": 4, "aug2": 4}):
            got = model(x)
    torch.testing.assert_close(got, expected)
    # eval mode: each source uses its split's running statistics (timm keeps only split 0 at test time)
    split.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(chunks[0]), split(chunks[0]))
        for index, name in ((0, "aug1"), (1, "aug2")):
            aux_only = copy.deepcopy(split)
            for module in aux_only.modules():
                if hasattr(module, "aux_bn"):
                    module.load_state_dict({**module.aux_bn[index].state_dict()}, strict=False)
            with mbn.use_source(model, name):
                torch.testing.assert_close(model(chunks[1]), aux_only(chunks[1]))


def test_split_bn_with_the_wrong_number_of_names_is_refused():
    from timm.layers import convert_splitbn_model

    from tests.nets import TinyNet

    state = convert_splitbn_model(TinyNet(), 3).state_dict()
    with pytest.raises(ValueError, match="3 BNs per layer, got 2 names"):
        mbn.convert.load_split_bn(TinyNet(), state, ("clean", "adv"))
    assert mbn.model_sources(mbn.convert.load_split_bn(TinyNet(), state)) == ("clean", "aug1", "aug2")


# ----------------------------------------------------------------------------------------------------- errors


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert export_main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("mbn-export: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line(cifar_run, timm_run, tmp_path, capsys):
    assert "not a run directory" in one_line_error(capsys, [str(tmp_path), str(tmp_path / "o1")])
    err = one_line_error(capsys, [str(cifar_run), str(tmp_path / "o2"), "--source", "autoaug"])
    assert "no BN named 'autoaug'" in err and "clean, adv" in err
    err = one_line_error(capsys, [str(timm_run), str(tmp_path / "o3"), "--weights", "ema"])
    assert "ema.decay=0" in err
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "keep.txt").write_text("mine")
    for flags in ([], ["--force"]):  # --force replaces only an earlier export, never another folder
        assert "not written by mbn-export" in one_line_error(capsys, [str(cifar_run), str(tmp_path / "o4"), *flags])
    assert (tmp_path / "o4" / "keep.txt").read_text() == "mine"
    err = one_line_error(capsys, [str(cifar_run), str(cifar_run), "--force"])  # the run directory itself
    assert "not written by mbn-export" in err and (cifar_run / "checkpoints" / "last.pt").is_file()
    assert export_main([str(cifar_run), str(tmp_path / "o6")]) == 0
    assert "--force" in one_line_error(capsys, [str(cifar_run), str(tmp_path / "o6")])
    (tmp_path / "o5").write_text("a file")
    assert "not a folder" in one_line_error(capsys, [str(cifar_run), str(tmp_path / "o5")])
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no staging folder left behind


def test_force_replaces_only_a_complete_export(cifar_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert export_main([str(cifar_run), str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise ExportError("simulated failure while writing")

    monkeypatch.setattr("mbn.export.card.model_card", broken)
    one_line_error(capsys, [str(cifar_run), str(out), "--force", "--source", "adv"])
    assert (out / "model.safetensors").read_bytes() == before  # the earlier export is intact
    monkeypatch.undo()
    assert export_main([str(cifar_run), str(out), "--force", "--source", "adv"]) == 0
    assert json.loads((out / "config.json").read_text())["mbn"]["source"] == "adv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_model_timm_cannot_describe_is_one_line(timm_run, tmp_path, monkeypatch, capsys):
    import mbn.export.folder as folder

    real = folder.timm_network

    def unserialisable(trained):
        net = real(trained)
        net._model_args = {**getattr(net, "_model_args", {}), "act_layer": object()}
        return net

    monkeypatch.setattr(folder, "timm_network", unserialisable)
    err = one_line_error(capsys, [str(timm_run), str(tmp_path / "out")])
    assert "timm cannot describe it" in err and "act_layer" in err
    assert not (tmp_path / "out").exists()


def test_read_trained_and_load_exported_errors(tmp_path, cifar_run):
    with pytest.raises(ExportError, match="--weights"):
        read_trained(cifar_run, weights="average")
    with pytest.raises(ExportError, match="no such export folder"):
        load_exported(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"config\.json: not found"):
        load_exported(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="not readable JSON"):
        load_exported(tmp_path / "bad")


def test_mbn_eval_reads_a_timm_split_bn_checkpoint(tmp_path):
    import timm
    from timm.layers import convert_splitbn_model

    from mbn.synthetic import generate_synthetic

    torch.manual_seed(1)
    split = convert_splitbn_model(timm.create_model("resnet10t", num_classes=10), 2)
    split.train()
    with torch.no_grad():
        for _ in range(3):  # the two splits see different data: their statistics differ
            split(torch.cat([torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32) * 0.3]))
    args = argparse.Namespace(model="resnet10t", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), split_bn=True)
    checkpoint = tmp_path / "exp" / "model_best.pth.tar"
    checkpoint.parent.mkdir()
    torch.save({"arch": "resnet10t", "state_dict": split.state_dict(), "args": args}, checkpoint)
    recipe = tmp_path / "data.yaml"
    recipe.write_text(
        "domains:\n  clean: {type: clean}\n"
        "data: {name: synthetic, synthetic_train_size: 16, synthetic_test_size: 24, num_workers: 0}\n"
    )
    flags = ["--timm-recipe", str(recipe), "--split-names", "clean,weak", "--device", "cpu"]
    assert eval_main([str(checkpoint), *flags]) == 0
    report = json.loads((checkpoint.parent / "eval-model_best" / "eval.json").read_text())
    assert report["sources"] == ["clean", "weak"] and report["num_images"] == 24

    images, labels = generate_synthetic(24, 32, seed=1)  # the synthetic test split
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    x = (x - 0.5) / 0.25  # timm's --mean/--std from the checkpoint's args
    expected = {}
    for index in (0, 1):
        net = copy.deepcopy(split).eval()
        if index:  # split 1's BN, as timm would use it if it kept the auxiliary BNs at test time
            for module in net.modules():
                if hasattr(module, "aux_bn"):
                    module.load_state_dict(module.aux_bn[0].state_dict(), strict=False)
        with torch.no_grad():
            expected[index] = (net(x).argmax(1).numpy() == labels).mean()
    assert report["per_bn_acc"]["clean"] == pytest.approx(expected[0])
    assert report["per_bn_acc"]["weak"] == pytest.approx(expected[1])
    assert report["clean_acc"] == pytest.approx(expected[0])


def test_a_timm_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys):
    import timm

    checkpoint = tmp_path / "c.pth.tar"
    torch.save({"arch": "resnet10t", "state_dict": timm.create_model("resnet10t", num_classes=7).state_dict()},
               checkpoint)  # fmt: skip
    recipe = tmp_path / "data.yaml"
    recipe.write_text(
        "domains:\n  clean: {type: clean}\ndata: {name: synthetic, synthetic_train_size: 8, num_workers: 0}\n"
    )
    assert eval_main([str(checkpoint), "--timm-recipe", str(recipe), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not fit timm.resnet10t" in err
    (tmp_path / "garbage.pth.tar").write_bytes(b"not a checkpoint")
    assert eval_main([str(tmp_path / "garbage.pth.tar"), "--timm-recipe", str(recipe)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    sd = timm.create_model("resnet10t", num_classes=10).state_dict()
    torch.save({"arch": "resnet10t", "state_dict": sd, "args": {"mean": "abc", "std": [1, 2, 3]}}, checkpoint)
    assert eval_main([str(checkpoint), "--timm-recipe", str(recipe), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "args.mean / args.std: expected numbers" in err


def test_push_refuses_a_bad_repo_id_before_writing_and_a_public_repo_with_private(cifar_run, tmp_path, monkeypatch,
                                                                                  capsys):  # fmt: skip
    import huggingface_hub

    assert "not a repository id" in one_line_error(capsys, [str(cifar_run), str(tmp_path / "a"), "--push-to-hub",
                                                            "not a repo"])  # fmt: skip
    assert not (tmp_path / "a").exists()
    uploads = []

    class PublicRepo:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def repo_info(self, repo_id):
            return type("Info", (), {"private": False})()  # it existed, public

        def upload_folder(self, **kwargs):
            uploads.append(kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", PublicRepo)
    err = one_line_error(capsys, [str(cifar_run), str(tmp_path / "b"), "--push-to-hub", "me/x", "--private"], code=1)
    assert "exists and is public" in err and not uploads


def test_force_never_replaces_a_folder_holding_more_than_an_export(cifar_run, tmp_path, capsys):
    out = tmp_path / "clone"
    assert export_main([str(cifar_run), str(out)]) == 0
    (out / ".git").mkdir()  # a Hub clone: its history must survive
    (out / ".git" / "HEAD").write_text("ref")
    err = one_line_error(capsys, [str(cifar_run), str(out), "--force"])
    assert "other things (.git)" in err and (out / ".git" / "HEAD").read_text() == "ref"


def test_an_existing_empty_folder_or_a_link_to_one_is_filled_not_replaced(cifar_run, tmp_path):
    target = tmp_path / "disk" / "target"
    target.mkdir(parents=True)
    (tmp_path / "link").symlink_to(target)
    assert export_main([str(cifar_run), str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link"]  # nothing left beside it
    assert export_main([str(cifar_run), str(tmp_path / "link"), "--force", "--format", "hf", "pth"]) == 0
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "pytorch_model.bin"
    ]  # fmt: skip
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' 0600 file as readable as the others


def test_an_interrupted_export_leaves_nothing_behind(cifar_run, tmp_path, monkeypatch, capsys):
    import mbn.export.folder as folder

    def failing(*args, **kwargs):
        raise RuntimeError("exporter exploded\nwith a long story")

    monkeypatch.setattr(folder, "_onnx_export", failing)
    err = one_line_error(capsys, [str(cifar_run), str(tmp_path / "new" / "deeper" / "out"), "--format", "onnx"])
    assert "torch's exporter failed" in err and "exporter exploded" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no parent it made


def test_card_and_config_name_no_local_paths_and_say_which_bn(exported, cifar_run):
    config = (exported["cifar_adv"] / "config.json").read_text()
    card = (exported["cifar_adv"] / "README.md").read_text()
    for text in (config, card):
        assert str(cifar_run.parent) not in text
    assert "the other BNs (`clean` (the main one))" in card and "exported to be studied on its own" in card
    assert "library_name: pytorch" in card and "`import mbn` registers it with timm" in card
    timm_card = (exported["timm"] / "README.md").read_text()
    assert "library_name: timm" in timm_card and "no mbn code runs at inference" in timm_card


def test_load_exported_refuses_a_config_it_cannot_use_in_one_line(exported, tmp_path):
    bad_values = {
        "crop_pct": 0,
        "interpolation": "weird",
        "mean": [0.5],
        "std": [0.0, 0.0, 0.0],
        "input_size": [3, 0, 0],
    }
    for key, value in bad_values.items():
        folder = tmp_path / key
        shutil.copytree(exported["cifar"], folder)
        config = json.loads((folder / "config.json").read_text())
        config["pretrained_cfg"][key] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ExportError, match=f"pretrained_cfg: {key.split('_')[0]}") as info:
            load_exported(folder)
        assert "\n" not in str(info.value)


def test_a_live_export_is_not_disturbed_and_stale_or_foreign_folders_are_kept_apart(cifar_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / f".mbn-export-{sleeper.pid}").mkdir()  # a live export's staging folder
        assert "another mbn-export" in one_line_error(capsys, [str(cifar_run), str(out)])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert export_main([str(cifar_run), str(out)]) == 0  # the dead one's folder is cleaned up
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (out / ".mbn-export-notes").mkdir()  # not a staging folder: the user's, kept and counted
    assert "other things (.mbn-export-notes)" in one_line_error(capsys, [str(cifar_run), str(out), "--force"])


def test_sigterm_mid_export_leaves_nothing(cifar_run, tmp_path):
    import signal
    import time

    out = tmp_path / "fresh" / "deep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mbn.cli.export", str(cifar_run), str(out), "--format", "hf", "pth"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(out.glob(".mbn-export-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the export finished before it could be interrupted")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "fresh").exists()  # the folders it made, removed again


def test_a_run_from_pretrained_weights_loads_offline(timm_run, monkeypatch):
    """mbn-eval and mbn-export rebuild the model for the checkpoint's weights: nothing is fetched, even offline."""
    import mbn.models
    from mbn.eval.loading import read_stored_run, trained_model

    monkeypatch.setattr(mbn.models, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(mbn.models, "_timm_weights_cached", lambda name: False)
    stored = read_stored_run(timm_run)
    stored.cfg.model.pretrained = True  # as a run fine-tuned from timm's weights records it
    model = trained_model(stored, stored.stats)
    torch.testing.assert_close(model.state_dict(), load_checkpoint(timm_run / "checkpoints" / "last.pt")["model"])
