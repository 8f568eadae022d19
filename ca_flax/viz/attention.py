"""Attention maps from the model's own gates, and their pictures.

The attention blocks sow their gates into the ``'intermediates'`` collection when it is
mutable (``model.apply(..., mutable=['intermediates'])``): Coordinate Attention its
``a_h`` (N, H, 1, C) and ``a_w`` (N, 1, W, C), CBAM its ``spatial_gate`` (N, H, W, 1) and
``channel_gate``, SE its ``channel_gate`` (N, 1, 1, C). Recording intermediates also
turns off the CPU fusions and the eval micro-batches (``layers/fused.py``,
``models/micro_batch.py``), so the modules run as written; the logits are the same.

A block's spatial map is the gate each pixel of its feature map is multiplied by,
averaged over channels: ``mean_c a_h[h, c] * a_w[w, c]`` for CA, the spatial gate for
CBAM. SE has none (one gate per channel), so its channel gates are drawn as bars.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ca_flax.viz.plotting import new_figure


@dataclasses.dataclass(frozen=True)
class BlockAttention:
    """One attention block's gates for a batch of images.

    Attributes:
      name: the block's module name (``'blocks_3'``).
      stage: its stage (MobileNetV2 0-6, MobileNeXt 0-7).
      stride: input pixels per feature-map pixel at the block's output.
      kind: ``'ca'``, ``'cbam'`` or ``'se'``.
      spatial: ``(N, h, w)`` spatial map in [0, 1] (None for SE).
      channels: ``(N, C)`` channel gates (None for CA).
    """

    name: str
    stage: int
    stride: int
    kind: str
    spatial: np.ndarray | None
    channels: np.ndarray | None


def spatial_map(gates: Mapping[str, Any]) -> np.ndarray | None:
    """``(N, h, w)`` map of a block's sown gates: CA's ``mean_c a_h * a_w`` (a missing
    direction counts as 1), CBAM's spatial gate; None for a channel-only block (SE)."""
    if "a_h" in gates or "a_w" in gates:
        a_h = np.asarray(gates["a_h"][0], np.float32)[:, :, 0] if "a_h" in gates else None  # (N, H, C)
        a_w = np.asarray(gates["a_w"][0], np.float32)[:, 0] if "a_w" in gates else None  # (N, W, C)
        n, c = (a_h if a_h is not None else a_w).shape[::2]
        a_h = np.ones((n, 1, c), np.float32) if a_h is None else a_h  # one direction only: a 1-pixel axis
        a_w = np.ones((n, 1, c), np.float32) if a_w is None else a_w
        return np.einsum("nhc,nwc->nhw", a_h, a_w) / c
    if "spatial_gate" in gates:
        return np.asarray(gates["spatial_gate"][0], np.float32)[..., 0]
    return None


def channel_gates(gates: Mapping[str, Any]) -> np.ndarray | None:
    """``(N, C)`` channel gates of a block (SE, CBAM), None if it has none."""
    if "channel_gate" not in gates:
        return None
    gate = np.asarray(gates["channel_gate"][0], np.float32)
    return gate.reshape(gate.shape[0], gate.shape[-1])


def _apply_recording(model: Any, variables: Any, images: Any) -> tuple[Any, Any]:
    logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    return logits, state.get("intermediates", {})


def gate_recorder(model: Any) -> Any:
    """``(variables, images) -> (logits, intermediates)``, jitted: the eval-mode forward
    pass with every block's gates recorded. Keep it to reuse the compilation."""
    import jax

    return jax.jit(functools.partial(_apply_recording, model))


def block_attention(model: Any, intermediates: Mapping[str, Any]) -> list[BlockAttention]:
    """The attention of every block that has one, in network order, for any family whose
    ``block_specs()`` gives each block's ``stage`` and ``stride`` (MobileNetV2, MobileNeXt).

    ``stride`` is the block's output stride: in a MobileNeXt block whose attention sits
    before the closing stride-2 depthwise conv, the gated map is at half that stride
    (the map's own size tells)."""
    found = []
    stride = 2  # the stem
    for i, spec in enumerate(model.block_specs()):
        stride *= spec.stride
        gates = intermediates.get(f"blocks_{i}", {}).get("attention")
        if gates:
            found.append(BlockAttention(f"blocks_{i}", spec.stage, stride, model.attention, spatial_map(gates),
                                        channel_gates(gates)))
    return found


def model_attention(model: Any, variables: Any, images: Any,
                    recorder: Any = None) -> tuple[np.ndarray, list[BlockAttention]]:
    """``(logits, blocks)`` for NHWC ``images``: the model's eval-mode logits and the
    gates of each attention block (:func:`block_attention`). ``recorder``: a
    :func:`gate_recorder` of ``model`` to reuse."""
    recorder = recorder or gate_recorder(model)
    logits, intermediates = recorder(variables, images)
    return np.asarray(logits), block_attention(model, intermediates)


# -- pictures ---------------------------------------------------------------------------


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def plot_attention(image: np.ndarray, blocks: Sequence[BlockAttention], *, index: int = 0, title: str | None = None,
                   columns: int = 5) -> Any:
    """The input and each block's spatial map overlaid on it, one panel per block.

    ``image``: the model's input as RGB in [0, 1] ``(H, W, 3)``; ``index``: which image of
    the batch the maps are for. Each map is stretched over the image (bilinear) and
    coloured from its own minimum to its maximum, which the panel's title gives with
    the block's name, stage, stride and map size. Returns the matplotlib Figure.
    """
    blocks = [b for b in blocks if b.spatial is not None]
    if not blocks:
        raise ValueError("no block has a spatial attention map (SE gates channels only: use plot_channel_gates).")
    rows, cols = _grid(len(blocks) + 1, columns)
    figure = new_figure(2.2 * cols, 2.4 * rows)
    height, width = image.shape[:2]
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title(f"input {height}x{width}", fontsize=8)
    for ax, block in zip(axes[1:], blocks):
        amap = block.spatial[index]
        low, high = float(amap.min()), float(amap.max())
        ax.imshow(image)
        # Over the image's own pixel extent (imshow centres pixels on integers).
        ax.imshow(amap, cmap="jet", alpha=0.5, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                  interpolation="bilinear", vmin=low, vmax=high if high > low else low + 1e-6)
        ax.set_title(f"{block.name} (stage {block.stage})\nstride {block.stride}, {amap.shape[0]}x{amap.shape[1]}, "
                     f"{low:.3g}-{high:.3g}", fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def plot_channel_gates(blocks: Sequence[BlockAttention], *, index: int = 0, title: str | None = None,
                       columns: int = 4) -> Any:
    """Each block's channel gates as a bar chart (SE's attention has no spatial map)."""
    blocks = [b for b in blocks if b.channels is not None]
    if not blocks:
        raise ValueError("no block has channel gates.")
    rows, cols = _grid(len(blocks), columns)
    figure = new_figure(2.6 * cols, 1.9 * rows)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(blocks):]:
        ax.set_axis_off()
    for ax, block in zip(axes, blocks):
        gates = block.channels[index]
        ax.bar(np.arange(gates.size), gates, width=1.0, color="tab:blue")
        ax.set_ylim(0, 1)
        ax.set_title(f"{block.name} (stage {block.stage}, stride {block.stride}), {gates.size} channels", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def attention_figure(image: np.ndarray, blocks: Sequence[BlockAttention], *, index: int = 0,
                     title: str | None = None) -> Any:
    """:func:`plot_attention` where the blocks have spatial maps (CA, CBAM), else
    :func:`plot_channel_gates` (SE). ValueError for a model without attention."""
    if not blocks:
        raise ValueError("the model has no attention blocks, so there is no attention to draw.")
    if any(b.spatial is not None for b in blocks):
        return plot_attention(image, blocks, index=index, title=title)
    return plot_channel_gates(blocks, index=index, title=title)
