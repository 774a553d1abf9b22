"""Model builders: shapes, parameter counts, argument errors, channels_last/autocast, and
the ImageNet weight download (through a file:// URL, never the network)."""

from __future__ import annotations

import hashlib
import math
import socket
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models import resnet18 as tv_resnet18

from calibrun.compose import config_dir
from calibrun.config import build_component, validate
from calibrun.models import ZeroPadShortcut, cifar_resnet, resnet18

# Every model a user can pick: the YAML files of conf/model.
MODEL_NAMES = sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml"))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- CIFAR ResNet ---------------------------------------------------------------------------


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_output_shape(shortcut: str) -> None:
    model = cifar_resnet(num_classes=10, depth=20, shortcut=shortcut).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet110_option_a_has_paper_parameter_count() -> None:
    # He et al. (2016), Table 6: ResNet-110 has 1.7 M parameters.
    model = cifar_resnet(num_classes=10, depth=110)
    assert abs(n_params(model) - 1.73e6) < 0.05e6
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_resnet20_option_a_has_paper_parameter_count() -> None:
    # He et al. (2016), Table 6: ResNet-20 has 0.27 M parameters.
    assert abs(n_params(cifar_resnet(num_classes=10, depth=20)) - 0.27e6) < 0.01e6


@pytest.mark.parametrize("depth", [20, 56])
def test_option_b_adds_exactly_the_two_projections(depth: int) -> None:
    a = n_params(cifar_resnet(10, depth, "A"))
    b = n_params(cifar_resnet(10, depth, "B"))
    # 1x1 convs 16->32 and 32->64 plus their BN scale and shift.
    assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_width_scales_the_three_stages() -> None:
    model = cifar_resnet(num_classes=100, depth=20, width=32)
    assert model.fc.in_features == 128
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_zero_pad_shortcut_subsamples_and_pads_with_zeros() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0
    assert not list(ZeroPadShortcut(16, 32, 2).parameters())


def test_init_is_kaiming_fan_out_and_unit_batchnorm() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(num_classes=10, depth=20)
    conv = model.blocks[-1].conv2  # 64 -> 64, 3x3: the largest sample of weights
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("depth", [0, 2, 7, 21, 100, 111])
def test_bad_depth_names_allowed_values(depth: int) -> None:
    with pytest.raises(ValueError, match=r"20, 32, 44, 56, 110"):
        cifar_resnet(10, depth=depth)


@pytest.mark.parametrize("shortcut", ["C", "a", ""])
def test_bad_shortcut(shortcut: str) -> None:
    with pytest.raises(ValueError, match="'A', 'B'"):
        cifar_resnet(10, depth=20, shortcut=shortcut)


def test_explicit_stages_build_the_same_network_as_depth() -> None:
    torch.manual_seed(0)
    by_depth = cifar_resnet(10, depth=20).eval()
    torch.manual_seed(0)
    by_stages = cifar_resnet(10, stage_widths=[16, 32, 64], stage_blocks=[3, 3, 3]).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(by_stages(x), by_depth(x), rtol=0, atol=0)


def test_hidden_layer_adds_a_linear_layer_with_relu() -> None:
    base = cifar_resnet(10, depth=8)
    hidden = cifar_resnet(10, depth=8, hidden_features=100)
    # 64 -> 100 (weights and bias) replaces nothing; the output layer becomes 100 -> 10.
    assert n_params(hidden) - n_params(base) == (64 * 100 + 100) + (100 * 10 - 64 * 10)
    assert isinstance(hidden.hidden[1], nn.ReLU)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"depth": 20, "stage_widths": [32, 64], "stage_blocks": [9, 18]}, "model.depth"),
        ({"stage_widths": [32, 64], "stage_blocks": [9]}, "model.stage_blocks"),
        ({"stage_widths": [32, 0], "stage_blocks": [9, 18]}, "model.stage_widths"),
        ({"stage_widths": [32, 64]}, "model.stage_blocks"),
        ({"depth": 20, "hidden_features": 0}, "model.hidden_features"),
    ],
)
def test_bad_stages_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        cifar_resnet(10, **kwargs)


# --- The gap+cap paper's network (model=gapcap_net) -------------------------------------------

# Hand count: stem 3·32·9 + BN 2·32 = 928; 9 blocks of two 32->32 3x3 convs and two BNs,
# 9·(2·9216 + 128) = 167,040; the 32->64 block 18,432 + 36,864 + 256 = 55,552 and 17
# blocks of 64->64, 17·(2·36,864 + 256) = 1,257,728 (option-A shortcuts have none);
# 64->1000 fully connected 65,000; 1000->10 outputs 10,010.
GAPCAP_PARAMS = 928 + 167_040 + 55_552 + 1_257_728 + 65_000 + 10_010


def test_gapcap_net_matches_the_paper(compose_cfg) -> None:
    cfg = validate(compose_cfg(["model=gapcap_net", "data=cifar10"]))
    model = build_component(cfg.model, "model")
    assert model.conv1.out_channels == 32 and model.conv1.kernel_size == (3, 3)
    widths = [block.conv2.out_channels for block in model.blocks]
    assert widths == [32] * 9 + [64] * 18
    # The resolution halves once, entering the 64-map stage.
    assert [block.conv1.stride[0] for block in model.blocks] == [1] * 9 + [2] + [1] * 17
    linear, relu = model.hidden
    assert (linear.in_features, linear.out_features) == (64, 1000) and isinstance(relu, nn.ReLU)
    assert (model.fc.in_features, model.fc.out_features) == (1000, 10)
    assert n_params(model) == GAPCAP_PARAMS == 1_556_258
    # The count the user guide states (docs/guide/models.md, once the README's "Models").
    assert f"{GAPCAP_PARAMS:,}" in (Path(__file__).resolve().parent.parent / "docs/guide/models.md").read_text()


@pytest.mark.parametrize("zero_init_residual", [True, False])
def test_gapcap_net_trains_one_sgd_step(compose_cfg, zero_init_residual: bool) -> None:
    torch.manual_seed(0)
    cfg = compose_cfg(["model=gapcap_net", "data=cifar10", f"model.zero_init_residual={zero_init_residual}"])
    model = instantiate(cfg.model).train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if not zero_init_residual:
        # Every layer is wired into the output (zero-initialised BN scales block the
        # gradient of their branch's convolutions, hence only here).
        assert all(p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    assert nn.functional.cross_entropy(model(x), y) < loss


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_channels_last_matches_contiguous(shortcut: str) -> None:
    torch.manual_seed(0)
    model = cifar_resnet(10, depth=20, shortcut=shortcut).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    layouts = []
    for block in model.blocks:
        block.register_forward_hook(
            lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
        )
    out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # The zero-padding shortcut must not fall back to NCHW halfway through the network.
    assert all(layouts)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_trains_under_autocast_and_channels_last(compose_cfg, name: str) -> None:
    """Each configured model, as the CUDA path runs it (bf16 autocast, channels_last)."""
    # data=synthetic: 16x16 images keep bf16 on the CPU fast, the stride-2 stages still see
    # even sizes, and models that fix their input size (timm's ViTs) are built for them.
    model = instantiate(compose_cfg([f"model={name}", "data=synthetic"]).model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = nn.functional.cross_entropy(out.float(), torch.tensor([0, 1]))
    loss.backward()
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- ResNet-18 ------------------------------------------------------------------------------


def test_resnet18_cifar_stem() -> None:
    model = resnet18(num_classes=10).eval()
    assert isinstance(model.maxpool, nn.Identity)
    conv1 = model.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert (conv1.in_channels, conv1.out_channels, conv1.bias) == (3, 64, None)
    assert model.fc.out_features == 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_imagenet_stem() -> None:
    model = resnet18(num_classes=7, stem="imagenet").eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_resnet18_bad_stem() -> None:
    with pytest.raises(ValueError, match="'cifar', 'imagenet'"):
        resnet18(10, stem="tiny")


def test_resnet18_pretrained_needs_imagenet_stem() -> None:
    with pytest.raises(ValueError, match="stem=imagenet"):
        resnet18(10, stem="cifar", pretrained=True)


# --- ImageNet weights: a real torch.hub download, from a file:// URL ------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch.hub cache under tmp_path, and any socket connection is an error."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def serve_weights_from(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point ResNet18_Weights at ``url``; torchvision still fetches it with
    torch.hub.load_state_dict_from_url (download_url_to_file, hash check, torch.load)."""
    monkeypatch.setattr(ResNet18_Weights, "url", property(lambda self: url))


def test_pretrained_weights_are_downloaded_and_loaded(offline: Path, tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(1)
    state = tv_resnet18(weights=None).state_dict()
    raw = tmp_path / "raw.pth"
    torch.save(state, raw)
    # torch.hub checks the sha256 prefix that follows the last '-' of the file name.
    source = tmp_path / "mirror" / f"resnet18-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
    source.parent.mkdir()
    raw.rename(source)
    serve_weights_from(monkeypatch, source.as_uri())

    model = resnet18(num_classes=10, stem="imagenet", pretrained=True)

    assert (offline / source.name).is_file()
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 10
    # A second build reads the cache and needs no source any more.
    source.unlink()
    again = resnet18(num_classes=10, stem="imagenet", pretrained=True)
    assert torch.equal(again.conv1.weight, state["conv1.weight"])


def test_pretrained_without_network_or_cache_says_what_to_do(offline: Path, tmp_path: Path, monkeypatch) -> None:
    url = (tmp_path / "nowhere" / "resnet18-f37072fd.pth").as_uri()
    serve_weights_from(monkeypatch, url)
    with pytest.raises(RuntimeError) as info:
        resnet18(num_classes=10, stem="imagenet", pretrained=True)
    message = str(info.value)
    assert "could not be downloaded" in message
    assert str(offline / "resnet18-f37072fd.pth") in message
    assert url in message
    assert "model.pretrained=false" in message
    assert "\n" not in message


def test_pretrained_with_corrupt_download_fails_the_hash_check(offline: Path, tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "resnet18-00000000.pth"
    torch.save({"not": torch.zeros(1)}, source)
    serve_weights_from(monkeypatch, source.as_uri())
    with pytest.raises(RuntimeError, match="model.pretrained=false"):
        resnet18(num_classes=10, stem="imagenet", pretrained=True)
    assert not (offline / source.name).exists()
