"""Networks and the registry of named variants.

>>> from ca_flax.models import create_model, list_models
>>> model = create_model('mobilenetv2_ca', width_mult=0.5, num_classes=10)
"""

from ca_flax.models.mobilenetv2 import STAGES, InvertedResidual, MobileNetV2, make_divisible
from ca_flax.models.backbone import Backbone, FeatureInfo
from ca_flax.models.mobilenext import MobileNeXt, SandglassBlock
from ca_flax.models.registry import create_model, describe_model, list_models, model_defaults, register_model

# The paper's four networks (Table 4 of the CA paper): same backbone, the attention differs.
register_model("mobilenetv2", MobileNetV2, "MobileNetV2, the paper's baseline (3.50M params at width 1.0)")
register_model("mobilenetv2_se", MobileNetV2, "MobileNetV2 + SE (reduction 24), the paper's baseline", attention="se")
register_model("mobilenetv2_cbam", MobileNetV2, "MobileNetV2 + CBAM (reduction 24, 7x7 spatial conv)", attention="cbam")
register_model("mobilenetv2_ca", MobileNetV2, "MobileNetV2 + Coordinate Attention (reduction 32), as released", attention="ca")
# timm's MobileNetV2 family, so their checkpoints have a home (110d/120d deepen the stages
# and keep stem 32 and head 1280; 140 widens stem and head with the rest).
register_model("mobilenetv2_050", MobileNetV2, "timm mobilenetv2_050: width 0.5", width_mult=0.5)
register_model("mobilenetv2_100", MobileNetV2, "timm mobilenetv2_100: width 1.0", width_mult=1.0)
register_model("mobilenetv2_140", MobileNetV2, "timm mobilenetv2_140: width 1.4 (stem 48, head 1792)", width_mult=1.4)
register_model(
    "mobilenetv2_110d", MobileNetV2, "timm mobilenetv2_110d: width 1.1, depth 1.2",
    width_mult=1.1, stage_repeats=(1, 3, 4, 5, 4, 4, 1), stem_channels=32, head_channels=1280,
)
register_model(
    "mobilenetv2_120d", MobileNetV2, "timm mobilenetv2_120d: width 1.2, depth 1.4",
    width_mult=1.2, stage_repeats=(1, 3, 5, 6, 5, 5, 1), stem_channels=32, head_channels=1280,
)

# MobileNeXt (the CA paper's second backbone): width variants through width_mult. The
# attention variants put the block after each sandglass block's first depthwise conv, the
# authors' placement (docs/mobilenext.md: the other placements and their sizes).
register_model("mobilenext", MobileNeXt, "MobileNeXt, the CA paper's second baseline (3.54M params at width 1.0)")
register_model("mobilenext_se", MobileNeXt, "MobileNeXt + SE (reduction 24) after the first depthwise conv", attention="se")
register_model(
    "mobilenext_ca", MobileNeXt, "MobileNeXt + Coordinate Attention (reduction 32) after the first depthwise conv",
    attention="ca",
)

__all__ = [
    "Backbone",
    "FeatureInfo",
    "STAGES",
    "InvertedResidual",
    "MobileNetV2",
    "MobileNeXt",
    "SandglassBlock",
    "create_model",
    "describe_model",
    "list_models",
    "make_divisible",
    "model_defaults",
    "register_model",
]
