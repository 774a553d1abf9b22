"""Model builders: small functions that take plain arguments and return an ``nn.Module``.

Hydra instantiates them from ``conf/model/*.yaml`` (``_target_: calibrun.models.<name>``).
"""

from __future__ import annotations

import difflib
import os
import urllib.parse
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models import resnet18 as tv_resnet18

from calibrun.config import first_line

SHORTCUTS = ("A", "B")
STEMS = ("cifar", "imagenet")


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: identity subsampled by ``stride``, new channels filled with zeros.

    References: He et al. 2016, "Deep Residual Learning for Image Recognition", §3.3, §4.2.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad keeps the input's memory format (channels_last stays channels_last);
        # the zeros go after the existing channels, as in fb.resnet.torch.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection; ReLU after the addition.

    References: He et al. 2016, "Deep Residual Learning for Image Recognition", Fig. 2.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3×3 stem, stages of basic blocks, global average pooling, an optional hidden fully
    connected layer with ReLU, and a linear classifier.

    ``stages`` lists (channels, blocks) per stage. The stem has the first stage's width;
    the first block of every later stage halves the resolution (stride 2), as in
    He et al.'s CIFAR networks, where each widening comes with a halving.

    References: He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2.
    """

    def __init__(self, num_classes: int, stages: list[tuple[int, int]], shortcut: str,
                 hidden_features: int | None = None, zero_init_residual: bool = False) -> None:
        super().__init__()
        in_channels = stages[0][0]
        self.conv1 = nn.Conv2d(3, in_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        blocks: list[nn.Module] = []
        for stage, (out_channels, n_blocks) in enumerate(stages):
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, shortcut))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        # Identity keeps the state_dict (and the random draws) of networks without it.
        self.hidden: nn.Module = nn.Identity()
        if hidden_features:
            self.hidden = nn.Sequential(nn.Linear(in_channels, hidden_features), nn.ReLU(inplace=True))
            in_channels = hidden_features
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. (2015) init with fan_out, as in the authors' fb.resnet.torch
                # code and torchvision; the linear layers keep PyTorch's default init.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for block in self.blocks:  # nn.Sequential yields plain Modules: these are BasicBlocks
                nn.init.zeros_(cast(BasicBlock, block).bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(self.hidden(global_average(x)))


def global_average(x: torch.Tensor) -> torch.Tensor:
    """N×C×H×W → N×C spatial means. A plain mean, not adaptive_avg_pool2d: on CUDA the
    latter's backward uses atomic adds, which trainer.deterministic=true cannot make
    bitwise reproducible."""
    return x.mean(dim=(2, 3))


class GlobalAveragePool(nn.Module):
    """:func:`global_average` keeping N×C×1×1, in place of torchvision's AdaptiveAvgPool2d(1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_average(x)[:, :, None, None]


def _stage_plan(depth: int | None, width: int | None, stage_widths: list[int] | None,
                stage_blocks: list[int] | None) -> list[tuple[int, int]]:
    """(channels, blocks) per stage, from ``depth``/``width`` or from the explicit lists."""
    if stage_widths is None and stage_blocks is None:
        depth = 110 if depth is None else depth
        width = 16 if width is None else width
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"model.depth={depth} is not 6n+2 with n >= 1; allowed: 8, 14, 20, 32, 44, 56, 110, ... (6n+2)"
            )
        if width < 1:
            raise ValueError(f"model.width={width} must be a positive number of channels")
        n = (depth - 2) // 6
        return [(width, n), (2 * width, n), (4 * width, n)]
    if depth is not None or width is not None:
        raise ValueError("model.stage_widths/model.stage_blocks replace model.depth and model.width; "
                         "set model.depth=null and model.width=null (or leave the stage lists null)")
    if not stage_widths or not stage_blocks or len(stage_widths) != len(stage_blocks):
        raise ValueError(f"model.stage_widths={stage_widths} and model.stage_blocks={stage_blocks} "
                         "must be two lists of the same, non-zero length (one entry per stage)")
    if min(stage_widths) < 1 or min(stage_blocks) < 1:
        raise ValueError(f"model.stage_widths={stage_widths} and model.stage_blocks={stage_blocks} "
                         "must hold positive numbers of channels and blocks")
    return list(zip(stage_widths, stage_blocks))


def cifar_resnet(num_classes: int, depth: int | None = None, shortcut: str = "A", width: int | None = None,
                 zero_init_residual: bool = False, stage_widths: list[int] | None = None,
                 stage_blocks: list[int] | None = None, hidden_features: int | None = None) -> nn.Module:
    """CIFAR ResNet: a 3×3 stem, stages of basic blocks, average pooling, an optional
    hidden fully connected layer (``hidden_features`` units followed by a ReLU), and the
    class outputs.

    Stages come either from ``depth`` = 6n + 2 (default 110) and ``width`` (default 16):
    three stages of n blocks with width/2·width/4·width channels, He et al.'s networks;
    or from ``stage_widths`` and ``stage_blocks`` (channels and block count per stage,
    ``depth`` and ``width`` left None), e.g. [32, 64] and [9, 18] for the gap+cap paper's
    network. Every stage after the first starts with a stride-2 block.
    ``shortcut="A"``: parameter-free identity, subsampled and zero-padded where the shape
    changes (He et al.'s CIFAR choice); ``"B"``: 1×1 conv + BN projection there.
    ResNet-110 with option A has 1.73 M parameters, ResNet-20 0.27 M.
    ``zero_init_residual`` starts each block's last BN scale at 0, so the network starts
    as its shortcut path: with He et al.'s initialisation alone, the 54 residual branches
    of ResNet-110 add up to logits so large that short runs stay at chance level.

    References: He et al. 2016, "Deep Residual Learning for Image Recognition";
    Goyal et al. 2017, "Accurate, Large Minibatch SGD", §5.1 (zero-initialised γ).
    """
    stages = _stage_plan(depth, width, stage_widths, stage_blocks)
    if shortcut not in SHORTCUTS:
        raise ValueError(f"model.shortcut={shortcut!r}; allowed: {', '.join(map(repr, SHORTCUTS))}")
    if hidden_features is not None and hidden_features < 1:
        raise ValueError(f"model.hidden_features={hidden_features} must be a positive width or null (no hidden layer)")
    return CifarResNet(num_classes, stages, shortcut, hidden_features, zero_init_residual)


def resnet18(num_classes: int, stem: str = "cifar", pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet-18 with a new ``num_classes`` head.

    ``stem="cifar"``: 3×3 stride-1 conv1 and no max-pool, so 32×32 inputs keep a 4×4 map
    before pooling. ``stem="imagenet"``: torchvision's 7×7 stride-2 conv and max-pool,
    with its ImageNet weights when ``pretrained`` (downloaded by torch.hub on first use).

    References: He et al. 2016, "Deep Residual Learning for Image Recognition".
    """
    if stem not in STEMS:
        raise ValueError(f"model.stem={stem!r}; allowed: {', '.join(map(repr, STEMS))}")
    if pretrained and stem == "cifar":
        raise ValueError(
            "model.pretrained=true needs model.stem=imagenet: the ImageNet weights were trained with that stem"
        )
    if stem == "cifar":
        model = tv_resnet18(weights=None)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        # torchvision's own conv init; the default nn.Conv2d init would differ from the rest of the net.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    else:
        model = _imagenet_resnet18(pretrained)
    model.avgpool = GlobalAveragePool()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _imagenet_resnet18(pretrained: bool) -> nn.Module:
    """torchvision's ResNet-18, turning a failed weight download into an actionable error."""
    if not pretrained:
        return tv_resnet18(weights=None)
    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return tv_resnet18(weights=weights)
    # URLError is an OSError; RuntimeError covers a hash mismatch or an unreadable cached file.
    except (OSError, RuntimeError) as err:
        filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
        raise RuntimeError(
            f"The ImageNet weights of ResNet-18 could not be downloaded or loaded ({err}). "
            f"torch.hub looks for them at {cached} (set TORCH_HOME to move its cache): download "
            f"{weights.url} there, or train from scratch with `model.pretrained=false`."
        ) from err


class Renormalize(nn.Module):
    """Maps inputs standardised with one mean/std (the dataset's) to another (the
    pretrained weights'): x' = (x·s_in + m_in − m_out) / s_out, per channel."""

    # Buffers (register_buffer), declared so that they type as tensors, not Tensor | Module.
    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mean_in: list[float], std_in: list[float], mean_out: list[float], std_out: list[float]) -> None:
        super().__init__()
        m_in, s_in, m_out, s_out = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                    for v in (mean_in, std_in, mean_out, std_out))
        self.register_buffer("scale", s_in / s_out, persistent=False)
        self.register_buffer("shift", (m_in - m_out) / s_out, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def timm_model(name: str, num_classes: int, image_size: int = 224, pretrained: bool = False,
               input_mean: list[float] | None = None, input_std: list[float] | None = None,
               options: dict[str, Any] | None = None) -> nn.Module:
    """Any model of timm (``pip install 'calibrun[timm]'``) with a ``num_classes`` head.

    ``image_size`` reaches the models that fix their input size (ViTs and MLP-Mixers
    resize their position embeddings to it); convolutional ones take any size. With
    ``pretrained`` weights (from the Hugging Face Hub, cached under ``HF_HOME``) and the
    dataset's ``input_mean``/``input_std`` given, the inputs are re-standardised to the
    statistics the weights were trained with. ``options`` go to ``timm.create_model``.

    References: Wightman 2019, "PyTorch Image Models"; Minderer et al. 2021, "Revisiting
    the Calibration of Modern Neural Networks" (ViTs and MLP-Mixers against CNNs).
    """
    try:
        import timm
    except ImportError:
        raise ValueError("model=timm needs timm: pip install 'calibrun[timm]'") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"model.name={name!r} is not a timm model.{hint} python -c \"import timm; "
                         "print(timm.list_models('*vit*'))\" lists them.")
    kwargs = {**(options or {}), "num_classes": num_classes, "pretrained": pretrained}
    try:
        try:
            model = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            model = timm.create_model(name, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise RuntimeError(f"The pretrained weights of {name} could not be downloaded or loaded ({first_line(err)}). "
                           "timm fetches them from the Hugging Face Hub into HF_HOME's cache: run once with "
                           "network, or train from scratch with model.pretrained=false.") from err
    if pretrained and input_mean is not None and input_std is not None:
        # timm's models carry it; nn.Module's stubs type unknown attributes as Tensor | Module.
        weights = cast(dict[str, Any], model.pretrained_cfg)
        model = nn.Sequential(Renormalize(input_mean, input_std, weights["mean"], weights["std"]), model)
    return model
