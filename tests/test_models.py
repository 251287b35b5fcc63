"""The *_cifar model zoo in timm's registry and the factory the pipeline builds models with."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import distill2deploy  # noqa: F401  (registers the *_cifar models)
from distill2deploy.errors import UserError
from distill2deploy.models import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_MODELS,
    ResizeInput,
    create_model,
    extract,
    load_checkpoint,
    stage_count,
)

from .conftest import SAMPLE_NPZ as SAMPLE
from .conftest import WEIGHTS

needs_weights = pytest.mark.skipif(not (WEIGHTS / "cifar100_resnet56.pth").is_file(),
                                   reason=f"shared weights not found under {WEIGHTS}")
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"CIFAR-100 sample not found at {SAMPLE}")

# stage widths (stem first) and the published parameter counts at 100 classes
EXPECTED_CHANNELS = {
    "resnet20_cifar": [16, 16, 32, 64],
    "resnet8x4_cifar": [32, 64, 128, 256],
    "resnet32x4_cifar": [32, 64, 128, 256],
    "wrn_16_2_cifar": [16, 32, 64, 128],
    "wrn_40_2_cifar": [16, 32, 64, 128],
    "vgg13_bn_cifar": [64, 128, 256, 512, 512],
    "mobilenetv2_x0_5_cifar": [16, 8, 12, 16, 32, 48, 80, 160],
    "shufflenetv1_cifar": [24, 240, 480, 960],
    "shufflenetv2_cifar": [24, 116, 232, 464],
}
EXPECTED_PARAMS_M = {
    "resnet56_cifar": 0.86, "resnet20_cifar": 0.28, "resnet8x4_cifar": 1.23, "resnet32x4_cifar": 7.43,
    "wrn_16_2_cifar": 0.70, "wrn_40_2_cifar": 2.26, "vgg13_bn_cifar": 9.46,
    "mobilenetv2_x0_5_cifar": 0.81, "shufflenetv1_cifar": 0.95, "shufflenetv2_cifar": 1.36,
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sample_test() -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(SAMPLE)
    x = torch.from_numpy(data["x_test"]).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(data["y_test"]).long()


@pytest.fixture(scope="module")
def x2() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# --- registry, shapes, timm API -----------------------------------------------------------
def test_all_models_registered_in_timm() -> None:
    assert set(CIFAR_MODELS) <= set(timm.list_models("*_cifar"))
    assert len(CIFAR_MODELS) == 14
    assert set(timm.list_pretrained("*_cifar*")) == {
        f"resnet{d}_cifar.chenyaofo_c100" for d in (20, 32, 44, 56)}


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_model_api_and_intermediates(name: str, x2: torch.Tensor) -> None:
    model = timm.create_model(name).eval()
    assert model.num_classes == 100 and model.pretrained_cfg["num_classes"] == 100
    assert model.default_cfg["input_size"] == (3, 32, 32)
    with torch.no_grad():
        logits = model(x2)
        final, feats = model.forward_intermediates(x2)
        assert torch.allclose(model.forward_head(final), logits, atol=1e-5)
        assert torch.allclose(model.forward_features(x2), final, atol=1e-6)
        assert model.forward_head(final, pre_logits=True).shape == (2, model.num_features)
        only = model.forward_intermediates(x2, indices=[1, -1], intermediates_only=True)
    assert logits.shape == (2, 100)
    assert len(feats) == len(model.feature_info) == stage_count(model) + 1
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info["num_chs"], (name, info)
        assert f.shape[-1] == 32 // info["reduction"], (name, info)
        assert isinstance(model.get_submodule(info["module"]), nn.Module)
    assert [t.shape for t in only] == [feats[1].shape, feats[-1].shape]
    if name in EXPECTED_CHANNELS:
        assert [i["num_chs"] for i in model.feature_info] == EXPECTED_CHANNELS[name]
    if name in EXPECTED_PARAMS_M:  # the published sizes at 100 classes, +-5 %
        assert _n_params(model) / 1e6 == pytest.approx(EXPECTED_PARAMS_M[name], rel=0.05)
    assert isinstance(model.get_classifier(), nn.Linear)
    model.reset_classifier(10)
    assert model.num_classes == 10 and model(x2).shape == (2, 10)


def test_stage_numbering_follows_the_thesis() -> None:
    # levels the ECKD pairings use: VGG13 1..4 = block1..4, MobileNetV2 1..7 = the IR stages
    assert [i["module"] for i in timm.create_model("vgg13_bn_cifar").feature_info] == [
        f"block{k}" for k in range(5)]
    mnv2 = timm.create_model("mobilenetv2_x0_5_cifar")
    assert stage_count(mnv2) == 7 and mnv2.feature_info[7]["module"] == "blocks.6"
    assert [i["module"] for i in timm.create_model("wrn_40_2_cifar").feature_info][1:] == [
        "block1", "block2", "block3"]
    for name in ("resnet56_cifar", "resnet32x4_cifar", "shufflenetv1_cifar", "shufflenetv2_cifar"):
        assert stage_count(timm.create_model(name)) == 3


def test_wrn_norm_applies_final_bn_to_last_stage(x2: torch.Tensor) -> None:
    model = timm.create_model("wrn_16_2_cifar").eval()
    with torch.no_grad():
        raw = model.forward_intermediates(x2, indices=[3], intermediates_only=True)[0]
        normed = model.forward_intermediates(x2, indices=[3], norm=True, intermediates_only=True)[0]
        assert torch.allclose(normed, model.forward_features(x2))
        early, taken = model.forward_intermediates(x2, indices=[1], stop_early=True)
    assert early.shape == (2, 32, 32, 32) and torch.equal(early, taken[0])
    assert not torch.allclose(raw, normed) and (normed >= 0).all() and (raw < 0).any()


def test_prune_and_features_only(x2: torch.Tensor) -> None:
    model = timm.create_model("mobilenetv2_x0_5_cifar").eval()
    with torch.no_grad():
        want = model.forward_intermediates(x2, indices=[2, 5], intermediates_only=True)
    assert model.prune_intermediate_layers([2, 5]) == [2, 5]
    assert isinstance(model.blocks[6], nn.Identity) and isinstance(model.conv2, nn.Identity)
    assert model.num_features == 48 and model.num_classes == 0
    with torch.no_grad():
        got = model.forward_intermediates(x2, indices=[2, 5], intermediates_only=True)
        assert model(x2).shape == (2, 48, 4, 4)  # head pruned with timm's reset_classifier(0, '')
    assert all(torch.equal(a, b) for a, b in zip(want, got))

    feats = timm.create_model("shufflenetv2_cifar", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in feats(x2)] == [116, 464] == feats.feature_info.channels()


# --- shared pretrained weights ----------------------------------------------------------------
@needs_weights
@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_shared_weights_load_strictly(depth: int) -> None:
    model = timm.create_model(f"resnet{depth}_cifar")
    sd = torch.load(WEIGHTS / f"cifar100_resnet{depth}.pth", map_location="cpu", weights_only=True)
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.fc.weight, sd["fc.weight"])


@pytest.mark.slow
@needs_weights
@needs_sample
def test_resnet56_top1_on_sample_is_the_documented_72_25() -> None:
    model = create_model("resnet56_cifar", num_classes=100,
                         checkpoint=WEIGHTS / "cifar100_resnet56.pth").eval()
    x, y = _sample_test()
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert len(y) == 400 and correct == 289  # 72.25 %


@needs_weights
@needs_sample
def test_pretrained_tag_loads_through_timm_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    # stand-in for the download: the shared copy of the same chenyaofo weights
    sd = torch.load(WEIGHTS / "cifar100_resnet20.pth", map_location="cpu", weights_only=True)
    urls: list[str] = []

    def fake_download(url: str, *args: object, **kwargs: object) -> dict:
        urls.append(url)
        return {k: v.clone() for k, v in sd.items()}

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", fake_download)
    model = create_model("resnet20_cifar", num_classes=100, pretrained=True).eval()
    assert urls == ["https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/"
                    "cifar100_resnet20-23dac2f1.pt"]
    assert torch.equal(model.fc.weight, sd["fc.weight"])
    # another class count: refused unless the head is reset on purpose (then timm keeps the backbone)
    with pytest.raises(UserError, match=r"(?s)100-class head but the data has 10.*teacher\.reset_head: true"):
        create_model("resnet20_cifar.chenyaofo_c100", num_classes=10, pretrained=True, role="teacher")
    ten = create_model("resnet20_cifar.chenyaofo_c100", num_classes=10, pretrained=True, reset_head=True)
    assert ten.fc.out_features == 10 and torch.equal(ten.conv1.weight, sd["conv1.weight"])


# --- factory errors -------------------------------------------------------------------------
def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(UserError) as e:
        create_model("resnet56_cifr", num_classes=100)
    msg = str(e.value)
    assert "unknown model 'resnet56_cifr'" in msg and "'resnet56_cifar'" in msg
    assert "timm.list_models('*pattern*')" in msg
    with pytest.raises(UserError, match="(?s)no pretrained tag 'in1k'.*'resnet56_cifar.chenyaofo_c100'"):
        create_model("resnet56_cifar.in1k", num_classes=100)


def test_pretrained_without_weights_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no pretrained weights.*wrn_40_2_cifar") as e:
        create_model("wrn_40_2_cifar", num_classes=100, pretrained=True, role="teacher")
    assert "teacher.checkpoint: PATH" in str(e.value)


def test_offline_download_names_the_checkpoint_key(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        create_model("resnet56_cifar", num_classes=100, pretrained=True, role="teacher")
    msg = str(e.value)
    assert "could not download" in msg and "URLError" in msg
    assert "teacher.checkpoint: PATH" in msg and "cifar100_resnet56-f2eff4c8.pt" in msg


def test_bad_model_option_is_a_user_error() -> None:
    with pytest.raises(UserError, match="does not accept an option"):
        create_model("resnet20_cifar", num_classes=100, depthh=20)
    with pytest.raises(UserError, match="num_classes"):
        create_model("resnet20_cifar", num_classes=0)
    # a value the constructor rejects names the config key, not a ValueError traceback
    with pytest.raises(UserError, match="6n\\+2") as e:
        create_model("resnet20_cifar", num_classes=100, role="student", depth=21)
    assert e.value.where == "student.model_kwargs"
    with pytest.raises(UserError, match="vgg13"):
        create_model("vgg13_bn_cifar", num_classes=100, role="teacher", cfg="vgg14")


# --- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_containers_prefixes_and_safetensors(tmp_path: Path, x2: torch.Tensor) -> None:
    from safetensors.torch import save_file

    src = timm.create_model("resnet8x4_cifar", num_classes=10).eval()
    sd = src.state_dict()
    wrapped = {"epoch": 240, "model": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": no_counters}, tmp_path / "old.pt")
    with torch.no_grad():
        ref = src(x2)
        for file in ("ckpt.pth", "w.safetensors", "old.pt"):
            model = create_model("resnet8x4_cifar", num_classes=10, checkpoint=tmp_path / file).eval()
            assert torch.equal(model(x2), ref), file


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "c100.pth"
    torch.save(timm.create_model("resnet20_cifar").state_dict(), path)
    with pytest.raises(UserError) as e:
        create_model("resnet20_cifar", num_classes=10, checkpoint=path)
    msg = str(e.value)
    assert "fc.weight (100, 64) vs (10, 64)" in msg
    assert "num_classes=100" in msg and "--num-classes 100" in msg  # a real argument and flag, not a config key
    with pytest.raises(UserError) as e:
        create_model("resnet32_cifar", num_classes=100, checkpoint=path)
    assert "missing keys: layer1.3" in str(e.value) and "model name" in str(e.value)


def test_checkpoint_missing_or_not_a_checkpoint(tmp_path: Path) -> None:
    model = timm.create_model("resnet20_cifar")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(model, tmp_path / "junk.pth")
    torch.save({"epoch": 3, "acc": torch.tensor(0.5)}, tmp_path / "meta.pth")
    with pytest.raises(UserError, match="no state_dict"):
        load_checkpoint(model, tmp_path / "meta.pth")


# --- input resizing and feature extraction ----------------------------------------------------
def test_resize_input_wraps_a_timm_model(x2: torch.Tensor) -> None:
    model = create_model("resnet18", num_classes=10, input_size=64, data_input_size=32).eval()
    assert isinstance(model, ResizeInput) and model.size == (64, 64)
    inner = model.model
    assert model.num_classes == 10 and model.feature_info is inner.feature_info
    assert model.get_classifier() is inner.fc
    up = torch.nn.functional.interpolate(x2, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(model(x2), inner(up), atol=1e-5)
        logits, feats = extract(model, x2, [4, 2])
        assert torch.allclose(logits, inner(up), atol=1e-5)
    assert [f.shape for f in feats] == [(2, 512, 2, 2), (2, 128, 8, 8)]  # 64 px / 32, / 8
    model.reset_classifier(5)
    assert model.num_classes == 5
    same = create_model("resnet20_cifar", num_classes=100, input_size=32)
    assert not isinstance(same, ResizeInput)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_resize_input_exports_to_onnx(tmp_path: Path, x2: torch.Tensor) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = create_model("resnet20_cifar", num_classes=10, input_size=48).eval()
    path = tmp_path / "m.onnx"
    # the TorchScript exporter keeps this test fast; the dynamo exporter handles it the same way
    torch.onnx.export(model, (x2,), str(path), input_names=["input"], output_names=["logits"],
                      dynamo=False)
    assert "Resize" in {n.op_type for n in onnx.load(str(path)).graph.node}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x2).numpy(), atol=1e-4)


def test_extract_in_requested_order_and_hook_fallback(x2: torch.Tensor) -> None:
    model = timm.create_model("wrn_16_2_cifar").eval()
    with torch.no_grad():
        logits, feats = extract(model, x2, [3, 1, -1])
        _, all_feats = model.forward_intermediates(x2)
        assert torch.allclose(logits, model(x2), atol=1e-5)
    assert [f.shape[1] for f in feats] == [128, 32, 128]
    assert torch.equal(feats[1], all_feats[1]) and torch.equal(feats[0], feats[2])
    assert extract(model, x2, None)[1] == []
    with pytest.raises(UserError, match="levels 0..3"):
        extract(model, x2, [4])

    class HooksOnly(nn.Module):
        """A model with feature_info but no forward_intermediates (hook fallback)."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.stage = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, 3)
            self.feature_info = [dict(num_chs=4, reduction=1, module="stem"),
                                 dict(num_chs=8, reduction=2, module="stage")]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.stage(self.stem(x)).mean((2, 3)))

    hooked = HooksOnly()
    logits, feats = extract(hooked, x2, [1, 0])
    assert logits.shape == (2, 3) and [f.shape[1:] for f in feats] == [(8, 16, 16), (4, 32, 32)]
    assert not hooked.stage._forward_hooks  # hooks are removed again
    assert stage_count(hooked) == 1

    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    with pytest.raises(UserError, match="neither forward_intermediates nor feature_info"):
        extract(plain, x2, [0])
    with pytest.raises(UserError, match="no feature_info"):
        stage_count(plain)


def test_random_init_model_is_seeded_and_leaves_the_callers_random_state():
    import torch

    from distill2deploy.models.factory import random_init_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = random_init_model("resnet20_cifar", num_classes=10)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is where it was
    b = random_init_model("resnet20_cifar", num_classes=10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = random_init_model("resnet20_cifar", num_classes=10, seed=1)
    assert not torch.equal(next(iter(a.parameters())), next(iter(c.parameters())))
