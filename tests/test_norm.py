"""MultiSourceBatchNorm numerics: one source equals BatchNorm; split mode equals separate forwards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mbn
from mbn import MultiSourceBatchNorm


def _pair(cls=nn.BatchNorm2d, channels=6, **kw):
    torch.manual_seed(0)
    bn = cls(channels, **kw)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn, MultiSourceBatchNorm(copy.deepcopy(bn), ["main"])


def _input(cls, n=8, c=6):
    shape = {nn.BatchNorm1d: (n, c), nn.BatchNorm2d: (n, c, 5, 4), nn.BatchNorm3d: (n, c, 3, 4, 2)}[cls]
    return torch.randn(shape) * 2 + 0.5


class TestMultiSourceBatchNorm:
    @pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
    def test_feature_one_source_equals_batchnorm_train_and_eval(self, cls, device):
        bn, msbn = _pair(cls)
        bn, msbn = bn.to(device), msbn.to(device)
        for _ in range(3):
            x = _input(cls).to(device)
            torch.testing.assert_close(msbn(x), bn(x), rtol=0, atol=0)
        inner = msbn.bns["main"]
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(inner, key), getattr(bn, key), rtol=0, atol=0)
        bn.eval(), msbn.eval()
        x = _input(cls).to(device)
        torch.testing.assert_close(msbn(x), bn(x), rtol=0, atol=0)

    def test_feature_momentum_none_and_no_affine(self):
        for kw in ({"momentum": None}, {"affine": False}, {"track_running_stats": False}):
            bn = nn.BatchNorm2d(4, **kw)
            msbn = MultiSourceBatchNorm(copy.deepcopy(bn), ["a", "b"])
            for _ in range(2):
                x = torch.randn(6, 4, 3, 3)
                torch.testing.assert_close(msbn(x), bn(x), rtol=0, atol=0)

    def test_feature_split_equals_separate_forwards(self):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
        mbn.convert_model(net, ("clean", "adv", "aug"))
        twin = copy.deepcopy(net)
        xs = {"clean": torch.randn(5, 3, 9, 9), "adv": torch.randn(3, 3, 9, 9) * 3 + 1, "aug": torch.rand(4, 3, 9, 9)}
        xs = {k: v.requires_grad_() for k, v in xs.items()}
        with mbn.split_sources(net, {k: v.shape[0] for k, v in xs.items()}):
            out = net(torch.cat(list(xs.values())))
        grads = torch.autograd.grad(out.square().sum(), [*xs.values(), *net.parameters()])

        twin_xs = {k: v.detach().clone().requires_grad_() for k, v in xs.items()}
        outs = []
        for name, x in twin_xs.items():
            with mbn.use_source(twin, name):
                outs.append(twin(x))
        twin_grads = torch.autograd.grad(sum(o.square().sum() for o in outs), [*twin_xs.values(), *twin.parameters()])

        torch.testing.assert_close(out, torch.cat(outs))
        for g, tg in zip(grads, twin_grads, strict=False):
            torch.testing.assert_close(g, tg)
        torch.testing.assert_close(net.state_dict(), twin.state_dict(), rtol=0, atol=0)

    def test_feature_split_with_empty_chunk(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm1d(3)), ("a", "b"))
        with mbn.split_sources(net, {"a": 0, "b": 4}):
            assert net(torch.randn(4, 3)).shape == (4, 3)
        assert net[0].bns["a"].num_batches_tracked.item() == 0

    def test_feature_sources_diverge_on_different_distributions(self):
        torch.manual_seed(0)
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm2d(3)), ("clean", "adv"))
        for _ in range(20):
            with mbn.use_source(net, "clean"):
                net(torch.randn(16, 3, 4, 4))
            with mbn.use_source(net, "adv"):
                net(torch.randn(16, 3, 4, 4) * 3 + 2)
        clean, adv = net[0].bns["clean"], net[0].bns["adv"]
        assert (adv.running_mean - clean.running_mean).abs().min() > 1.5
        assert (adv.running_var / clean.running_var).min() > 5

    def test_feature_eval_mode_honours_routing(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm1d(3)), ("clean", "adv"))
        with torch.no_grad():
            net[0].bns["adv"].running_mean.fill_(5.0)
        net.eval()
        x = torch.zeros(2, 3)
        assert net(x).abs().max() < 1e-3  # main BN: zero mean
        with mbn.use_source(net, "adv"):
            torch.testing.assert_close(net(x), torch.full((2, 3), -5.0 / (1 + 1e-5) ** 0.5))

    def test_feature_frozen_stats_leave_running_stats(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm2d(3)), ("clean", "adv"))
        before = copy.deepcopy(net.state_dict())
        x = torch.randn(8, 3, 4, 4) * 2 + 1
        with mbn.frozen_stats(net), mbn.use_source(net, "adv"):
            out = net(x)
        torch.testing.assert_close(net.state_dict(), before, rtol=0, atol=0)
        ref = nn.functional.batch_norm(x, None, None, training=True)
        torch.testing.assert_close(out, ref)

    def test_feature_share_affine(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm2d(3)), ("a", "b"), share_affine=True)
        norm = net[0]
        assert norm.bns["a"].weight is norm.bns["b"].weight
        assert norm.bns["a"].running_mean is not norm.bns["b"].running_mean
        assert len(list(net.parameters())) == 2
        with mbn.use_source(net, "b"):
            net(torch.randn(8, 3, 2, 2) + 3).sum().backward()
        assert norm.bns["a"].weight.grad is not None
        assert norm.bns["a"].running_mean.abs().sum() == 0  # only b's statistics moved
        assert norm.bns["b"].running_mean.abs().sum() > 0

    def test_feature_share_stats_survives_to(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm2d(3)), ("a", "b"), share_stats=True)
        net = net.to(torch.float64)
        norm = net[0]
        assert norm.bns["a"].running_mean is norm.bns["b"].running_mean
        assert norm.bns["a"].weight is not norm.bns["b"].weight
        with mbn.use_source(net, "b"):
            net(torch.randn(8, 3, 2, 2, dtype=torch.float64) + 3)
        assert norm.bns["a"].running_mean.min() > 0.1

    def test_exception_unknown_source(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm1d(3)), ("clean", "adv"))
        expected = r"unknown source 'avd'; registered sources: \['clean', 'adv'\]"
        with pytest.raises(ValueError, match=expected), mbn.use_source(net, "avd"):
            pass
        with pytest.raises(ValueError, match="unknown source"), mbn.split_sources(net, {"clean": 2, "x": 2}):
            pass
        with pytest.raises(ValueError, match="unknown source"):
            mbn.export_model(net, "x")

    def test_exception_split_sizes_mismatch(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm1d(3)), ("clean", "adv"))
        with mbn.split_sources(net, {"clean": 2, "adv": 2}), pytest.raises(ValueError, match="sum to 4"):
            net(torch.randn(5, 3))

    @pytest.mark.parametrize("names", [(), ("a", "a"), ("not valid",), ("keys",)])
    def test_exception_bad_source_names(self, names):
        with pytest.raises(ValueError):
            MultiSourceBatchNorm(nn.BatchNorm1d(2), names)

    def test_feature_contexts_nest_and_restore(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm1d(3)), ("a", "b", "c"))
        with mbn.use_source(net, "b"):
            with mbn.split_sources(net, {"a": 1, "c": 1}):
                assert net[0].split == (("a", 1), ("c", 1))
            assert net[0].active == "b" and net[0].split is None
        assert net[0].active == "a"

    def test_gradcheck_input(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm1d(3)), ("a", "b")).double()
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        with mbn.use_source(net, "b"):
            assert torch.autograd.gradcheck(lambda t: net(t), (x,))
