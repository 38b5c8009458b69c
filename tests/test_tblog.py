"""TensorBoard layout (sub-runs per domain and BN, order, divergence, recipe and HParams) and ``scalars.csv``."""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mbn.convert import convert_model
from mbn.csvlog import CsvScalarLog, read_scalars
from mbn.eval.divergence import bn_divergence
from mbn.logger import DIAGNOSTICS, RunLogger, RunLoggers, divergence_image_tag, divergence_tag
from mbn.tblog import TensorBoardLogger, canonical_tag, hparams_of, tensorboard_place
from tests.runs import tensorboard_images, tensorboard_runs, tensorboard_scalars


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layout(acc) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return [(c.title, [(chart.title, list(chart.multiline.tag)) for chart in c.chart]) for c in layout.category]


def _model(sources: tuple[str, ...] = ("clean", "adv", "aug")) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model = convert_model(net, sources)
    torch.manual_seed(0)
    for name, buf in model.named_buffers():  # every auxiliary source's statistics away from the main one's
        if ".bns.clean." not in name and name.endswith("running_mean"):
            buf.add_(1e-3 * torch.randn_like(buf))
    return model


WINDOW = {  # one logging window of a 2-domain run, as the hooks pass it
    "loss/clean": 2.1,
    "loss/adv": 2.4,
    "acc/clean": 0.25,
    "acc/adv": 0.125,
    "loss/total": 4.5,
    "lr": 0.1,
    "throughput/images_per_s": 100.0,
    "throughput/clean": 50.0,
    "throughput/adv": 50.0,
}


# ----------------------------------------------------------------------------------------------- sub-runs


def test_per_domain_curves_share_one_tag_in_one_sub_run_per_domain(tmp_path):
    """One chart per quantity, one line (sub-run) per domain or BN: TensorBoard colours them and names them."""
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.scalars(WINDOW, 1)
    logger.scalars({"acc_test/clean": 0.5, "acc_test/adv": 0.4, "acc_test_ema/clean": 0.55}, 1)
    logger.close()
    runs = {run: set(acc.Tags()["scalars"]) for run, acc in tensorboard_runs(tmp_path / "tb").items()}
    assert runs == {
        "": {"loss/total", "lr", "throughput/total"},
        "domain=clean": {"loss/per_domain", "train_acc/per_domain", "throughput/per_domain"},
        "domain=adv": {"loss/per_domain", "train_acc/per_domain", "throughput/per_domain"},
        "bn=clean": {"test_acc/per_bn", "test_acc/per_bn_ema"},
        "bn=adv": {"test_acc/per_bn"},
    }
    scalars = tensorboard_scalars(tmp_path / "tb")  # read back under the canonical tags: the same values
    expected = WINDOW | {"acc_test/clean": 0.5, "acc_test/adv": 0.4, "acc_test_ema/clean": 0.55}
    assert scalars == {tag: [(1, pytest.approx(value))] for tag, value in expected.items()}


def test_tag_groups_sort_losses_first_and_diagnostics_last():
    """TensorBoard sorts tag groups alphabetically: losses lead, then lr, accuracies, throughput; extras last."""
    canonical = [*WINDOW, "acc_test/clean", "acc_test_ema/clean", divergence_tag("adv")]
    images = ["samples/adv", "samples_perturbation/adv", divergence_image_tag("adv")]
    groups = sorted({tensorboard_place(tag)[1].split("/")[0] for tag in canonical + images})
    assert groups == ["loss", "lr", "test_acc", "throughput", "train_acc", DIAGNOSTICS, "x_samples"]
    for tag in canonical + images:
        assert canonical_tag(*tensorboard_place(tag)) == tag


def test_layout_lists_losses_first_total_apart_and_divergence_last(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.start(["clean", "autoaug", "adv"], ["clean", "autoaug", "adv"], True)
    logger.close()
    layout = _layout(_events(tmp_path / "tb"))
    titles = [title for title, _ in layout]
    assert titles == ["losses", "accuracies", "learning rate and throughput", "BN divergence"]
    assert layout[0][1] == [
        ("loss per domain", ["^loss/per_domain$"]),  # every domain's sub-run: one line each
        ("total loss (weighted sum over domains)", ["^loss/total$"]),  # on its own axes
    ]
    assert dict(layout[1][1])["test accuracy per BN"] == ["^test_acc/per_bn$"]
    assert dict(layout[3][1]) == {
        "log10 symmetric KL to the main BN (mean over layers)": [f"^{DIAGNOSTICS}/bn_divergence_log10$"]
    }


@pytest.mark.parametrize(("sources", "divergence"), [(["clean"], True), (["clean", "adv"], False)])
def test_layout_has_no_divergence_chart_when_none_is_logged(tmp_path, sources, divergence):
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.start(["clean"], sources, divergence)
    logger.close()
    assert "BN divergence" not in [title for title, _ in _layout(_events(tmp_path / "tb"))]


# ----------------------------------------------------------------------------------------------- divergence


def test_divergence_is_one_log10_scalar_and_one_plot_per_source(tmp_path):
    model = _model()
    expected = bn_divergence(model)
    assert set(expected) == {"adv", "aug"} and all(len(layers) == 2 for layers in expected.values())
    loggers = RunLoggers([TensorBoardLogger(tmp_path / "tb"), CsvScalarLog(tmp_path / "scalars.csv")])
    loggers.divergence(model, 5)
    loggers.close()
    runs = tensorboard_runs(tmp_path / "tb")
    assert set(runs) == {"bn=adv", "bn=aug"}
    for source, layers in expected.items():
        acc = runs[f"bn={source}"]
        assert acc.Tags()["scalars"] == [f"{DIAGNOSTICS}/bn_divergence_log10"]  # no per-layer cards
        assert acc.Tags()["images"] == [f"{DIAGNOSTICS}/bn_divergence_per_layer"]
        (event,) = acc.Scalars(f"{DIAGNOSTICS}/bn_divergence_log10")
        mean = sum(layers.values()) / len(layers)
        assert 1e-9 < mean < 1e-3  # what TensorBoard would print as 0
        assert event.step == 5 and event.value == pytest.approx(math.log10(mean), rel=1e-6)
        (image,) = acc.Images(f"{DIAGNOSTICS}/bn_divergence_per_layer")
        assert image.step == 5 and image.width > image.height > 100
    rows = read_scalars(tmp_path / "scalars.csv")
    assert {(step, tag) for step, tag, _ in rows} == {(5, divergence_tag("adv")), (5, divergence_tag("aug"))}


def test_divergence_of_identical_statistics_is_floored_not_minus_infinity(tmp_path):
    model = convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), ("clean", "adv"))
    loggers = RunLoggers([CsvScalarLog(tmp_path / "scalars.csv")])  # TensorBoard off: the CSV goes on alone
    assert not loggers.wants_images  # no plot is drawn for nobody
    loggers.divergence(model, 1)
    loggers.close()
    assert read_scalars(tmp_path / "scalars.csv") == [(1, divergence_tag("adv"), -12.0)]
    assert not (tmp_path / "tb").exists()


# ----------------------------------------------------------------------------------------------- images


def test_perturbation_only_where_a_domain_changed_its_input(tmp_path):
    torch.manual_seed(0)
    clean = torch.rand(4, 3, 8, 8)
    loggers = RunLoggers([TensorBoardLogger(tmp_path / "tb")])
    loggers.domain_images("clean", clean, clean, 1)  # the clean domain hands its input on
    loggers.domain_images("view", clean[:], clean, 1)  # the same memory
    loggers.domain_images("copy", clean.clone(), clean, 1)  # a copy: no change either
    loggers.domain_images("adv", (clean + 4 / 255 * torch.randn_like(clean).sign()).clamp(0, 1), clean, 1)
    loggers.domain_images("rot", torch.rot90(clean, 1, (2, 3)), None, 1)  # no source given
    loggers.close()
    images = tensorboard_images(tmp_path / "tb")
    assert {f"samples/{d}" for d in ("clean", "view", "copy", "adv", "rot")} <= images
    assert {tag for tag in images if tag.startswith("samples_perturbation/")} == {"samples_perturbation/adv"}
    assert set(tensorboard_runs(tmp_path / "tb")["domain=adv"].Tags()["images"]) == {
        "x_samples/images",
        "x_samples/perturbation",
    }


# ----------------------------------------------------------------------------------------------- recipe


def test_recipe_is_a_yaml_code_block_at_step_0(tmp_path):
    yaml_text = "model:\n  name: cifar_resnet8\ndomains:\n  - name: clean\n    bn: clean\n"
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.recipe({"model": {"name": "cifar_resnet8"}}, yaml_text)
    logger.close()
    (event,) = _events(tmp_path / "tb").Tensors("recipe/text_summary")  # torch adds /text_summary
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 0
    assert text == "```yaml\n" + yaml_text.rstrip() + "\n```"


def test_hyper_parameters_are_the_recipe_flattened(tmp_path):
    recipe = {
        "optim": {"name": "sgd", "lr": 0.1, "nesterov": True, "betas": [0.9, 0.999]},
        "trainer": {"epochs": 3, "budget_of": None, "seed": "${oc.env:SEED}"},
        "domains": {"adv": {"type": "pgd", "eps": 0.0157}},
        "imports": [],
    }
    assert hparams_of(recipe) == {
        "optim.name": "sgd",
        "optim.lr": 0.1,
        "optim.nesterov": True,
        "optim.betas": "[0.9, 0.999]",
        "trainer.epochs": 3.0,
        "trainer.budget_of": "null",
        "trainer.seed": "${oc.env:SEED}",  # as written: a secret never reaches the event file
        "domains.adv.type": "pgd",
        "domains.adv.eps": 0.0157,
        "imports": "[]",
    }
    from tensorboard.plugins.hparams import metadata

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.recipe(recipe, "optim: {}\n")
    logger.final({"test_acc_main": 0.5})
    logger.close()
    acc = _events(tmp_path / "tb")
    contents = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert set(contents) == {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}  # no experiment tag
    start = metadata.parse_session_start_info_plugin_data(contents[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.1)
    assert start.hparams["optim.nesterov"].bool_value is True
    assert start.hparams["domains.adv.type"].string_value == "pgd"
    end = metadata.parse_session_end_info_plugin_data(contents[metadata.SESSION_END_INFO_TAG])
    assert end.status == 1  # STATUS_SUCCESS


def test_disabled_logger_writes_nothing(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", enabled=False)
    loggers = RunLoggers([logger])
    loggers.start(["clean"], ["clean", "adv"], True)
    loggers.recipe({"a": 1}, "a: 1\n")
    loggers.scalars({"loss/clean": 1.0}, 1)
    loggers.domain_images("adv", torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), 1)
    loggers.divergence(_model(), 1)
    loggers.final({})
    loggers.close()
    assert not (tmp_path / "tb").exists()


def test_a_logger_that_raises_is_dropped_with_one_line_and_the_others_go_on(tmp_path, capsys):
    class Broken(RunLogger):
        name = "broken tracker"

        def scalars(self, values, step):
            raise ConnectionError("server unreachable\nsecond line")

    csv = CsvScalarLog(tmp_path / "scalars.csv")
    loggers = RunLoggers([Broken(), csv])
    loggers.scalars({"loss/clean": 1.0}, 1)
    loggers.scalars({"loss/clean": 0.5}, 2)
    loggers.close()
    assert read_scalars(tmp_path / "scalars.csv") == [(1, "loss/clean", 1.0), (2, "loss/clean", 0.5)]
    assert capsys.readouterr().err.splitlines() == [
        "mbn: broken tracker logging stopped (server unreachable); training goes on"
    ]


# ----------------------------------------------------------------------------------------------- CSV


VALUES = {"loss/clean": 2.302585124969482, "acc/clean": 0.1, "x": 0.1 + 0.2, "tiny": 1.2345678901234567e-5}


def test_csv_holds_every_scalar_at_full_precision(tmp_path):
    csv = CsvScalarLog(tmp_path / "scalars.csv")
    logger = RunLoggers([TensorBoardLogger(tmp_path / "tb"), csv])
    logger.scalars(VALUES, 1)
    assert (tmp_path / "scalars.csv").read_text().count("\n") == 1 + len(VALUES)  # flushed at the call
    logger.scalars({"lr": 0.05, "throughput/images_per_s": 1234.5}, 2)
    logger.close()
    CsvScalarLog(tmp_path / "scalars.csv").scalars({"loss/clean": 1.5}, 3)  # reopened: appended, no second header
    rows = read_scalars(tmp_path / "scalars.csv")
    assert rows == [(1, tag, value) for tag, value in VALUES.items()] + [
        (2, "lr", 0.05),
        (2, "throughput/images_per_s", 1234.5),
        (3, "loss/clean", 1.5),
    ]
    assert all(type(v) is float for _, _, v in rows)
    text = (tmp_path / "scalars.csv").read_text()
    assert text.startswith("step,tag,value\n") and text.count("step,tag,value") == 1
    tb = _events(tmp_path / "tb")
    assert tb.Scalars("lr")[0].value == pytest.approx(0.05)


def test_csv_goes_on_when_tensorboard_is_off(tmp_path):
    logger = RunLoggers([TensorBoardLogger(tmp_path / "tb", enabled=False), CsvScalarLog(tmp_path / "scalars.csv")])
    logger.scalars({"loss/clean": 0.5}, 7)
    logger.close()
    assert read_scalars(tmp_path / "scalars.csv") == [(7, "loss/clean", 0.5)]


def test_disabled_csv_writes_nothing(tmp_path):
    csv = CsvScalarLog(tmp_path / "scalars.csv", enabled=False)
    csv.scalars({"a": 1.0}, 1)
    csv.truncate_after(0)
    csv.close()
    assert not (tmp_path / "scalars.csv").exists()


def test_truncate_after_keeps_earlier_steps_and_drops_a_partial_line(tmp_path):
    path = tmp_path / "scalars.csv"
    csv = CsvScalarLog(path)
    for step in range(1, 6):
        csv.scalars({"loss/clean": 1.0 / step, "lr": 0.1}, step)
    csv.close()
    with open(path, "a") as f:
        f.write("6,loss/clean,0.16")  # a crash mid-row: parses, but is cut
    csv = CsvScalarLog(path)
    csv.truncate_after(3)
    assert read_scalars(path) == [(s, tag, v) for s in (1, 2, 3) for tag, v in (("loss/clean", 1.0 / s), ("lr", 0.1))]
    csv.scalars({"loss/clean": 0.25}, 4)  # the resumed run logs step 4 again: once
    csv.close()
    assert [row for row in read_scalars(path) if row[0] == 4] == [(4, "loss/clean", 0.25)]
    assert path.read_text().count("step,tag,value") == 1
    assert not list(tmp_path.glob(".scalars.csv.*"))  # the atomic rewrite left no temporary file


def test_truncate_after_without_a_file_is_fine(tmp_path):
    csv = CsvScalarLog(tmp_path / "scalars.csv")
    csv.truncate_after(10)
    assert not (tmp_path / "scalars.csv").exists()
    csv.scalars({"a": 1.0}, 11)
    csv.close()
    assert read_scalars(tmp_path / "scalars.csv") == [(11, "a", 1.0)]


def test_appending_after_a_crash_starts_on_a_new_line(tmp_path):
    path = tmp_path / "scalars.csv"
    path.write_text("step,tag,value\n1,a,1.0\n2,a,0.")  # killed mid-row, no truncate_after
    csv = CsvScalarLog(path)
    csv.scalars({"a": 0.5}, 2)
    csv.close()
    assert read_scalars(path) == [(1, "a", 1.0), (2, "a", 0.5)]


def test_csv_write_error_is_one_line_and_stops_the_log(tmp_path, capsys):
    (tmp_path / "blocked").write_text("a file, not a directory")
    csv = CsvScalarLog(tmp_path / "blocked" / "scalars.csv")
    logger = RunLoggers([TensorBoardLogger(tmp_path / "tb"), csv])
    logger.scalars({"loss/clean": 1.0}, 1)
    logger.scalars({"loss/clean": 0.5}, 2)  # stopped: nothing raised, nothing printed again
    csv.truncate_after(1)
    logger.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mbn: CSV scalar log stopped: cannot write {csv.path} (")
    assert not csv.enabled
    assert tensorboard_scalars(tmp_path / "tb")["loss/clean"] == [(1, 1.0), (2, 0.5)]  # TensorBoard goes on


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_csv_full_disk_is_one_line(capsys):
    csv = CsvScalarLog(Path("/dev/full"))
    csv.scalars({"loss/clean": 1.0}, 1)
    csv.scalars({"loss/clean": 1.0}, 2)
    csv.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mbn: CSV scalar log stopped: cannot write /dev/full ({os.strerror(errno.ENOSPC)})"]


# ----------------------------------------------------------------------------------------------- a real run


def test_a_run_writes_its_recipe_as_hyper_parameters_and_marks_its_session_done(tmp_path):
    from tensorboard.plugins.hparams import metadata

    from tests.runs import VANILLA, train

    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=2", "optim.lr=0.05") == 0
    root = tensorboard_runs(run / "tb")[""]
    contents = root.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(contents[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.05)
    assert start.hparams["model.name"].string_value == "cifar_resnet8"
    assert start.hparams["trainer.max_steps"].number_value == 2
    assert metadata.SESSION_END_INFO_TAG in contents  # finished
    scalars = tensorboard_scalars(run / "tb")
    rows = read_scalars(run / "scalars.csv")
    assert {tag for _, tag, _ in rows} == set(scalars)  # the CSV's tags, laid out in sub-runs
    for step, tag, value in rows:
        assert dict(scalars[tag])[step] == pytest.approx(value, rel=1e-6), tag


@pytest.mark.parametrize("name", ["total", "images_per_s", "a/b", "x" * 65, "-dash"])
def test_a_domain_name_that_is_no_directory_or_a_total_is_one_line(tmp_path, capsys, name):
    """A domain's name is a sub-run directory (``tb/domain=<name>``) and a tag; ``total`` would hide the total."""
    from tests.runs import VANILLA, one_line_error, train

    assert train(VANILLA, tmp_path / "run", f"domains.{name}.type=clean", "trainer.max_steps=1") == 2
    assert "a domain name is 1-64 letters, digits, '_', '-' or '.'" in one_line_error(capsys)


def test_logging_time_is_not_training_time():
    """What the loggers take (a slow tracker, image grids) is left out of the window: throughput stays honest."""
    import time

    from mbn.meter import TrainClock

    clock = TrainClock(torch.device("cpu"))
    clock.start()
    with clock.paused():
        time.sleep(0.3)
    clock.count({"clean": 8})
    clock.stop()
    assert clock.train_time < 0.1
