"""Vision encoder: a ResNet body (torchvision, or a small BasicBlock ResNet) followed by an FPN.

    enc = VisionEncoder("tiny", weights=None, widths=[16, 32, 64, 128], blocks=[1, 1, 1, 1],
                        norm="bn", fpn_channels=64)
    feats = enc(images)          # images (B, 3, H, W), H and W divisible by 32
    feats["4"].shape             # (B, fpn_channels, H/4, W/4); keys "4", "8", "16", "32" (strides)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

BACKBONES = ("resnet101", "resnet50", "resnet34", "resnet18", "tiny")
NORMS = ("bn", "frozen_bn", "gn")
STRIDES = (4, 8, 16, 32)
_TV_WEIGHT_ENUMS = {
    "resnet101": "ResNet101_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet18": "ResNet18_Weights",
}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels each (dividing ``channels``)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """Factory ``channels -> norm module`` for ``norm`` in bn | frozen_bn | gn."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "gn":
        return group_norm
    raise ValueError(f"vision.norm must be one of {', '.join(NORMS)}, got {norm!r}.")


def _is_weights_file(weights: str) -> bool:
    return weights.endswith((".pt", ".pth"))


def check_weights(backbone: str, weights: str | None) -> None:
    """Validate the *form* of ``vision.weights`` (without loading anything); ValueError if bad."""
    if weights is None or _is_weights_file(weights):
        return
    if backbone == "tiny":
        raise ValueError(
            f"vision.weights={weights!r} is not usable with backbone 'tiny': pass a local .pt/.pth "
            "state-dict file or null."
        )
    enum_name = _TV_WEIGHT_ENUMS[backbone]
    try:
        torchvision.models.get_weight(f"{enum_name}.{weights}")
    except (ValueError, KeyError, AttributeError):
        valid = ", ".join(w.name for w in torchvision.models.get_model_weights(backbone))
        raise ValueError(
            f"vision.weights={weights!r} is neither a torchvision weights name for {backbone} "
            f"({valid}) nor a .pt/.pth state-dict file; fix it or set it to null."
        ) from None


class TinyResNet(nn.Module):
    """A small ResNet of torchvision BasicBlocks: stem (stride 4) + 4 stages (strides 4, 8, 16, 32).

    The stem is two stride-2 3x3 convs of ``widths[0]`` channels each (instead of ResNet's 7x7 conv +
    max-pool). Its stride-2 half is also the decoder's ``stem_skip`` input.

    Exposes ``stem`` and ``layer1..layer4``; torchvision ResNets use conv1/bn1/relu/maxpool instead of ``stem``.
    """

    def __init__(self, widths: list[int], blocks: list[int], norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"vision.widths and vision.blocks need 4 entries each, got {widths} and {blocks}.")
        c = self.stem_channels = widths[0]
        self.stem = nn.Sequential(  # [:3] -> stride 2, [3:] -> stride 4 (see stem_halves)
            nn.Conv2d(3, c, kernel_size=3, stride=2, padding=1, bias=False), norm(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, kernel_size=3, stride=2, padding=1, bias=False), norm(c), nn.ReLU(inplace=True),
        )
        inplanes = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or inplanes != width):
                    down = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), norm(width))
                layers.append(BasicBlock(inplanes, width, stride if j == 0 else 1, down, norm_layer=norm))
                inplanes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem_halves(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, H, W) -> the stem's stride-2 map (B, C0, H/2, W/2) and its output (B, C0, H/4, W/4)."""
        half = self.stem[:3](image)
        return half, self.stem[3:](half)


def _load_weights_file(body: nn.Module, path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"vision.weights file '{path}' does not exist; pass an existing .pt/.pth state dict.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file: one clear sentence
        raise ValueError(f"vision.weights file '{path}' could not be read as a state dict ({type(e).__name__}).") from None
    if not isinstance(state, dict):
        raise ValueError(f"vision.weights file '{path}' does not hold a state dict (a mapping of tensors).")  # noqa: TRY004
    for key in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    _load_body_state(body, state, str(file))


def _load_body_state(body: nn.Module, state: dict, source: str) -> None:
    if any(isinstance(m, nn.GroupNorm) for m in body.modules()):  # GN has no running statistics
        state = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier: unused
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"vision weights from {source} do not match the backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}) and {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )


def build_body(backbone: str, weights: str | None, pretrained: bool, widths: list[int],
               blocks: list[int], norm: str) -> tuple[nn.Module, list[int]]:
    """Return (ResNet body without avgpool/fc, channels of layer1..layer4)."""
    if backbone not in BACKBONES:
        raise ValueError(f"vision.backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}.")
    check_weights(backbone, weights)
    norm_fn = norm_layer(norm)
    if backbone == "tiny":
        body: nn.Module = TinyResNet(widths, blocks, norm_fn)
        channels = list(widths)
    else:
        body = getattr(torchvision.models, backbone)(weights=None, norm_layer=norm_fn)
        del body.fc, body.avgpool  # classification head: unused
        expansion = 4 if backbone in ("resnet101", "resnet50") else 1
        channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
    if pretrained and weights is not None:
        if _is_weights_file(weights):
            _load_weights_file(body, weights)
        else:
            w = torchvision.models.get_weight(f"{_TV_WEIGHT_ENUMS[backbone]}.{weights}")
            try:
                state = w.get_state_dict(progress=False)
            except OSError as e:  # offline: URLError is an OSError
                raise ValueError(
                    f"could not fetch torchvision weights {w} ({type(e).__name__}); put the file in "
                    "$TORCH_HOME/hub/checkpoints, pass a local .pt/.pth state dict, or set vision.weights=null."
                ) from None
            _load_body_state(body, state, f"torchvision {w}")
    return body, channels


class StageFiLM(nn.Module):
    """Feature-wise modulation of one backbone stage by the sentence: x * (1 + gamma) + beta.

    forward: x (B, C, h, w), sentence (B, D) -> (B, C, h, w). ``zero_init`` starts as the identity
    (keeps a pretrained backbone's features intact at step 0)."""

    def __init__(self, channels: int, sent_dim: int, zero_init: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(sent_dim, 2 * channels)
        if zero_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(sentence)[:, :, None, None].to(x.dtype).chunk(2, dim=1)
        return x * (1 + gamma) + beta


class VisionEncoder(nn.Module):
    """ResNet body + torchvision FPN, optionally language-aware (``language_dim``: LAVT's idea of
    fusing language inside the visual encoder, here as a FiLM of every stage by the sentence).

    forward: image (B, 3, H, W)[, sentence (B, language_dim)]
      -> {4: (B, C, H/4, W/4), 8: ..., 16: ..., 32: (B, C, H/32, W/32)} with C = ``fpn_channels``.
    ``self.body`` holds the (possibly pretrained) ResNet parameters.
    """

    def __init__(self, backbone: str = "resnet101", weights: str | None = None, pretrained: bool = True,
                 widths: list[int] | None = None, blocks: list[int] | None = None, norm: str = "frozen_bn",
                 fpn_channels: int = 256, language_dim: int | None = None) -> None:
        super().__init__()
        self.body, self.channels = build_body(
            backbone, weights, pretrained, list(widths or [64, 128, 256, 512]), list(blocks or [1, 1, 1, 1]), norm
        )
        self.fpn = FeaturePyramidNetwork(self.channels, fpn_channels)
        self.out_channels = fpn_channels
        self.film = None
        if language_dim:
            self.film = nn.ModuleList(StageFiLM(c, language_dim, zero_init=weights is not None) for c in self.channels)

    @property
    def stem_channels(self) -> int:
        """Channels of the stride-2 stem activations (``forward(..., stem=True)["2"]``)."""
        b = self.body
        return b.stem_channels if isinstance(b, TinyResNet) else b.conv1.out_channels

    def forward(self, image: torch.Tensor, sentence: torch.Tensor | None = None,
                stem: bool = False) -> dict[str, torch.Tensor]:
        """image (B,3,H,W)[, sentence (B,D)] -> {"4": (B,C,H/4,W/4), "8": ..., "16": ..., "32": ...}
        (+ ``stem``: "2": the stem's stride-2 activations (B, stem_channels, H/2, W/2)).

        Keys are strings: DeepSpeed ZeRO-3's forward hooks walk module outputs and need str keys."""
        if self.film is not None and sentence is None:
            raise ValueError("this vision encoder is language-aware (fusion.early=true): pass the sentence feature.")
        b = self.body
        if isinstance(b, TinyResNet):
            half, x = b.stem_halves(image)  # (B, C0, H/2, W/2), (B, C0, H/4, W/4)
        else:
            half = b.relu(b.bn1(b.conv1(image)))  # (B, 64, H/2, W/2)
            x = b.maxpool(half)  # (B, C0, H/4, W/4)
        feats = OrderedDict()
        for i, (stride, layer) in enumerate(zip(STRIDES, (b.layer1, b.layer2, b.layer3, b.layer4))):
            x = layer(x)
            if self.film is not None:
                x = self.film[i](x, sentence)
            feats[str(stride)] = x
        out = dict(self.fpn(feats))
        if stem:
            out["2"] = half
        return out
