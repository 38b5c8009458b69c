"""TensorBoard layout (order, divergence summary and plot, recipe text, no empty cards) and ``scalars.csv``."""

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
from mbn.tblog import DIAGNOSTICS, TensorBoardLogger, divergence_image_tag, divergence_tag


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


# ----------------------------------------------------------------------------------------------- layout


def test_layout_lists_losses_first_and_divergence_last(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.layout(["clean", "autoaug", "adv"], ["clean", "autoaug", "adv"])
    logger.close()
    layout = _layout(_events(tmp_path / "tb"))
    titles = [title for title, _ in layout]
    assert titles == ["losses", "accuracies", "learning rate and throughput", "BN divergence"]
    (loss_chart,) = layout[0][1]
    assert loss_chart[1] == ["^loss/clean$", "^loss/autoaug$", "^loss/adv$", "^loss/total$"]
    test_chart = dict(layout[1][1])["test accuracy per BN (and its EMA weights)"]
    assert "^acc_test/clean$" in test_chart and "^acc_test_ema/clean$" in test_chart
    assert dict(layout[3][1])["log10 symmetric KL to the main BN (mean over layers)"] == [
        f"^{divergence_tag('autoaug')}$",
        f"^{divergence_tag('adv')}$",
    ]


@pytest.mark.parametrize(("sources", "divergence"), [(["clean"], True), (["clean", "adv"], False)])
def test_layout_has_no_divergence_chart_when_none_is_logged(tmp_path, sources, divergence):
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.layout(["clean"], sources, divergence=divergence)
    logger.close()
    assert "BN divergence" not in [title for title, _ in _layout(_events(tmp_path / "tb"))]


def test_diagnostics_tags_share_one_group():
    assert divergence_tag("adv").split("/", 1)[0] == divergence_image_tag("adv").split("/", 1)[0] == DIAGNOSTICS


# ----------------------------------------------------------------------------------------------- divergence


def test_divergence_is_one_log10_scalar_and_one_plot_per_source(tmp_path):
    model = _model()
    expected = bn_divergence(model)
    assert set(expected) == {"adv", "aug"} and all(len(layers) == 2 for layers in expected.values())
    logger = TensorBoardLogger(tmp_path / "tb", csv=CsvScalarLog(tmp_path / "scalars.csv"))
    logger.divergence(model, 5)
    logger.close()
    acc = _events(tmp_path / "tb")
    assert set(acc.Tags()["scalars"]) == {divergence_tag("adv"), divergence_tag("aug")}  # no per-layer cards
    assert set(acc.Tags()["images"]) == {divergence_image_tag("adv"), divergence_image_tag("aug")}
    for source, layers in expected.items():
        (event,) = acc.Scalars(divergence_tag(source))
        mean = sum(layers.values()) / len(layers)
        assert 1e-9 < mean < 1e-3  # what TensorBoard would print as 0
        assert event.step == 5 and event.value == pytest.approx(math.log10(mean), rel=1e-6)
        (image,) = acc.Images(divergence_image_tag(source))
        assert image.step == 5 and image.width > image.height > 100
    rows = read_scalars(tmp_path / "scalars.csv")
    assert {(step, tag) for step, tag, _ in rows} == {(5, divergence_tag("adv")), (5, divergence_tag("aug"))}


def test_divergence_of_identical_statistics_is_floored_not_minus_infinity(tmp_path):
    model = convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), ("clean", "adv"))
    logger = TensorBoardLogger(tmp_path / "tb", enabled=False, csv=CsvScalarLog(tmp_path / "scalars.csv"))
    logger.divergence(model, 1)
    logger.close()
    assert read_scalars(tmp_path / "scalars.csv") == [(1, divergence_tag("adv"), -12.0)]
    assert not (tmp_path / "tb").exists()  # TensorBoard off: the CSV goes on alone


# ----------------------------------------------------------------------------------------------- images


def test_perturbation_only_where_a_domain_changed_its_input(tmp_path):
    torch.manual_seed(0)
    clean = torch.rand(4, 3, 8, 8)
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.images("clean", clean, clean, 1)  # the clean domain hands its input on
    logger.images("view", clean[:], clean, 1)  # the same memory
    logger.images("copy", clean.clone(), clean, 1)  # a copy: no change either
    logger.images("adv", (clean + 4 / 255 * torch.randn_like(clean).sign()).clamp(0, 1), clean, 1)
    logger.images("rot", torch.rot90(clean, 1, (2, 3)), None, 1)  # no source given
    logger.close()
    images = set(_events(tmp_path / "tb").Tags()["images"])
    assert {f"samples/{d}" for d in ("clean", "view", "copy", "adv", "rot")} <= images
    assert {tag for tag in images if tag.startswith("samples_perturbation/")} == {"samples_perturbation/adv"}


# ----------------------------------------------------------------------------------------------- recipe


def test_recipe_is_a_yaml_code_block_at_step_0(tmp_path):
    yaml_text = "model:\n  name: cifar_resnet8\ndomains:\n  - name: clean\n    bn: clean\n"
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.recipe(yaml_text)
    logger.close()
    (event,) = _events(tmp_path / "tb").Tensors("recipe/text_summary")  # torch adds /text_summary
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 0
    assert text == "```yaml\n" + yaml_text.rstrip() + "\n```"


def test_disabled_logger_writes_nothing(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", enabled=False)
    logger.layout(["clean"], ["clean", "adv"])
    logger.recipe("a: 1\n")
    logger.scalars({"loss/clean": 1.0}, 1)
    logger.images("adv", torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), 1)
    logger.divergence(_model(), 1)
    logger.close()
    assert not (tmp_path / "tb").exists()


# ----------------------------------------------------------------------------------------------- CSV


VALUES = {"loss/clean": 2.302585124969482, "acc/clean": 0.1, "x": 0.1 + 0.2, "tiny": 1.2345678901234567e-5}


def test_csv_holds_every_scalar_at_full_precision(tmp_path):
    csv = CsvScalarLog(tmp_path / "scalars.csv")
    logger = TensorBoardLogger(tmp_path / "tb", csv=csv)
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
    logger = TensorBoardLogger(tmp_path / "tb", enabled=False, csv=CsvScalarLog(tmp_path / "scalars.csv"))
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
    logger = TensorBoardLogger(tmp_path / "tb", csv=csv)
    logger.scalars({"loss/clean": 1.0}, 1)
    logger.scalars({"loss/clean": 0.5}, 2)  # stopped: nothing raised, nothing printed again
    csv.truncate_after(1)
    logger.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mbn: CSV scalar log stopped: cannot write {csv.path} (")
    assert not csv.enabled
    assert [e.value for e in _events(tmp_path / "tb").Scalars("loss/clean")] == [1.0, 0.5]  # TensorBoard goes on


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_csv_full_disk_is_one_line(capsys):
    csv = CsvScalarLog(Path("/dev/full"))
    csv.scalars({"loss/clean": 1.0}, 1)
    csv.scalars({"loss/clean": 1.0}, 2)
    csv.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mbn: CSV scalar log stopped: cannot write /dev/full ({os.strerror(errno.ENOSPC)})"]
