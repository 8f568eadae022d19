"""Pure-PyTorch reference MobileNetV2 and MobileNeXt definitions used as test fixtures.

The three model families below reproduce, key for key and shape for shape, the
``state_dict`` layouts of three real PyTorch code bases (the layouts are stored in
``tests/fixtures/layouts/*.json``):

* :class:`OfficialMBV2CA` -- the authors' MobileNetV2 + Coordinate Attention
  (``houqb/CoordAttention``, ``mbv2_ca.py``, class ``MBV2_CA``).
* :class:`TorchvisionMobileNetV2` -- ``torchvision.models.mobilenet_v2``.
* :class:`TimmMobileNetV2` -- timm's ``mobilenetv2_*`` family (EfficientNet builder),
  built by name with :func:`timm_mobilenetv2`.
* :class:`OfficialMobileNeXt` -- the authors' MobileNeXt
  (``zhoudaquan/rethinking_bottleneck_design``, ``mnext.py``), whose maps are ``stem`` and
  ``stage0`` ... ``stage7`` (``MNEXT_FEATURE_NAMES``; no head conv, ``stage7`` is pooled).

Neither torchvision nor timm is importable next to the pinned torch, so the modules
are re-implemented here with plain ``nn.Sequential`` / ``nn.Module`` containers whose
attribute names and registration order yield exactly the original keys.

Every MobileNetV2 model exposes

* ``forward(x) -> logits`` (NCHW input), and
* ``forward_features(x) -> dict`` with the maps ``stem``, ``stage0`` ... ``stage6``
  (output of the last block of each of the seven MobileNetV2 stages) and ``head``
  (output of the final 1x1 conv + BN + ReLU6, before pooling).

:func:`randomize_` fills all weights and BatchNorm statistics with well-scaled random
values, so that comparisons against another implementation exercise every parameter.

Only ``torch`` is imported; no other third-party package is needed.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MBV2_STAGES",
    "FEATURE_NAMES",
    "FEATURE_STRIDES",
    "LAYOUT_NAMES",
    "make_divisible",
    "HSwish",
    "CoordAtt",
    "OfficialInvertedResidual",
    "OfficialMBV2CA",
    "TorchvisionInvertedResidual",
    "TorchvisionMobileNetV2",
    "TimmDepthwiseSeparable",
    "TimmInvertedResidual",
    "TimmMobileNetV2",
    "TIMM_MOBILENETV2_CONFIGS",
    "timm_mobilenetv2",
    "MNEXT_STAGES",
    "MNEXT_FEATURE_NAMES",
    "MNEXT_FEATURE_STRIDES",
    "MNEXT_LAYOUT_NAMES",
    "OfficialSGBlock",
    "OfficialMobileNeXt",
    "randomize_",
    "build_from_layout_name",
]

# MobileNetV2 stage table: (expansion t, channels c, repeats n, first stride s).
MBV2_STAGES: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# Names of the maps returned by ``forward_features`` and their output strides.
FEATURE_NAMES: Tuple[str, ...] = ("stem",) + tuple(f"stage{i}" for i in range(7)) + ("head",)
FEATURE_STRIDES: Dict[str, int] = {
    "stem": 2,
    "stage0": 2,
    "stage1": 4,
    "stage2": 8,
    "stage3": 16,
    "stage4": 16,
    "stage5": 32,
    "stage6": 32,
    "head": 32,
}

# Stems of the fixture files in tests/fixtures/layouts/ (one model each).
LAYOUT_NAMES: Tuple[str, ...] = (
    "official_mbv2_ca_w0.5",
    "official_mbv2_ca_w1.0",
    "torchvision_mobilenet_v2_w0.5",
    "torchvision_mobilenet_v2_w1.0",
    "timm_mobilenetv2_050",
    "timm_mobilenetv2_100",
    "timm_mobilenetv2_140",
    "timm_mobilenetv2_110d",
    "timm_mobilenetv2_120d",
)


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (the usual MobileNet rule).

    The result is never below ``min_value`` (default: ``divisor``) and never more than
    10% below ``v``; in that case one more ``divisor`` is added.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(inp: int, oup: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``Sequential(Conv2d(bias=False), BatchNorm2d, ReLU6)`` with symmetric padding.

    Keys ``0.weight`` and ``1.{weight,bias,running_mean,running_var,num_batches_tracked}``;
    this is the layout of the official ``conv_3x3_bn``/``conv_1x1_bn`` helpers and of
    torchvision's ``Conv2dNormActivation``.
    """
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=False),
    )


def _authors_init_(model: nn.Module) -> None:
    """The init of the authors' MBV2_CA and MobileNeXt code: convs N(0, sqrt(2 / (k*k*out))),
    BatchNorm weight 1 bias 0, Linear N(0, 0.01) bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


def _stage_end_indices(repeats: Sequence[int]) -> List[int]:
    """Index (0-based, counting blocks only) of the last block of every stage."""
    ends, total = [], 0
    for n in repeats:
        total += n
        ends.append(total - 1)
    return ends


# ---------------------------------------------------------------------------------
# Official MobileNetV2 + Coordinate Attention (houqb/CoordAttention, mbv2_ca.py)
# ---------------------------------------------------------------------------------


class HSwish(nn.Module):
    """Hard swish: ``x * relu6(x + 3) / 6``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class CoordAtt(nn.Module):
    """Coordinate Attention block, parameter names as in the authors' ``mbv2_ca.py``.

    The input is average-pooled over W (giving an H-profile) and over H (giving a
    W-profile); both profiles are concatenated along the spatial axis, passed through a
    shared ``conv1`` (1x1, with bias) + ``bn1`` + h_swish, split again, and turned into
    per-row (``conv2``) and per-column (``conv3``) sigmoid gates that multiply the input.

    Args:
        inp: input channels.
        oup: output channels of the gates (equal to ``inp`` in MobileNetV2).
        groups: reduction ratio; ``mip = max(8, inp // groups)``.
    """

    def __init__(self, inp: int, oup: int, groups: int = 32):
        super().__init__()
        self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
        self.pool_w = nn.AdaptiveAvgPool2d((1, None))
        mip = max(8, inp // groups)
        self.conv1 = nn.Conv2d(inp, mip, kernel_size=1, stride=1, padding=0)
        self.bn1 = nn.BatchNorm2d(mip)
        self.conv2 = nn.Conv2d(mip, oup, kernel_size=1, stride=1, padding=0)
        self.conv3 = nn.Conv2d(mip, oup, kernel_size=1, stride=1, padding=0)
        self.relu = HSwish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        _, _, h, w = x.shape
        x_h = self.pool_h(x)  # N x C x H x 1
        x_w = self.pool_w(x).permute(0, 1, 3, 2)  # N x C x W x 1
        y = torch.cat([x_h, x_w], dim=2)  # N x C x (H+W) x 1
        y = self.relu(self.bn1(self.conv1(y)))
        x_h, x_w = torch.split(y, [h, w], dim=2)
        x_w = x_w.permute(0, 1, 3, 2)  # N x mip x 1 x W
        a_h = self.conv2(x_h).sigmoid()
        a_w = self.conv3(x_w).sigmoid()
        return identity * a_w * a_h


class OfficialInvertedResidual(nn.Module):
    """Inverted residual of the official MobileNetV2+CA (CA after the depthwise conv).

    ``conv`` indices: for ``expand_ratio == 1``: 0 dw3x3, 1 BN, 2 ReLU6, 3 pw1x1, 4 BN.
    Otherwise: 0 pw1x1, 1 BN, 2 ReLU6, 3 dw3x3, 4 BN, 5 ReLU6, 6 CoordAtt, 7 pw1x1, 8 BN.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        hidden_dim = round(inp * expand_ratio)
        self.identity = stride == 1 and inp == oup
        if expand_ratio == 1:
            self.conv = nn.Sequential(
                # depthwise
                nn.Conv2d(hidden_dim, hidden_dim, 3, stride, 1, groups=hidden_dim, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU6(inplace=False),
                # pointwise, linear
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            )
        else:
            self.conv = nn.Sequential(
                # pointwise expansion
                nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU6(inplace=False),
                # depthwise
                nn.Conv2d(hidden_dim, hidden_dim, 3, stride, 1, groups=hidden_dim, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU6(inplace=False),
                # coordinate attention
                CoordAtt(hidden_dim, hidden_dim),
                # pointwise, linear
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.identity else out


class OfficialMBV2CA(nn.Module):
    """The authors' MobileNetV2 + Coordinate Attention (``MBV2_CA``).

    Layout: ``features.0`` stem (conv3x3 s2, BN, ReLU6), ``features.1..17`` inverted
    residuals, top-level ``conv`` head (conv1x1, BN, ReLU6), ``avgpool`` and
    ``classifier = Sequential(Dropout(0.1), Linear)``.

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier (channels rounded to multiples of 8, of 4 at 0.1).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        divisor = 4 if width_mult == 0.1 else 8
        input_channel = make_divisible(32 * width_mult, divisor)
        layers: List[nn.Module] = [_conv_bn_relu6(3, input_channel, 3, stride=2)]
        repeats = []
        for t, c, n, s in MBV2_STAGES:
            output_channel = make_divisible(c * width_mult, divisor)
            for i in range(n):
                layers.append(OfficialInvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
            repeats.append(n)
        self.features = nn.Sequential(*layers)
        output_channel = make_divisible(1280 * width_mult, divisor) if width_mult > 1.0 else 1280
        self.conv = _conv_bn_relu6(input_channel, output_channel, 1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(output_channel, num_classes))
        self.num_features = output_channel
        # Index into ``features`` of the last block of each stage (+1 skips the stem).
        self._stage_ends = [i + 1 for i in _stage_end_indices(repeats)]
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """The authors' init: He-normal on fan-out (k*k*out), BN 1/0, Linear N(0, 0.01)."""
        _authors_init_(self)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return the stem, per-stage and head feature maps (see module docstring)."""
        feats: Dict[str, torch.Tensor] = {}
        x = self.features[0](x)
        feats["stem"] = x
        stage = 0
        for idx in range(1, len(self.features)):
            x = self.features[idx](x)
            if idx == self._stage_ends[stage]:
                feats[f"stage{stage}"] = x
                stage += 1
        feats["head"] = self.conv(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["head"]
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------
# torchvision.models.mobilenet_v2
# ---------------------------------------------------------------------------------


class TorchvisionInvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``.

    ``conv`` indices: for ``expand_ratio == 1``: 0 dw Conv2dNormActivation (0 conv, 1 BN),
    1 pw conv, 2 BN. Otherwise: 0 expand Conv2dNormActivation, 1 dw Conv2dNormActivation,
    2 pw conv, 3 BN.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden_dim, 1))
        layers.extend(
            [
                _conv_bn_relu6(hidden_dim, hidden_dim, 3, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class TorchvisionMobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2`` (``features.0`` stem ... ``features.18`` head conv).

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier (channels rounded to multiples of 8).
        dropout: dropout probability before the classifier (``classifier.0``).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        round_nearest = 8
        input_channel = make_divisible(32 * width_mult, round_nearest)
        last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [_conv_bn_relu6(3, input_channel, 3, stride=2)]
        repeats = []
        for t, c, n, s in MBV2_STAGES:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(TorchvisionInvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
            repeats.append(n)
        features.append(_conv_bn_relu6(input_channel, last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))
        self.last_channel = last_channel
        self._stage_ends = [i + 1 for i in _stage_end_indices(repeats)]
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """torchvision's init: Kaiming-normal (fan_out) convs, BN 1/0, Linear N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return the stem, per-stage and head feature maps (see module docstring)."""
        feats: Dict[str, torch.Tensor] = {}
        x = self.features[0](x)
        feats["stem"] = x
        stage = 0
        last = len(self.features) - 1  # index of the head conv
        for idx in range(1, last):
            x = self.features[idx](x)
            if idx == self._stage_ends[stage]:
                feats[f"stage{stage}"] = x
                stage += 1
        feats["head"] = self.features[last](x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["head"]
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------
# timm mobilenetv2_* (EfficientNet builder, ReLU6, symmetric padding, BN eps 1e-5)
# ---------------------------------------------------------------------------------


class TimmDepthwiseSeparable(nn.Module):
    """timm's ``DepthwiseSeparableConv``: conv_dw, bn1 (+ReLU6), conv_pw, bn2 (linear)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = F.relu6(self.bn1(self.conv_dw(x)))
        x = self.bn2(self.conv_pw(x))
        return x + shortcut if self.has_skip else x


class TimmInvertedResidual(nn.Module):
    """timm's ``InvertedResidual``: conv_pw, bn1 (+ReLU6), conv_dw, bn2 (+ReLU6),
    conv_pwl, bn3 (linear); ``mid = make_divisible(in_chs * exp_ratio)``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, exp_ratio: float = 6.0):
        super().__init__()
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, 3, stride, 1, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = F.relu6(self.bn1(self.conv_pw(x)))
        x = F.relu6(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut if self.has_skip else x


class TimmMobileNetV2(nn.Module):
    """timm's MobileNetV2 (``_gen_mobilenet_v2``) with its state_dict layout.

    Layout: ``conv_stem``, ``bn1``, ``blocks.{stage}.{block}`` (stage 0 depthwise
    separable, the others inverted residuals), ``conv_head``, ``bn2``, ``classifier``.

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier (timm's ``channel_multiplier``).
        depth_mult: stage-repeat multiplier; repeats become ``ceil(n * depth_mult)``.
        fix_stem_head: keep stem 32 / head 1280 and the first and last stages' repeats
            unscaled (used by the ``*d`` variants).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        fix_stem_head: bool = False,
    ):
        super().__init__()

        def round_chs(c: float) -> int:
            return make_divisible(c * width_mult)

        stem_size = 32 if fix_stem_head else round_chs(32)
        num_features = 1280 if fix_stem_head else max(1280, round_chs(1280))

        self.conv_stem = nn.Conv2d(3, stem_size, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_size)

        stages: List[nn.Module] = []
        in_chs = stem_size
        last_stage = len(MBV2_STAGES) - 1
        for stage_idx, (t, c, n, s) in enumerate(MBV2_STAGES):
            if fix_stem_head and stage_idx in (0, last_stage):
                repeats = n
            else:
                repeats = int(math.ceil(n * depth_mult))
            out_chs = round_chs(c)
            blocks: List[nn.Module] = []
            for i in range(repeats):
                stride = s if i == 0 else 1
                if stage_idx == 0:
                    blocks.append(TimmDepthwiseSeparable(in_chs, out_chs, stride))
                else:
                    blocks.append(TimmInvertedResidual(in_chs, out_chs, stride, exp_ratio=t))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)

        self.conv_head = nn.Conv2d(in_chs, num_features, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(num_features)
        self.classifier = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """timm's ``_init_weight_goog``: He-normal on fan-out/groups, BN 1/0,
        Linear uniform(+-1/sqrt(out_features))."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.weight.size(0))
                m.weight.data.uniform_(-init_range, init_range)
                m.bias.data.zero_()

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return the stem, per-stage and head feature maps (see module docstring)."""
        feats: Dict[str, torch.Tensor] = {}
        x = F.relu6(self.bn1(self.conv_stem(x)))
        feats["stem"] = x
        for stage_idx, stage in enumerate(self.blocks):
            x = stage(x)
            feats[f"stage{stage_idx}"] = x
        feats["head"] = F.relu6(self.bn2(self.conv_head(x)))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["head"]
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


# timm model name -> TimmMobileNetV2 keyword arguments.
TIMM_MOBILENETV2_CONFIGS: Dict[str, Dict[str, object]] = {
    "mobilenetv2_050": dict(width_mult=0.5),
    "mobilenetv2_100": dict(width_mult=1.0),
    "mobilenetv2_140": dict(width_mult=1.4),
    "mobilenetv2_110d": dict(width_mult=1.1, depth_mult=1.2, fix_stem_head=True),
    "mobilenetv2_120d": dict(width_mult=1.2, depth_mult=1.4, fix_stem_head=True),
}


def timm_mobilenetv2(name: str, num_classes: int = 1000) -> TimmMobileNetV2:
    """Build a timm MobileNetV2 variant by its timm name (``'mobilenetv2_050'`` etc.).

    A leading ``'timm_'`` (as in the fixture file names) is accepted too.
    """
    key = name[len("timm_"):] if name.startswith("timm_") else name
    if key not in TIMM_MOBILENETV2_CONFIGS:
        raise ValueError(f"unknown timm MobileNetV2 variant {name!r}; known: {sorted(TIMM_MOBILENETV2_CONFIGS)}")
    return TimmMobileNetV2(num_classes=num_classes, **TIMM_MOBILENETV2_CONFIGS[key])


# ---------------------------------------------------------------------------------
# Official MobileNeXt (zhoudaquan/rethinking_bottleneck_design, mobilenext/codebase/
# models/mnext.py): SGBlock and MobileNeXt
# ---------------------------------------------------------------------------------

# (t, c, n, s) of the eight stages, as the official ``cfgs``.
MNEXT_STAGES: Tuple[Tuple[int, int, int, int], ...] = (
    (2, 96, 1, 2),
    (6, 144, 1, 1),
    (6, 192, 3, 2),
    (6, 288, 3, 2),
    (6, 384, 4, 1),
    (6, 576, 4, 2),
    (6, 960, 3, 1),
    (6, 1280, 1, 1),
)
MNEXT_FEATURE_NAMES: Tuple[str, ...] = ("stem",) + tuple(f"stage{i}" for i in range(8))
MNEXT_FEATURE_STRIDES: Dict[str, int] = {
    "stem": 2, "stage0": 4, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 16, "stage5": 32, "stage6": 32,
    "stage7": 32,
}
MNEXT_LAYOUT_NAMES: Tuple[str, ...] = ("official_mnext_w0.5", "official_mnext_w1.0")


def _dw(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def _pw(inp: int, oup: int) -> nn.Conv2d:
    return nn.Conv2d(inp, oup, 1, 1, 0, bias=False)


class OfficialSGBlock(nn.Module):
    """The official ``SGBlock(inp, oup, stride, expand_ratio, keep_3x3)``.

    ``conv`` indices. ``expand_ratio == 2`` and the last case: 0 dw, 1 BN, 2 ReLU6,
    3 pw, 4 BN, 5 pw, 6 BN, 7 ReLU6, 8 dw, 9 BN. ``inp != oup``, stride 1, not keep_3x3:
    0 pw, 1 BN, 2 pw, 3 BN, 4 ReLU6. ``inp != oup``, stride 2: the same, 5 dw (s2), 6 BN.
    The shortcut (last case without keep_3x3) adds x to the first ``C // identity_div``
    output channels.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, keep_3x3: bool = False,
                 identity_div: int = 1, coord_att: bool = False):
        super().__init__()
        assert stride in (1, 2)
        hidden_dim = inp // expand_ratio
        if hidden_dim < oup / 6.0:
            hidden_dim = make_divisible(math.ceil(oup / 6.0), 16)
        self.identity = False
        self.identity_div = identity_div
        self.expand_ratio = expand_ratio
        if expand_ratio == 2:
            self.conv = nn.Sequential(
                _dw(inp, 1), nn.BatchNorm2d(inp), nn.ReLU6(inplace=False),
                _pw(inp, hidden_dim), nn.BatchNorm2d(hidden_dim),
                _pw(hidden_dim, oup), nn.BatchNorm2d(oup), nn.ReLU6(inplace=False),
                _dw(oup, stride), nn.BatchNorm2d(oup),
            )
        elif inp != oup and stride == 1 and not keep_3x3:
            self.conv = nn.Sequential(
                _pw(inp, hidden_dim), nn.BatchNorm2d(hidden_dim),
                _pw(hidden_dim, oup), nn.BatchNorm2d(oup), nn.ReLU6(inplace=False),
            )
        elif inp != oup and stride == 2 and not keep_3x3:
            self.conv = nn.Sequential(
                _pw(inp, hidden_dim), nn.BatchNorm2d(hidden_dim),
                _pw(hidden_dim, oup), nn.BatchNorm2d(oup), nn.ReLU6(inplace=False),
                _dw(oup, stride), nn.BatchNorm2d(oup),
            )
        else:
            self.identity = not keep_3x3
            # coord_att: CA after the first depthwise conv's BN + ReLU6 (the authors' stated
            # placement; MobileNeXt+CA was never released), shifting later indices by one.
            attention = [CoordAtt(inp, inp)] if coord_att else []
            self.conv = nn.Sequential(
                _dw(inp, 1), nn.BatchNorm2d(inp), nn.ReLU6(inplace=False), *attention,
                _pw(inp, hidden_dim), nn.BatchNorm2d(hidden_dim),
                _pw(hidden_dim, oup), nn.BatchNorm2d(oup), nn.ReLU6(inplace=False),
                _dw(oup, 1), nn.BatchNorm2d(oup),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.identity:
            k = x.shape[1] // self.identity_div
            out[:, :k] += x[:, :k]  # in place, as the official forward (the BN output is not saved)
        return out


class OfficialMobileNeXt(nn.Module):
    """The official ``MobileNeXt``: ``features.0`` stem (conv3x3 s2, BN, ReLU6),
    ``features.1..20`` sandglass blocks, ``avgpool``, ``classifier = Sequential(Dropout(0.2),
    Linear(1280, num_classes))``; no 1x1 head conv.

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier (multiples of 8, of 4 at 0.1; 1280 kept below 1).
        identity_div: the shortcut covers the first ``C // identity_div`` channels.
        stage_repeats: blocks per stage (the official ``n`` column by default; the
            stage's ``keep_3x3`` stays the table's, as in ca-flax).
        coord_att: MobileNeXt+CA as ca-flax's ``mobilenext_ca`` builds it (CA after the
            first depthwise conv of every block that has one, the first block excepted);
            not an official model: the benchmarks' PyTorch side of that comparison.
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, identity_div: int = 1,
                 stage_repeats: Optional[Sequence[int]] = None, coord_att: bool = False):
        super().__init__()
        divisor = 4 if width_mult == 0.1 else 8
        input_channel = make_divisible(32 * width_mult, divisor)
        layers: List[nn.Module] = [_conv_bn_relu6(3, input_channel, 3, stride=2)]
        repeats = list(stage_repeats or [n for _, _, n, _ in MNEXT_STAGES])
        for (t, c, n, s), count in zip(MNEXT_STAGES, repeats):
            output_channel = make_divisible(c * width_mult, divisor)
            if c == 1280 and width_mult < 1:
                output_channel = 1280
            attend = coord_att and t != 2
            layers.append(OfficialSGBlock(input_channel, output_channel, s, t, n == 1 and s == 1, identity_div, attend))
            input_channel = output_channel
            for _ in range(count - 1):
                layers.append(OfficialSGBlock(input_channel, output_channel, 1, t, False, identity_div, attend))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(input_channel, num_classes))
        self._stage_ends = [i + 1 for i in _stage_end_indices(repeats)]
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """The official init: N(0, sqrt(2 / (k*k*out))) convs, BN 1/0, Linear N(0, 0.01)."""
        _authors_init_(self)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The stem and each stage's last block (``MNEXT_FEATURE_NAMES``)."""
        feats: Dict[str, torch.Tensor] = {"stem": self.features[0](x)}
        x, stage = feats["stem"], 0
        for idx in range(1, len(self.features)):
            x = self.features[idx](x)
            if idx == self._stage_ends[stage]:
                feats[f"stage{stage}"] = x
                stage += 1
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["stage7"]
        return self.classifier(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------
# Random weights and lookup by fixture name
# ---------------------------------------------------------------------------------


def _calibration_batch(gen: torch.Generator, batch: int = 8, size: int = 64) -> torch.Tensor:
    """A batch of image-like inputs: smooth random patterns of varying scale plus noise."""
    coarse = torch.randn(batch, 3, 4, 4, generator=gen)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    scale = 0.5 + 1.5 * torch.rand(batch, 1, 1, 1, generator=gen)
    return scale * smooth + 0.5 * torch.randn(batch, 3, size, size, generator=gen)


@torch.no_grad()
def _calibrate_batchnorm_(model: nn.Module, inputs: torch.Tensor) -> None:
    """Set every BatchNorm's running stats to the batch statistics of one forward pass.

    Runs ``model(inputs)`` in training mode with cumulative averaging (``momentum=None``)
    after resetting the statistics; modes, momenta and ``num_batches_tracked`` are
    restored afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved_modes = {m: m.training for m in model.modules()}
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone()) for bn in bns if bn.track_running_stats]
    for bn, _, _ in saved:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        model(inputs)
    finally:
        for m, mode in saved_modes.items():
            m.training = mode
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def randomize_(
    model: nn.Module,
    seed: int = 0,
    calibrate: Optional[bool] = None,
    calibration_input: Optional[torch.Tensor] = None,
) -> nn.Module:
    """Fill every float parameter and all BatchNorm statistics with random values, in place.

    Scales keep activations O(1) so that comparisons between implementations are
    meaningful:

    * conv / linear weights: ``N(0, 1) / sqrt(fan_in)`` (fan_in = in/groups * kh * kw);
      biases ``0.1 * N(0, 1)``; any other float parameter ``0.1 * N(0, 1)``;
    * BatchNorm: weight ``U(0.5, 1.5)``, bias ``0.1 * N(0, 1)``.
    * BatchNorm statistics: without calibration, running_mean ``0.1 * N(0, 1)`` and
      running_var ``U(0.5, 2.0)``. With calibration, the statistics are first set to
      the batch statistics of one training-mode pass over ``calibration_input`` and then
      perturbed (mean ``+= 0.2 * std * N(0, 1)``, var ``*= U(0.5, 2.0)``). Purely
      random statistics do not match the real activation statistics, so in a deep
      network the input-dependent part of the signal fades (the logits become nearly
      constant); calibration keeps every layer input-dependent while still using
      non-trivial, random statistics.

    ``calibrate`` defaults to True for the full models (anything with
    ``forward_features``), using a batch of 8 random 3x64x64 images unless
    ``calibration_input`` is given; other modules are calibrated only when
    ``calibration_input`` is passed. ``num_batches_tracked`` is left unchanged and the
    module's train/eval mode is preserved.

    Deterministic for a given ``seed`` (a private ``torch.Generator`` is used, so the
    global RNG is not disturbed). Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, scale: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) * scale)

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        u = torch.rand(t.shape, generator=gen, dtype=torch.float64)
        t.copy_((low + (high - low) * u).to(t.dtype))

    done = set()
    bns = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            normal(module.weight, 1.0 / math.sqrt(fan_in))
            done.add(id(module.weight))
            if module.bias is not None:
                normal(module.bias, 0.1)
                done.add(id(module.bias))
        elif isinstance(module, nn.Linear):
            normal(module.weight, 1.0 / math.sqrt(module.in_features))
            done.add(id(module.weight))
            if module.bias is not None:
                normal(module.bias, 0.1)
                done.add(id(module.bias))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            bns.append(module)
            if module.weight is not None:
                uniform(module.weight, 0.5, 1.5)
                done.add(id(module.weight))
            if module.bias is not None:
                normal(module.bias, 0.1)
                done.add(id(module.bias))
            if module.running_mean is not None:
                normal(module.running_mean, 0.1)
            if module.running_var is not None:
                uniform(module.running_var, 0.5, 2.0)
    for param in model.parameters():
        if id(param) not in done and param.is_floating_point():
            normal(param, 0.1)

    if calibrate is None:
        calibrate = calibration_input is not None or hasattr(model, "forward_features")
    if calibrate and bns:
        if calibration_input is None:
            calibration_input = _calibration_batch(gen)
        _calibrate_batchnorm_(model, calibration_input)
        for bn in bns:
            if bn.running_mean is None or bn.running_var is None:
                continue
            shift = torch.empty_like(bn.running_mean)
            normal(shift, 0.2)
            bn.running_mean.add_(shift * bn.running_var.clamp_min(0).sqrt())
            factor = torch.empty_like(bn.running_var)
            uniform(factor, 0.5, 2.0)
            # clamp guards channels that were constant over the calibration batch
            bn.running_var.clamp_min_(1e-3).mul_(factor)
    return model


def build_from_layout_name(name: str, num_classes: int = 1000) -> nn.Module:
    """Build the reference model matching a fixture file stem.

    Accepted forms: ``'official_mbv2_ca_w<width>'``, ``'torchvision_mobilenet_v2_w<width>'``,
    ``'timm_mobilenetv2_<variant>'`` and ``'official_mnext_w<width>'`` (e.g. ``'official_mbv2_ca_w0.5'``,
    ``'torchvision_mobilenet_v2_w1.0'``, ``'timm_mobilenetv2_120d'``). The model is
    returned with its library's default init, in training mode.
    """
    official, tv, mnext = "official_mbv2_ca_w", "torchvision_mobilenet_v2_w", "official_mnext_w"
    if name.startswith(mnext):
        return OfficialMobileNeXt(num_classes=num_classes, width_mult=float(name[len(mnext):]))
    if name.startswith(official):
        return OfficialMBV2CA(num_classes=num_classes, width_mult=float(name[len(official):]))
    if name.startswith(tv):
        return TorchvisionMobileNetV2(num_classes=num_classes, width_mult=float(name[len(tv):]))
    if name.startswith("timm_mobilenetv2_"):
        return timm_mobilenetv2(name, num_classes=num_classes)
    raise ValueError(f"unknown layout name {name!r}; known: {list(LAYOUT_NAMES + MNEXT_LAYOUT_NAMES)}")
