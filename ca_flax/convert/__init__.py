"""PyTorch MobileNetV2 and MobileNeXt weights to ca-flax and back.

>>> from ca_flax.convert import from_torch, to_torch
>>> model, variables, report = from_torch('mbv2_ca.pth')      # layout and config inferred
>>> logits = model.apply(variables, images_nhwc)
>>> state_dict = to_torch(model, variables, 'official')         # numpy arrays

Layouts: the authors' MobileNetV2+CA (``'official'``), ``torchvision.models.mobilenet_v2``
(``'torchvision'``), timm's ``mobilenetv2_*`` (``'timm'``) and the authors' MobileNeXt
(``'official_mnext'``). Command line:
``python -m ca_flax.convert SRC DST`` (see ``python -m ca_flax.convert --help``).

Per family: ``mobilenetv2.py`` holds everything MobileNetV2-specific (layouts, key
mapping, configuration from shapes) and registers it in ``layouts.py``'s table; another
family is one more such module, imported below (``mobilenext.py``).
"""

# The families register their layouts on import: before anything reads LAYOUTS.
import ca_flax.convert.mobilenetv2  # noqa: F401
import ca_flax.convert.mobilenext  # noqa: F401
from ca_flax.convert.api import ConversionReport, from_torch, infer_config, to_torch
from ca_flax.convert.errors import ConversionError
from ca_flax.convert.io import load_state_dict, read_safetensors, save_state_dict
from ca_flax.convert.layouts import FAMILIES, LAYOUTS, Family, detect_layout, get_layout, register_family

__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "ConversionError",
    "ConversionReport",
    "Family",
    "detect_layout",
    "from_torch",
    "get_layout",
    "infer_config",
    "load_state_dict",
    "read_safetensors",
    "register_family",
    "save_state_dict",
    "to_torch",
]
