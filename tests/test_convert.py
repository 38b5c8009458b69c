"""Model conversion, export round-trip, SyncBN per source, autocast / channels_last / compile."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import mbn


def _randomize_bn(model: nn.Module) -> None:
    """Give every BN non-trivial statistics so equality checks mean something."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(7)


@pytest.fixture
def resnet18():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    _randomize_bn(net)
    return net.eval()


class TestConvert:
    def test_feature_resnet18_keeps_eval_logits_for_every_source(self, resnet18):
        x = torch.rand(2, 3, 32, 32)
        ref = resnet18(x)
        net = mbn.convert_model(resnet18, sources=("clean", "adv", "autoaug"))
        assert net is resnet18
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in torchvision.models.resnet18().modules())
        assert len(mbn.multi_source_norms(net)) == n_bn
        for source in ("clean", "adv", "autoaug"):
            with mbn.use_source(net, source):
                torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
        norm = net.bn1
        assert norm.bns["adv"].num_batches_tracked.item() == 7

    @pytest.mark.slow
    def test_feature_timm_efficientnet_keeps_eval_logits(self):
        torch.manual_seed(0)
        net = timm.create_model("efficientnet_b0", num_classes=10, pretrained=False).eval()
        _randomize_bn(net)
        x = torch.rand(2, 3, 64, 64)
        ref = net(x)
        mbn.convert_model(net, ("clean", "adv"))
        assert len(mbn.multi_source_norms(net)) > 10  # timm's BatchNormAct2d is a BatchNorm2d subclass
        for source in ("clean", "adv"):
            with mbn.use_source(net, source):
                torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
        exported = mbn.export_model(net, "adv")
        torch.testing.assert_close(exported(x), ref, rtol=0, atol=0)

    @pytest.mark.slow
    def test_feature_export_round_trip_into_fresh_torchvision_model(self, resnet18):
        keys = list(resnet18.state_dict())
        net = mbn.convert_model(resnet18, ("clean", "adv"))
        net.train()
        for source, shift in (("clean", 0.0), ("adv", 2.0)):  # make the sources differ
            with mbn.use_source(net, source):
                net(torch.rand(4, 3, 32, 32) + shift)
        net.eval()
        x = torch.rand(3, 3, 32, 32)
        for source in ("clean", "adv"):
            exported = mbn.export_model(net, source)
            assert list(exported.state_dict()) == keys
            fresh = torchvision.models.resnet18(num_classes=10).eval()
            fresh.load_state_dict(exported.state_dict())
            with mbn.use_source(net, source):
                torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
        assert mbn.multi_source_norms(net), "export must not modify the converted model"

    def test_feature_state_dict_keys_are_stable(self):
        net = mbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), ("clean", "adv"))
        assert list(net.state_dict()) == [
            "0.weight",
            "0.bias",
            *(
                f"1.bns.{s}.{k}"
                for s in ("clean", "adv")
                for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            ),
        ]

    def test_exception_already_converted(self, resnet18):
        mbn.convert_model(resnet18)
        with pytest.raises(ValueError, match="already converted"):
            mbn.convert_model(resnet18)

    def test_feature_skips_instance_and_group_norm(self):
        net = nn.Sequential(nn.InstanceNorm2d(3), nn.GroupNorm(1, 3), nn.BatchNorm2d(3))
        mbn.convert_model(net, ("a", "b"))
        assert isinstance(net[0], nn.InstanceNorm2d) and isinstance(net[1], nn.GroupNorm)
        assert isinstance(net[2], mbn.MultiSourceBatchNorm)

    def test_feature_bare_batchnorm_converts(self):
        norm = mbn.convert_model(nn.BatchNorm1d(3), ("a", "b"))
        assert isinstance(norm, mbn.MultiSourceBatchNorm)

    def test_feature_syncbn_per_source(self, resnet18):
        net = mbn.convert_model(resnet18, ("clean", "adv"))
        keys = list(net.state_dict())
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
        for norm in mbn.multi_source_norms(synced):
            assert all(isinstance(bn, nn.SyncBatchNorm) for bn in norm.bns.values())
        assert list(synced.state_dict()) == keys
        via_helper = mbn.convert_sync_batchnorm(copy.deepcopy(net))
        torch.testing.assert_close(via_helper.state_dict(), net.state_dict(), rtol=0, atol=0)

    def test_feature_syncbn_keeps_sharing(self):
        net = mbn.convert_model(nn.Sequential(nn.BatchNorm2d(3)), ("a", "b"), share_affine=True, share_stats=True)
        synced = mbn.convert_sync_batchnorm(net)
        a, b = synced[0].bns["a"], synced[0].bns["b"]
        assert a.weight is b.weight and a.running_var is b.running_var

    def test_feature_syncbn_source_exports_to_plain_keys(self):
        net = mbn.convert_model(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), ("a", "b"))
        synced = mbn.convert_sync_batchnorm(net)
        assert list(mbn.export_model(synced, "b").state_dict()) == list(
            nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).state_dict()
        )


class TestCompatibility:
    @pytest.mark.slow
    def test_smoke_autocast_bf16_cpu(self, resnet18):
        net = mbn.convert_model(resnet18, ("clean", "adv")).train()
        x = torch.rand(4, 3, 32, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16), mbn.split_sources(net, {"clean": 2, "adv": 2}):
            out = net(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        out.float().sum().backward()
        assert net.bn1.bns["adv"].weight.grad is not None

    def test_feature_channels_last(self, resnet18):
        net = mbn.convert_model(resnet18, ("clean", "adv"))
        x = torch.rand(2, 3, 32, 32)
        with mbn.use_source(net, "adv"):
            ref = net(x)
            net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
            out = net_cl(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

    def test_feature_input_gradients(self, resnet18):
        net = mbn.convert_model(resnet18, ("clean", "adv"))
        x = torch.rand(2, 3, 32, 32, requires_grad=True)
        with mbn.use_source(net, "adv"):
            (grad,) = torch.autograd.grad(net(x).logsumexp(1).sum(), x)
        assert grad.abs().sum() > 0

    @pytest.mark.slow
    def test_smoke_compile_switches_sources(self):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        net(torch.rand(2, 3, 8, 8))
        mbn.convert_model(net, ("clean", "adv")).eval()
        with torch.no_grad():
            net[1].bns["adv"].running_mean.fill_(3.0)
        compiled = torch.compile(net, backend="aot_eager")
        x = torch.rand(2, 3, 8, 8)
        for source in ("clean", "adv", "clean"):
            with mbn.use_source(net, source):
                torch.testing.assert_close(compiled(x), net(x))
        with mbn.split_sources(net, {"clean": 1, "adv": 1}):
            torch.testing.assert_close(compiled(x), net(x))


def test_feature_syncbn_keeps_timm_fused_activation():
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    net = mbn.convert_model(nn.Sequential(BatchNormAct2d(4, act_layer=nn.SiLU)), ("a", "b"))
    synced = mbn.convert_sync_batchnorm(net)
    for bn in synced[0].bns.values():
        assert isinstance(bn, SyncBatchNormAct) and isinstance(bn.act, nn.SiLU)
