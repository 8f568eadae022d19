"""Seeing: predict on image files, attention maps and training curves, checked by what
the outputs and the pictures hold (the plotted data, the map's peak, the predictions
against the evaluation), not only that a file exists.

One tiny untrained MobileNetV2+CA (width 0.25, one block per stage, 32x32) serves the
model tests; its BatchNorm statistics are set from a batch of digits so that its
outputs differ from image to image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_variables

from ca_flax.attention import CoordinateAttention
from ca_flax.viz.attention import BlockAttention, attention_figure, model_attention, plot_attention, spatial_map
from ca_flax.viz.curves import PANELS, plot_curves, read_run
from ca_flax.viz.plotting import figure_pixels, save_figure

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
TINY = dict(num_classes=10, width_mult=0.25, stage_repeats=(1, 1, 1, 1, 1, 1, 1))
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def _tiny(attention: str):
    from ca_flax.models import create_model

    return create_model("mobilenetv2", attention=attention, **TINY)


# -- attention maps ----------------------------------------------------------------------


def _hand_set_ca(channels: int = 4) -> tuple[CoordinateAttention, dict]:
    """A CA block that passes the pooled strips straight through (identity reduce conv
    and BatchNorm) and gates with sigmoid(8 y - 1): brighter rows and columns, higher gates."""
    block = CoordinateAttention(reduction=1, min_channels=channels)
    eye = np.eye(channels, dtype=np.float32)[None, None]
    zeros, ones = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    variables = {
        "params": {"reduce": {"kernel": eye, "bias": zeros}, "bn": {"scale": ones, "bias": zeros},
                   "gate_h": {"kernel": 8 * eye, "bias": -ones}, "gate_w": {"kernel": 8 * eye, "bias": -ones}},
        "batch_stats": {"bn": {"mean": zeros, "var": ones}},
    }
    return block, variables


def test_coordinate_attention_map_peaks_on_a_bright_square_in_the_map_and_in_the_picture():
    block, variables = _hand_set_ca()
    x = np.zeros((1, 16, 16, 4), np.float32)
    x[0, 4:8, 10:14] = 1.0  # rows 4-7, columns 10-13
    out, state = block.apply(variables, jnp.asarray(x), mutable=["intermediates"])
    gates = state["intermediates"]
    # The sown gates are the ones the block multiplies by.
    np.testing.assert_allclose(out, x * gates["a_w"][0] * gates["a_h"][0], rtol=1e-6)
    amap = spatial_map(gates)[0]
    inside = np.zeros((16, 16), bool)
    inside[4:8, 10:14] = True
    assert amap.shape == (16, 16)
    assert inside[np.unravel_index(amap.argmax(), amap.shape)]
    assert amap[inside].min() > amap[~inside].max()

    # The picture: the overlay drawn over the input is this map, stretched over the image.
    image = np.repeat(x[0, ..., :1], 3, axis=-1)
    figure = plot_attention(image, [BlockAttention("ca", 0, 1, "ca", amap[None], None)])
    axes = figure.axes[1]
    base, overlay = axes.get_images()
    np.testing.assert_array_equal(base.get_array(), image)
    np.testing.assert_array_equal(overlay.get_array(), amap)
    assert overlay.get_extent() == [-0.5, 15.5, 15.5, -0.5]
    assert "stride 1, 16x16" in axes.get_title()
    # Rendered over a black input, the panel is red (jet's high end) on the square, blue elsewhere.
    figure = plot_attention(np.zeros_like(image), [BlockAttention("ca", 0, 1, "ca", amap[None], None)])
    pixels = figure_pixels(figure).astype(int)
    box = figure.axes[1].get_window_extent()  # display pixels, origin at the bottom left
    panel = pixels[pixels.shape[0] - int(box.y1):pixels.shape[0] - int(box.y0), int(box.x0):int(box.x1)]
    redness = panel[..., 0] - panel[..., 2]
    rows, cols = (np.arange(n) * 16 // n for n in redness.shape)  # panel pixel -> input pixel
    on_square = inside[rows[:, None], cols[None, :]]
    assert redness[on_square].mean() > 50 > -50 > redness[~on_square].mean()


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """The tiny CA model saved as a checkpoint that records digits at 32x32, as a
    training workdir's model.json does; BatchNorm statistics from 256 digits."""
    from ca_flax import data
    from ca_flax.checkpoints import save_model

    model = _tiny("ca")
    variables = numpy_variables(model, (1, SIZE, SIZE, 3))
    batch = next(data.eval_batches("digits", image_size=SIZE, global_batch_size=256))
    calibrate = model.clone(bn_momentum=0.0, dropout_rate=0.0)  # momentum 0: the batch's statistics
    _, updates = jax.jit(lambda v, x: calibrate.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, batch["image"])
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    path = tmp_path_factory.mktemp("viz") / "ckpt"
    save_model(path, model, variables, source={"trained_by": "test", "dataset": "digits", "image_size": SIZE})
    return path


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> tuple[list[Path], np.ndarray]:
    """The digits evaluation split as PNG files (the very bytes the pipeline decodes), and its labels."""
    from ca_flax.data.sources import open_source

    source = open_source("digits")
    folder = tmp_path_factory.mktemp("digits")
    files = []
    for i, encoded in enumerate(source.images["test"]):
        files.append(folder / f"{i:03d}.png")
        files[-1].write_bytes(encoded)
    return files, source.labels["test"]


def test_model_attention_maps_per_block_differ_between_images_and_keep_the_logits(digits_checkpoint, digit_files):
    from ca_flax.checkpoints import restore
    from ca_flax.viz.images import EvalPreprocessing, read_image, to_display
    from ca_flax.data import default_augment

    model, variables, _ = restore(digits_checkpoint)
    files, labels = digit_files
    prep = EvalPreprocessing("digits", SIZE, default_augment("digits"))
    # Two different digits.
    first = int(np.flatnonzero(labels == 0)[0]), int(np.flatnonzero(labels == 1)[0])
    images = np.stack([read_image(files[i], prep)[0] for i in first])
    logits, blocks = model_attention(model, variables, images)
    # Recording the gates runs the modules as written; the logits are the fused path's.
    np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, images), rtol=1e-4, atol=1e-5)
    assert [(b.name, b.stage, b.stride, b.spatial.shape[1:]) for b in blocks] == [
        ("blocks_1", 1, 4, (8, 8)), ("blocks_2", 2, 8, (4, 4)), ("blocks_3", 3, 16, (2, 2)),
        ("blocks_4", 4, 16, (2, 2)), ("blocks_5", 5, 32, (1, 1)), ("blocks_6", 6, 32, (1, 1))]
    for block in blocks[:4]:  # 1x1 maps have nothing to differ in but their level
        assert np.all((block.spatial > 0) & (block.spatial < 1))
        assert np.abs(block.spatial[0] - block.spatial[1]).max() > 1e-4, block.name
    figures = [attention_figure(to_display(images[i]), blocks, index=i) for i in (0, 1)]
    overlays = [[ax.get_images()[1].get_array() for ax in f.axes[1:len(blocks) + 1]] for f in figures]
    for i, figure in enumerate(figures):
        np.testing.assert_array_equal(figure.axes[0].get_images()[0].get_array(), to_display(images[i]))
        for drawn, block in zip(overlays[i], blocks):
            np.testing.assert_array_equal(drawn, block.spatial[i])


@pytest.mark.parametrize("kind", ["se", "cbam"])
def test_se_has_channel_gates_drawn_as_bars_and_cbam_a_spatial_map(kind):
    model = _tiny(kind)
    variables = numpy_variables(model, (1, SIZE, SIZE, 3))
    images = np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    _, blocks = model_attention(model, variables, images)
    assert len(blocks) == 6 and all(b.channels is not None for b in blocks)
    image = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    if kind == "se":
        assert all(b.spatial is None for b in blocks)
        with pytest.raises(ValueError, match="SE gates channels only"):
            plot_attention(image, blocks)
        figure = attention_figure(image, blocks)  # the bar charts instead
        for ax, block in zip(figure.axes, blocks):
            np.testing.assert_allclose([bar.get_height() for bar in ax.patches], block.channels[0], rtol=1e-6)
    else:
        assert [b.spatial.shape[1:] for b in blocks][:2] == [(8, 8), (4, 4)]
        assert all(np.all((b.spatial > 0) & (b.spatial < 1)) for b in blocks)
        figure = attention_figure(image, blocks)
        np.testing.assert_array_equal(figure.axes[1].get_images()[1].get_array(), blocks[0].spatial[0])
    with pytest.raises(ValueError, match="no attention blocks"):
        attention_figure(image, [])


@pytest.mark.parametrize("position", ["first_dw", "expand"])
def test_mobilenext_attention_maps_per_block(position):
    """Another family through the same functions: every block with a CA block gives a map
    of its gated feature map's size, named by its stage and output stride."""
    from ca_flax.models import create_model

    model = create_model("mobilenext_ca", num_classes=10, width_mult=0.25, stage_repeats=(1, 1, 2, 1, 1, 1, 1, 1),
                         attention_position=position)
    variables = numpy_variables(model, (1, SIZE, SIZE, 3))
    images = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    logits, blocks = model_attention(model, variables, images)
    np.testing.assert_allclose(logits, model.apply(variables, images), rtol=1e-5, atol=1e-5)
    specs = model.block_specs()
    with_attention = [f"blocks_{i}" for i, s in enumerate(specs)
                      if s.plan.case != "first" and (position == "expand" or s.plan.first_dw)]
    assert [b.name for b in blocks] == with_attention and len(blocks) >= 3
    for block in blocks:
        spec = specs[int(block.name.split("_")[1])]
        assert block.stage == spec.stage and block.kind == "ca" and block.channels is None
        # Either placement gates a map at the block's input resolution: after the first
        # depthwise conv (stride 1), or before the closing one (which takes the stride).
        side = SIZE // block.stride * spec.stride
        assert block.spatial.shape == (2, side, side)
        assert np.all((block.spatial > 0) & (block.spatial < 1))
    attention_figure(np.full((SIZE, SIZE, 3), 0.5, np.float32), blocks)


# -- training curves -----------------------------------------------------------------------


def _write_run(workdir: Path, scale: float) -> list[dict]:
    records = [{"step": 0, "train_step_compile_s": 3.0}]
    for step in range(10, 101, 10):
        records.append({"step": step, "train_loss": scale * 2.0 / step ** 0.5, "train_top1": min(1, step / 120),
                        "learning_rate": 0.1 * (1 - step / 100), "images_per_sec": 50.0})
        if step % 50 == 0:
            records.append({"step": step, "eval_top1": scale * step / 110, "eval_top5": min(1.0, step / 90),
                            "eval_loss": scale / step})
    records[3]["train_grad_norm"] = "nan"  # non-finite values are written as strings
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_curves_plot_exactly_the_metrics_file_with_runs_overlaid_and_an_epoch_axis(tmp_path):
    runs = {"baseline": 1.0, "ca": 0.8}
    written = {name: _write_run(tmp_path / name, scale) for name, scale in runs.items()}
    figure = plot_curves([read_run(tmp_path / name, steps_per_epoch=25) for name in runs])
    assert [ax.get_title().split(" (")[0] for ax in figure.axes[:4]] == [title for _, title in PANELS]
    for ax, (key, _) in zip(figure.axes, PANELS):
        drawn = {line.get_label(): line for line in ax.get_lines() if line.get_gid() == key}
        assert sorted(drawn) == sorted(runs)
        for name, records in written.items():
            want = [(r["step"], r[key]) for r in records if key in r]
            np.testing.assert_array_equal(drawn[name].get_xdata(), [s for s, _ in want])
            np.testing.assert_array_equal(drawn[name].get_ydata(), [v for _, v in want])
        assert len({line.get_color() for line in drawn.values()}) == 2
    eval_loss = [line for line in figure.axes[0].get_lines() if line.get_gid() == "eval_loss"]
    assert [line.get_label() for line in eval_loss] == ["baseline eval", "ca eval"]
    np.testing.assert_array_equal(eval_loss[1].get_ydata(), [0.8 / 50, 0.8 / 100])
    assert all(ax.child_axes and ax.child_axes[0].get_xlabel() == "epoch" for ax in figure.axes[:4])
    assert sorted(t.get_text() for t in figure.legends[0].get_texts()) == sorted(runs)

    out = save_figure(figure, tmp_path / "pictures" / "curves.png")
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left
    pixels = figure_pixels(figure)
    assert pixels.std() > 10  # drawn, not blank


def test_visualize_curves_cli_and_its_errors(tmp_path, capsys):
    from ca_flax import visualize

    _write_run(tmp_path / "run", 1.0)

    def run_module(*args):
        return subprocess.run([sys.executable, "-m", "ca_flax.visualize", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env={**os.environ, **QUIET_TF})

    ok = run_module("curves", tmp_path / "run", "--output", tmp_path / "c.png", "--names", "mine")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_module("curves", tmp_path / "nope", "--output", tmp_path / "x.png")
    assert bad.returncode == 2 and bad.stderr == f"error: {tmp_path / 'nope'}: no such training workdir.\n"
    for args, message in [
        (("curves", tmp_path / "run", "--output", tmp_path / "x.txt"), "cannot write a picture with suffix 'txt'"),
        (("curves", tmp_path / "run", "--output", tmp_path), "is a directory"),
        (("curves", tmp_path / "run", tmp_path / "run", "--output", tmp_path / "x.png", "--names", "a"),
         "--names gives 1 names for 2 workdirs"),
    ]:
        assert visualize.main(list(map(str, args))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_visualize_attention_cli(digits_checkpoint, digit_files, tmp_path, capsys):
    from ca_flax import visualize

    out = tmp_path / "maps.png"
    assert visualize.main(["attention", "--checkpoint", str(digits_checkpoint), str(digit_files[0][0]),
                           "--output", str(out), "--dpi", "50"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a JPEG")
    assert visualize.main(["attention", "--checkpoint", str(digits_checkpoint), str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: not an image that can be decoded (JPEG, PNG, GIF or BMP), or a damaged one.\n"


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    from ca_flax import visualize

    _write_run(tmp_path / "run", 1.0)
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # what an uninstalled package looks like
    assert visualize.main(["curves", str(tmp_path / "run"), "--output", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'ca-flax[viz]'" in err and len(err.strip().splitlines()) == 1


def test_training_pictures_never_stop_a_run(tmp_path, monkeypatch, capsys):
    import ml_collections

    from ca_flax.viz import curves, training

    _write_run(tmp_path / "wd", 1.0)
    config = ml_collections.ConfigDict({"dataset": "digits", "data_dir": None, "image_size": SIZE})
    pictures = training.TrainingPictures(config, _tiny("ca"), tmp_path / "wd", writer=None, steps_per_epoch=25)
    pictures.on_end()
    assert (tmp_path / "wd" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    def broken(*args, **kwargs):
        raise RuntimeError("no room")

    monkeypatch.setattr(curves, "plot_curves", broken)
    pictures.on_end()  # a warning, no exception
    pictures.on_evaluation(10, state=None)  # no state to draw from: a warning too
    assert not pictures.attention_enabled
    out = capsys.readouterr().out
    assert "Warning: writing" in out and "RuntimeError: no room" in out
    assert "Warning: logging the attention maps" in out


# -- predict ------------------------------------------------------------------------------


def test_predict_on_png_files_equals_the_evaluation(digits_checkpoint, digit_files):
    from ca_flax import data
    from ca_flax.checkpoints import restore
    from ca_flax.evaluate import evaluate_checkpoint
    from ca_flax.predict import load_predictor, predict_files

    files, labels = digit_files
    predictor = load_predictor(digits_checkpoint)
    assert predictor.names == tuple(str(i) for i in range(10))
    results = predict_files(predictor, files, k=10, batch_size=64)
    top1 = np.array([r["top_k"][0]["index"] for r in results])
    assert all(r["top_k"][0]["label"] == str(i) for r, i in zip(results, top1))
    assert all(abs(sum(c["probability"] for c in r["top_k"]) - 1) < 1e-5 for r in results)
    assert len(set(top1)) >= 3  # the predictions depend on the image

    # The same argmax as the model on the evaluation pipeline's images ...
    model, variables, _ = restore(digits_checkpoint)
    batch = next(data.eval_batches("digits", image_size=SIZE, global_batch_size=len(files)))
    np.testing.assert_array_equal(top1, np.asarray(jax.jit(model.apply)(variables, batch["image"])).argmax(-1))
    # ... and the same top-1 as python -m ca_flax.evaluate's.
    metrics = evaluate_checkpoint(str(digits_checkpoint), batch_size=120)
    assert metrics["eval_examples"] == len(files)
    assert np.mean(top1 == labels) == metrics["eval_top1"]


def test_predict_cli_bad_files_grayscale_and_rgba(digits_checkpoint, digit_files, tmp_path, capsys):
    import tensorflow as tf

    from ca_flax import predict

    good = digit_files[0][0]
    rgb = tf.io.decode_png(good.read_bytes()).numpy()
    gray, rgba = tmp_path / "gray.png", tmp_path / "rgba.png"
    gray.write_bytes(tf.io.encode_png(rgb[..., :1]).numpy())
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2] + (1,), dtype=np.uint8)
    rgba.write_bytes(tf.io.encode_png(np.concatenate([rgb, alpha], -1)).numpy())
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    files = [good, tmp_path / "missing.png", text, gray, rgba, tmp_path]
    code = predict.main(["--checkpoint", str(digits_checkpoint), "--top-k", "3", "--json", *map(str, files)])
    out, err = capsys.readouterr()
    assert code == 2  # some files failed; the others' results are there
    results = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["file"] for r in results] == [str(f) for f in files]
    assert set(results[0]) == {"file", "top_k"} and len(results[0]["top_k"]) == 3
    assert results[1] == {"file": str(files[1]), "error": f"{files[1]}: no such file."}
    assert "not an image that can be decoded" in results[2]["error"]
    assert "is a directory" in results[5]["error"]
    # Documented conversions: gray replicated to RGB, alpha dropped; the same pixels, the same answer.
    assert results[3]["note"] == "grayscale: replicated to RGB" and results[3]["top_k"] == results[0]["top_k"]
    assert results[4]["note"].startswith("RGBA: alpha channel dropped") and results[4]["top_k"] == results[0]["top_k"]
    assert err.splitlines() == [f"error: {r['error']}" for r in results if "error" in r]

    assert predict.main(["--checkpoint", str(digits_checkpoint), str(good)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(good) and len(out) == 6 and "(class " in out[1] and "%" in out[1]


def test_predict_cli_without_a_checkpoint_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ca_flax.predict", "--checkpoint", str(tmp_path / "nope"), "x.png"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **QUIET_TF})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such checkpoint directory."]


def test_imagenet_checkpoints_get_imagenet_preprocessing_and_names():
    from ca_flax.viz.images import eval_preprocessing
    from ca_flax.viz.labels import class_names

    converted = {"config": {"num_classes": 1000}, "source": {"converter": "ca_flax.convert", "layout": "official"}}
    prep = eval_preprocessing(converted)
    assert (prep.dataset, prep.image_size, prep.augment.eval_crop_fraction) == ("imagenet2012", 224, 0.875)
    assert eval_preprocessing(converted, image_size=256).image_size == 256
    names = class_names(prep.dataset, 1000)
    assert (names[0], names[1], names[281], names[409], names[999]) == (
        "tench", "goldfish", "tabby", "analog clock", "toilet tissue")
    assert class_names("imagenet2012", 10) == (None,) * 10  # a fine-tuned head: no names to guess
    workdir = {"config": {"num_classes": 10}, "source": {"dataset": "digits", "image_size": 64}}
    assert eval_preprocessing(workdir).image_size == 64 and class_names("digits", 10)[3] == "3"
