"""Sizes a machine cannot train: one line naming the key to change, never a traceback (issue 25, item 12).

What can never fit is refused before anything is written (exit status 2): a batch or a CIFAR ResNet's weights
larger than the memory, a BN source given one image where the network's last BatchNorm layers see a 1x1 map. What
runs out of memory (or gets one image) only in the step stops the run with exit status 1.

Nothing here allocates much: the refusals come before any allocation, and the real out-of-memory cases run in a
child process whose address space is capped a few GiB above what its imports mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mbn
from mbn.config import RecipeError
from mbn.plan import check_memory
from mbn.train.runtime import HeadsForward, allocation_failure, size_text, step_size_error
from tests.runs import REPO, TINY, train

VANILLA = REPO / "recipes" / "vanilla.yaml"
ONE_BY_ONE = ["model.name=cifar_resnet18", "data.image_size=8"]  # four stages: an 8x8 image ends as a 1x1 map
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "360000000000 bytes. Error code 12 (Cannot allocate memory)"
)
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which 1.50 GiB is "
    "free. Including non-PyTorch memory, this process has 138.29 GiB memory in use. Of the allocated memory 136.0 GiB "
    "is allocated by PyTorch, and 1.2 GiB is reserved by PyTorch but unallocated."
)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------- refused before anything is written
def test_batch_size_one_where_the_last_bn_sees_one_value_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(VANILLA, run, *ONE_BY_ONE, "data.batch_size=1", "trainer.max_steps=1") == 2
    err = one_line_error(capsys)
    assert err.startswith(
        "mbn-train: error: key 'data.batch_size': with data.batch_size=1, BN 'clean' normalises 1 "
    ), err
    assert "one value per channel (input 1x64x1x1 at data.image_size=8)" in err
    assert "raise data.batch_size to 2 or more" in err
    assert not run.exists()


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["domains.adv.fraction=0.25"], "domains.adv.fraction"),
        # the domain takes its input from a share of one image: the share's fraction is the key to change
        (["domains.part.type=clean", "domains.part.bn=part", "domains.part.fraction=0.25", "domains.adv.input=part"],
         "domains.part.fraction"),
    ],
    ids=["own", "input"],
)  # fmt: skip
def test_a_fraction_leaving_one_image_alone_in_its_bn_is_refused(extra, key, tmp_path, capsys):
    run = tmp_path / "run"
    adv = ["domains.adv.type=clean", "domains.adv.bn=adv"]
    assert train(VANILLA, run, *ONE_BY_ONE, "data.batch_size=4", *adv, *extra, "trainer.max_steps=1") == 2
    err = one_line_error(capsys)
    assert err.startswith(f"mbn-train: error: key '{key}': domain 'adv' gets 1 image a step (data.batch_size=4, "), err
    assert f"{key}=0.25) and is alone in BN 'adv'" in err
    assert f"raise {key} or data.batch_size" in err
    assert not run.exists()


def test_one_image_that_trains_is_not_refused(tmp_path):
    # a 4x4 last map has 16 values per channel; two one-image domains in one BN give it 2 rows
    assert train(VANILLA, tmp_path / "a", "data.batch_size=1", "trainer.max_steps=1") == 0
    twin = ["domains.twin.type=clean", "domains.twin.bn=clean"]
    assert train(VANILLA, tmp_path / "b", *ONE_BY_ONE, "data.batch_size=1", *twin, "trainer.max_steps=1") == 0


def _tiny_cfg():
    return OmegaConf.create(
        {"data": {"image_size": 32, "batch_size": 16}, "model": {"name": "cifar_resnet8", "width": 8}}
    )


@pytest.mark.parametrize(
    ("overrides", "key", "needs"),
    [
        ({"data": {"image_size": 4096, "batch_size": 128}}, "data.batch_size", "24.0 GiB"),
        ({"data": {"image_size": 100_000}}, "data.image_size", "1.7 TiB"),
        (
            {"model": {"width": 4096}},
            "model.width",
            "5,000,056,842 parameters, whose float32 weights and gradients need 37.3 GiB",
        ),
    ],
    ids=["batch", "image", "width"],
)
def test_what_cannot_fit_a_cuda_device_is_refused_without_a_gpu(overrides, key, needs, monkeypatch):
    cfg = OmegaConf.merge(_tiny_cfg(), overrides)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=8 << 30))
    check_memory(_tiny_cfg(), torch.device("cuda"))  # the tiny setting fits
    with pytest.raises(RecipeError) as info:
        check_memory(cfg, torch.device("cuda"))
    assert str(info.value).startswith(f"key '{key}': "), info.value
    assert needs in str(info.value) and "more than the 8.0 GiB of device cuda" in str(info.value)


# --------------------------------------------------------------------------- failing in the step: exit 1
@pytest.fixture
def one_image_domain(scratch_registry):
    @mbn.register_domain("one_image_test")
    class OneImage(mbn.Domain):
        """Keeps one image of its input: the recipe check cannot know, the training forward finds out."""

        def generate(self, images, labels, ctx):
            return images[:1], labels[:1]


def test_a_domain_leaving_one_image_alone_in_its_bn_stops_in_one_line(tmp_path, capsys, one_image_domain):
    one = ["domains.one.type=one_image_test", "domains.one.bn=one"]
    assert train(VANILLA, tmp_path / "run", *ONE_BY_ONE, "data.batch_size=4", *one, "trainer.max_steps=2") == 1
    err = one_line_error(capsys)
    start = "mbn-train: error: the training forward of 5 images of 3x8x8 on cpu: a BatchNorm layer got one value"
    assert err.startswith(f"{start} per channel (input 1x64x1x1) and cannot normalise it in training"), err
    assert "raise data.batch_size, or the fraction of the domain that gets one image (domains.<name>.fraction)" in err


def test_cuda_out_of_memory_in_the_forward_is_one_line(tmp_path, capsys, monkeypatch):
    def out_of_memory(self, x, heads):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(HeadsForward, "forward", out_of_memory)
    assert train(VANILLA, tmp_path / "run", "trainer.max_steps=2") == 1
    assert one_line_error(capsys) == (
        "mbn-train: error: out of memory in the training forward of 16 images of 3x32x32 on cpu (tried to allocate "
        "20.00 GiB); lower data.batch_size (optim.grad_accum_steps keeps the images per update), data.image_size or "
        "model.width"
    )


def test_out_of_memory_in_the_backward_is_one_line(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(torch.autograd, "backward", out_of_memory)
    assert train(VANILLA, tmp_path / "run", "trainer.max_steps=2") == 1
    err = one_line_error(capsys)
    assert err.startswith(
        "mbn-train: error: out of memory in the backward pass on cpu (tried to allocate 335.3 GiB); "
    ), err
    assert err.endswith(
        "lower data.batch_size (optim.grad_accum_steps keeps the images per update), data.image_size or model.width"
    )


# ------------------------------------------------------- real allocations, in a child with its address space capped
CHILD = r"""
import contextlib, io, json, resource, sys
import mbn.cli.train as cli
import mbn.train.build  # everything the run imports, mapped before the cap
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(args)
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def capped_runs(tmp_path_factory):
    """mbn-train in a child capped at 3 GiB above its imports: what each case exits with and says."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux) to cap the child's address space")
    root = tmp_path_factory.mktemp("capped")
    base = [str(VANILLA), *TINY, "trainer.max_steps=1", "data.synthetic_train_size=16", "data.synthetic_test_size=16"]
    cases = {
        "width": ["model.width=100000"],  # a 3x3 convolution of 360 GB: refused before it is built
        "image": ["data.image_size=100000"],  # a 1.75 TiB synthetic set, 120 GB a float32 image
        "forward": ["data.image_size=512", "model.width=256"],  # the stem's output, 16x256x512x512 floats: 4 GiB
    }
    runs = [[*base, *extra, f"trainer.out_dir={root / name}"] for name, extra in cases.items()]
    # one thread, two malloc arenas: on a many-core host each thread's arena reserves 64 MiB of the capped space
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(runs)], capture_output=True, text=True, timeout=240,
                          cwd=REPO, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(zip(cases, json.loads(proc.stdout.strip().splitlines()[-1]), strict=True))
    for name, result in results.items():
        result["written"] = (root / name).exists()
    return results


def test_width_beyond_the_memory_is_refused_naming_model_width(capped_runs):
    run = capped_runs["width"]
    assert run["code"] == 2, run["err"]
    assert run["err"].startswith("mbn-train: error: key 'model.width': cifar_resnet8 with model.width=100000 has "), run
    assert "parameters, whose float32 weights and gradients need " in run["err"] and "lower model.width" in run["err"]
    assert len(run["err"].strip().splitlines()) == 1 and not run["written"]


def test_image_size_beyond_the_memory_is_refused_naming_data_image_size(capped_runs):
    run = capped_runs["image"]
    assert run["code"] == 2, run["err"]
    assert run["err"].startswith(
        "mbn-train: error: key 'data.image_size': one batch of 16 images of 100000x100000 (data.batch_size, "
        "data.image_size) needs 1.7 TiB, more than the "
    ), run["err"]
    assert run["err"].rstrip().endswith("; lower data.image_size or data.batch_size")
    assert len(run["err"].strip().splitlines()) == 1 and not run["written"]


def test_real_out_of_memory_in_the_forward_is_one_line(capped_runs):
    run = capped_runs["forward"]
    assert run["code"] == 1, run["err"]
    lines = run["err"].strip().splitlines()
    assert lines[-1] == (
        "mbn-train: error: out of memory in the training forward of 16 images of 3x512x512 on cpu (tried to allocate "
        "4.0 GiB); lower data.batch_size (optim.grad_accum_steps keeps the images per update), data.image_size or "
        "model.width"
    ), run["err"]
    assert len(lines) == 1 and "Traceback" not in run["err"]


# ------------------------------------------------------------------------------------- the translation
@pytest.mark.parametrize(
    ("err", "tried"),
    [
        (RuntimeError(CPU_OOM), "335.3 GiB"),
        (torch.cuda.OutOfMemoryError(CUDA_OOM), "20.00 GiB"),
        (
            RuntimeError(
                "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.2 MB, max allowed: "
                "18.13 GB). Tried to allocate 2.00 GiB on private pool."
            ),
            "2.00 GiB",
        ),
        (MemoryError(), ""),
        (RuntimeError("DataLoader worker (pid 4711) is killed by signal: Killed. out of memory?"), None),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x8 and 64x10)"), None),
        (ValueError("Expected more than 1 value per channel when training, got input size torch.Size([1, 8])"), None),
    ],
    ids=["cpu", "cuda", "mps", "memoryerror", "worker", "other", "bn"],
)
def test_allocation_failure(err, tried):
    assert allocation_failure(err) == tried


def test_numpy_out_of_memory_is_recognised():
    with pytest.raises(MemoryError) as info:  # numpy's _ArrayMemoryError, refused before anything is allocated
        np.empty((2**62,), dtype=np.uint8)
    assert allocation_failure(info.value) == "4.00 EiB"


def test_step_size_error_leaves_other_errors_alone():
    assert step_size_error(RuntimeError("shapes cannot be multiplied"), "the forward") is None
    err = step_size_error(ValueError("Expected more than 1 value per channel when training, got input size "
                                     "torch.Size([1, 512])"), "x")  # fmt: skip
    assert err is not None and "(input 1x512)" in str(err)


def test_size_text():
    assert [size_text(n) for n in (0, 1023, 1024, 5 * 2**30 // 2, 360_000_000_000)] == [
        "0 B", "1023 B", "1.0 KiB", "2.5 GiB", "335.3 GiB",
    ]  # fmt: skip


CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 360000000000 bytes. Error code 12 (Cannot allocate memory)"  # noqa: E501


@pytest.mark.parametrize(
    ("target", "code", "expected"),
    [
        ("mbn.train.build.build_data", 2, "out of memory holding the data set (tried to allocate 335.3 GiB); "
         "lower data.image_size"),
        ("mbn.train.build.build_model", 2, "out of memory building the model on cpu (tried to allocate 335.3 GiB); "
         "lower model.width"),
        ("mbn.train.hooks.topk_accuracy", 1, "out of memory in the evaluation forward on cpu (tried to allocate "
         "335.3 GiB); lower data.eval_batch_size"),
    ],
)  # fmt: skip
def test_out_of_memory_outside_the_step_names_the_key(target, code, expected, tmp_path, capsys, monkeypatch):
    from tests.runs import VANILLA, one_line_error, train

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(target, out_of_memory)
    assert train(VANILLA, tmp_path / "run", "trainer.max_steps=1") == code
    err = one_line_error(capsys)
    assert expected in err, err
