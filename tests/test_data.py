"""Input pipeline: sources, preprocessing geometry, determinism, resumption and sharding."""

from __future__ import annotations

import collections
import itertools
import subprocess
import sys

import numpy as np
import pytest

from ca_flax.data import MEAN_RGB, STDDEV_RGB, AugmentConfig, default_augment

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from ca_flax.data import dataset_info, eval_batches, preprocess, train_batches, validate_dataset  # noqa: E402

DIGITS_TOTAL, DIGITS_TRAIN, DIGITS_EVAL = 1797, 1437, 360


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, n))


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def concat_processes(batches_per_process: list[list[dict]]) -> list[dict]:
    """Step-wise concatenation of the processes' local batches (process order)."""
    return [
        {k: np.concatenate([step[p][k] for p in range(len(step))]) for k in step[0]}
        for step in zip(*batches_per_process)
    ]


def denormalize(image: np.ndarray) -> np.ndarray:
    return image * np.asarray(STDDEV_RGB, np.float32) + np.asarray(MEAN_RGB, np.float32)


def encode(image: np.ndarray, fmt: str) -> bytes:
    """PNG, or JPEG without chroma subsampling (so a fused crop-decode equals decode-then-crop)."""
    image = tf.constant(image, tf.uint8)
    if fmt == "jpeg":
        return tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False).numpy()
    return tf.io.encode_png(image).numpy()


def digits_heldout_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    labels = load_digits().target
    return labels[np.random.default_rng(0).permutation(len(labels))[DIGITS_TRAIN:]]


# ---------------------------------------------------------------------------------------
# Configuration


def test_import_does_not_load_tensorflow():
    code = "import sys, ca_flax.data; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_augment_config_validation_and_defaults():
    with pytest.raises(ValueError, match="area_range"):
        AugmentConfig(area_range=(0.5, 1.2))
    with pytest.raises(ValueError, match="aspect_range"):
        AugmentConfig(aspect_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="eval_crop_fraction"):
        AugmentConfig(eval_crop_fraction=1.5)
    with pytest.raises(ValueError, match="resize_method"):
        AugmentConfig(resize_method="nearest")
    assert default_augment("imagenet2012") == AugmentConfig()
    assert default_augment("digits").flip is False and default_augment("mnist").flip is False
    assert default_augment("digits").area_range[0] >= 0.5


# ---------------------------------------------------------------------------------------
# Preprocessing


def test_normalization_constants():
    mean = np.asarray(MEAN_RGB, np.float32)
    std = np.asarray(STDDEV_RGB, np.float32)
    np.testing.assert_allclose(mean, [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(std, [58.395, 57.12, 57.375], rtol=1e-6)
    image = np.stack([np.broadcast_to(mean, (2, 2, 3)), np.broadcast_to(mean + std, (2, 2, 3))])
    out = preprocess.normalize(tf.constant(image)).numpy()
    np.testing.assert_allclose(out[0], 0.0, atol=1e-5)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-5)


def test_center_crop_window_geometry():
    np.testing.assert_array_equal(preprocess.center_crop_window(tf.constant([256, 320]), 0.875), [16, 48, 224, 224])
    np.testing.assert_array_equal(preprocess.center_crop_window(tf.constant([375, 500]), 0.875), [24, 86, 328, 328])
    np.testing.assert_array_equal(preprocess.center_crop_window(tf.constant([8, 8]), 1.0), [0, 0, 8, 8])


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_eval_takes_the_center(fmt):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    data = encode(image, fmt)
    out = preprocess.preprocess_eval(tf.constant(data), 224, AugmentConfig()).numpy()
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    decoded = tf.io.decode_image(data, channels=3).numpy()  # JPEG is lossy: compare with its decode.
    np.testing.assert_allclose(denormalize(out), decoded[16:240, 48:272].astype(np.float32), atol=1e-3)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_train_crop_shape_and_bounds(fmt):
    image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    data = tf.constant(encode(image, fmt))
    augment = AugmentConfig(area_range=(0.25, 1.0))
    for s in range(20):
        key = tf.constant([s, 7], tf.int64)
        out = preprocess.preprocess_train(data, key, 24, augment)
        assert out.shape == (24, 24, 3) and out.dtype == tf.float32
        y, x, h, w = preprocess.random_crop_window(tf.constant([30, 40]), key, (0.25, 1.0)).numpy()
        assert 0 <= y and 0 <= x and y + h <= 30 and x + w <= 40
        assert 0.25 * 1200 - 1e-6 <= h * w <= 1200
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1  # Integer rounding of the sampled box.
    # Same key, same crop; different key, (almost surely) a different crop.
    a = preprocess.preprocess_train(data, tf.constant([1, 2], tf.int64), 24, augment).numpy()
    b = preprocess.preprocess_train(data, tf.constant([1, 2], tf.int64), 24, augment).numpy()
    c = preprocess.preprocess_train(data, tf.constant([1, 3], tf.int64), 24, augment).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_train_crop_falls_back_to_center_crop():
    # A 10x200 strip has no crop with aspect in [3/4, 4/3] and area >= 50%: the fallback is
    # the centered 10x13 window (13 = round(10 * 4/3)).
    for s in range(5):
        window = preprocess.random_crop_window(tf.constant([10, 200]), tf.constant([s, 0], tf.int64), (0.5, 1.0))
        np.testing.assert_array_equal(window, [0, 93, 10, 13])


def test_flip_off_means_no_flip():
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    data = tf.constant(encode(image, "png"))
    whole = dict(area_range=(1.0, 1.0), aspect_range=(1.0, 1.0))  # The crop is the whole image.
    flipped = 0
    for s in range(16):
        key = tf.constant([s, 0], tf.int64)
        out = denormalize(preprocess.preprocess_train(data, key, 16, AugmentConfig(flip=False, **whole)).numpy())
        np.testing.assert_allclose(out, image, atol=1e-3)
        out = denormalize(preprocess.preprocess_train(data, key, 16, AugmentConfig(flip=True, **whole)).numpy())
        if np.allclose(out, image[:, ::-1], atol=1e-3):
            flipped += 1
        else:
            np.testing.assert_allclose(out, image, atol=1e-3)
    assert 0 < flipped < 16


def test_grayscale_and_rgba_decode_to_rgb():
    gray = np.random.default_rng(3).integers(0, 256, (12, 12, 1), dtype=np.uint8)
    rgba = np.random.default_rng(4).integers(0, 256, (12, 12, 4), dtype=np.uint8)
    for image in (gray, rgba):
        for fmt in ("png", "jpeg") if image.shape[-1] == 1 else ("png",):
            out = preprocess.preprocess_eval(tf.constant(encode(image, fmt)), 12, AugmentConfig(eval_crop_fraction=1.0))
            assert out.shape == (12, 12, 3)
    out = denormalize(preprocess.preprocess_eval(tf.constant(encode(gray, "png")), 12,
                                                 AugmentConfig(eval_crop_fraction=1.0)).numpy())
    np.testing.assert_allclose(out, np.repeat(gray, 3, axis=-1), atol=1e-3)


# ---------------------------------------------------------------------------------------
# digits


def digits_train(**kwargs):
    args = dict(data_dir=None, image_size=16, global_batch_size=128, seed=0)
    return train_batches("digits", **{**args, **kwargs})


def test_digits_info():
    info = dataset_info("digits")
    assert (info.num_classes, info.num_train, info.num_eval) == (10, DIGITS_TRAIN, DIGITS_EVAL)
    assert info.num_train + info.num_eval == DIGITS_TOTAL
    assert (info.train_split, info.eval_split) == ("train", "test")
    assert info.steps_per_epoch(128) == 11 and info.eval_steps(128) == 3
    assert validate_dataset("digits", global_batch_size=128, process_count=2) == info


def test_digits_batches():
    batch = next(train_batches("digits", data_dir=None, image_size=32, global_batch_size=64, seed=0))
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
    assert -1.5 < batch["image"].mean() < 1.0 and 0.5 < batch["image"].std() < 2.5
    # Three equal channels: the grayscale digits are replicated to RGB before normalization.
    rgb = denormalize(batch["image"])
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 1], atol=1e-3)


def test_digits_bfloat16():
    import jax.numpy as jnp

    batch = next(digits_train(global_batch_size=8, dtype=jnp.bfloat16))
    assert batch["image"].dtype == jnp.bfloat16


def test_digits_epoch_is_a_permutation_of_the_train_split():
    # A whole-image crop at the native 8x8 size makes the pipeline the identity, so every
    # row can be matched to a training example.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    train = np.random.default_rng(0).permutation(DIGITS_TOTAL)[:DIGITS_TRAIN]
    identity = AugmentConfig(area_range=(1.0, 1.0), aspect_range=(1.0, 1.0), flip=False)
    steps = DIGITS_TRAIN // 100
    batches = take(digits_train(image_size=8, global_batch_size=100, augment=identity), 2 * steps)

    def rows(bs):
        out = []
        for b in bs:
            pixels = np.round(denormalize(b["image"])[..., 0]).astype(np.uint8)
            out += [(p.tobytes(), int(lab)) for p, lab in zip(pixels, b["label"])]
        return out

    available = collections.Counter((images[i].tobytes(), int(digits.target[i])) for i in train)
    epoch0, epoch1 = rows(batches[:steps]), rows(batches[steps:])
    assert len(epoch0) == steps * 100
    assert not collections.Counter(epoch0) - available  # A sub-multiset: no example twice.
    assert not collections.Counter(epoch1) - available
    assert epoch0 != epoch1  # Reshuffled each epoch.


def test_digits_train_determinism_and_seeds():
    a = take(digits_train(), 3)
    b = take(digits_train(), 3)
    assert_batches_equal(a, b)
    c = next(digits_train(seed=1))
    assert not np.array_equal(a[0]["image"], c["image"])
    assert not np.array_equal(a[0]["label"], c["label"])
    # Consecutive steps differ.
    assert not np.array_equal(a[0]["label"], a[1]["label"])


def test_digits_resume_reproduces_batches_across_epoch_boundary():
    steps = DIGITS_TRAIN // 128  # 11
    fresh = take(digits_train(), steps + 3)
    for start in (1, steps - 1, steps, steps + 2):
        resumed = take(digits_train(start_step=start), steps + 3 - start)
        assert_batches_equal(resumed, fresh[start:])


def test_digits_two_processes_equal_one_process():
    steps = DIGITS_TRAIN // 64  # 22: take a few past the boundary too.
    start = steps - 2
    single = take(digits_train(global_batch_size=64, start_step=start), 4)
    per_process = [
        take(digits_train(global_batch_size=64, start_step=start, process_index=p, process_count=2), 4)
        for p in range(2)
    ]
    assert per_process[0][0]["image"].shape[0] == 32
    assert_batches_equal(concat_processes(per_process), single)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_digits_eval_covers_heldout_once(process_count):
    global_batch = 64  # 360 = 5 * 64 + 40: the last global batch has 24 padding rows.
    per_process = [
        list(eval_batches("digits", data_dir=None, image_size=16, global_batch_size=global_batch,
                          process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert {len(b) for b in per_process} == {6}
    merged = concat_processes(per_process)
    mask = np.concatenate([b["mask"] for b in merged])
    labels = np.concatenate([b["label"] for b in merged])
    assert mask.dtype == np.bool_ and mask.sum() == DIGITS_EVAL
    assert collections.Counter(labels[mask].tolist()) == collections.Counter(digits_heldout_labels().tolist())
    padded = np.concatenate([b["image"] for b in merged])[~mask]
    assert padded.shape[0] == 6 * 64 - DIGITS_EVAL and not padded.any()
    if process_count > 1:
        single = list(eval_batches("digits", data_dir=None, image_size=16, global_batch_size=global_batch))
        assert_batches_equal(merged, single)


def test_batch_size_errors():
    with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=3"):
        digits_train(global_batch_size=10, process_count=3)
    with pytest.raises(ValueError, match="global_batch_size=10"):
        validate_dataset("digits", global_batch_size=10, process_count=4)
    with pytest.raises(ValueError, match="larger than the 1437"):
        validate_dataset("digits", global_batch_size=2048)
    with pytest.raises(ValueError, match="process_index"):
        digits_train(process_index=2, process_count=2)


# ---------------------------------------------------------------------------------------
# folder


def make_folder(root, train_counts=(5, 5, 5), val_counts=(3, 2, 2), classes=("cat", "dog", "emu")):
    """A tiny image folder: JPEG and PNG files, mixed extension case and sizes."""
    rng = np.random.default_rng(0)
    suffixes = [("jpeg", ".jpg"), ("png", ".png"), ("jpeg", ".JPEG"), ("png", ".PNG"), ("jpeg", ".jpeg")]
    for split, counts in (("train", train_counts), ("val", val_counts)):
        for cls, count in zip(classes, counts):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(count):
                fmt, suffix = suffixes[i % len(suffixes)]
                shape = (30, 40, 3) if i % 2 else (40, 30, 3)
                (d / f"img{i}{suffix}").write_bytes(encode(rng.integers(0, 256, shape, dtype=np.uint8), fmt))
            (d / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


def test_folder_info_and_batches(folder):
    info = validate_dataset("folder", folder, global_batch_size=4)
    assert (info.num_classes, info.num_train, info.num_eval) == (3, 15, 7)
    assert info.class_names == ("cat", "dog", "emu") and info.eval_split == "val"
    batches = take(train_batches("folder", data_dir=folder, image_size=16, global_batch_size=4, seed=0), 5)
    for b in batches:
        assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and set(b["label"]) <= {0, 1, 2}
    # 15 // 4 = 3 steps per epoch: batch 4 is in the second epoch; resuming there matches.
    resumed = take(train_batches("folder", data_dir=folder, image_size=16, global_batch_size=4, seed=0,
                                 start_step=4), 1)
    assert_batches_equal(resumed, batches[4:5])


def test_folder_eval_covers_all_once(folder):
    per_process = [
        list(eval_batches("folder", data_dir=folder, image_size=16, global_batch_size=4, process_index=p,
                          process_count=2))
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 2  # ceil(7 / 4)
    merged = concat_processes(per_process)
    mask = np.concatenate([b["mask"] for b in merged])
    labels = np.concatenate([b["label"] for b in merged])
    assert mask.tolist() == [True] * 7 + [False]
    assert sorted(labels[mask].tolist()) == [0, 0, 0, 1, 1, 2, 2]


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir"):
        dataset_info("folder")
    with pytest.raises(ValueError, match=r"missing.*train.*not a directory"):
        dataset_info("folder", tmp_path / "missing")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        dataset_info("folder", tmp_path / "empty")
    make_folder(tmp_path / "mismatch", classes=("cat", "dog", "emu"))
    (tmp_path / "mismatch" / "val" / "emu").rename(tmp_path / "mismatch" / "val" / "owl")
    with pytest.raises(ValueError, match=r"differ.*only in train: \['emu'\].*only in val: \['owl'\]"):
        dataset_info("folder", tmp_path / "mismatch")
    make_folder(tmp_path / "hollow", train_counts=(5, 0, 5))
    with pytest.raises(ValueError, match=r"dog has no images"):
        validate_dataset("folder", tmp_path / "hollow")


# ---------------------------------------------------------------------------------------
# TFDS


def test_tfds_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_dataset_xyz'.*'digits', 'folder'"):
        dataset_info("no_such_dataset_xyz")


def test_tfds_missing_data_message(tmp_path):
    with pytest.raises(ValueError, match="not prepared") as err:
        validate_dataset("cifar10", tmp_path)
    assert str(tmp_path) in str(err.value) and "tfds build cifar10" in str(err.value)


def test_tfds_mock_gives_encoded_bytes():
    # The pipeline relies on SkipDecoding handing over encoded images, also under mock_data.
    with tfds.testing.mock_data(num_examples=2):
        builder = tfds.builder("imagenet2012")
        ex = next(iter(builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})))
        assert ex["image"].dtype == tf.string and bool(tf.io.is_jpeg(ex["image"]))


def test_tfds_imagenet_mock_train_and_eval():
    with tfds.testing.mock_data(num_examples=10):
        info = dataset_info("imagenet2012")
        assert (info.num_classes, info.num_train, info.num_eval, info.eval_split) == (1000, 10, 10, "validation")
        kwargs = dict(data_dir=None, image_size=32, global_batch_size=4, seed=3, shuffle_buffer_size=8)
        fresh = take(train_batches("imagenet2012", **kwargs), 5)  # 2 steps per epoch: 3 epochs.
        assert fresh[0]["image"].shape == (4, 32, 32, 3) and fresh[0]["label"].dtype == np.int32
        epoch_labels = [np.concatenate([b["label"] for b in fresh[e * 2:e * 2 + 2]]).tolist() for e in range(2)]
        assert epoch_labels[0] != epoch_labels[1]  # Each epoch reshuffled (mock labels are random ids).
        assert_batches_equal(take(train_batches("imagenet2012", **kwargs), 5), fresh)
        assert_batches_equal(take(train_batches("imagenet2012", start_step=3, **kwargs), 2), fresh[3:])
        per_process = [take(train_batches("imagenet2012", process_index=p, process_count=2, **kwargs), 5)
                       for p in range(2)]
        assert_batches_equal(concat_processes(per_process), fresh)
        # Eval: 10 examples, global batch 4 -> 3 batches per process, 2 padding rows.
        eval_kwargs = dict(data_dir=None, image_size=32, global_batch_size=4)
        single = list(eval_batches("imagenet2012", **eval_kwargs))
        assert len(single) == 3
        assert np.concatenate([b["mask"] for b in single]).tolist() == [True] * 10 + [False] * 2
        per_process = [list(eval_batches("imagenet2012", process_index=p, process_count=2, **eval_kwargs))
                       for p in range(2)]
        assert_batches_equal(concat_processes(per_process), single)


def test_tfds_mnist_mock_grayscale():
    with tfds.testing.mock_data(num_examples=6):
        batch = next(train_batches("mnist", data_dir=None, image_size=16, global_batch_size=3, seed=0))
        assert batch["image"].shape == (3, 16, 16, 3)
        rgb = denormalize(batch["image"])
        np.testing.assert_allclose(rgb[..., 0], rgb[..., 2], atol=1e-3)


class CaFlaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """A real (not mocked) TFDS dataset, prepared in a temp dir: JPEGs of varying size, 3 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        })
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 13), "test": self._generate_examples(1, 5)}

    def _generate_examples(self, seed, n):
        rng = np.random.default_rng(seed)
        for i in range(n):
            image = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            yield i, {"image": encode(image, "jpeg"), "label": i % 3}  # Bytes: TFDS stores them as they are.


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    CaFlaxTinyImages(data_dir=str(data_dir)).download_and_prepare()  # The test prepares; the pipeline never does.
    return data_dir


def test_tfds_prepared_dataset(tiny_tfds):
    from ca_flax.data import sources

    name = "ca_flax_tiny_images"
    info = validate_dataset(name, tiny_tfds, global_batch_size=4)
    assert (info.num_classes, info.num_train, info.num_eval, info.eval_split) == (3, 13, 5, "test")
    assert info.class_names == ("a", "b", "c")
    assert sources.open_source(name, tiny_tfds).cache  # Small: the encoded records stay in memory.
    kwargs = dict(data_dir=tiny_tfds, image_size=16, global_batch_size=4, seed=0)
    fresh = take(train_batches(name, **kwargs), 7)  # 3 steps per epoch.
    assert fresh[0]["image"].shape == (4, 16, 16, 3)
    assert_batches_equal(take(train_batches(name, start_step=4, **kwargs), 3), fresh[4:])
    per_process = [take(train_batches(name, process_index=p, process_count=2, **kwargs), 7) for p in range(2)]
    assert_batches_equal(concat_processes(per_process), fresh)
    batches = list(eval_batches(name, data_dir=tiny_tfds, image_size=16, global_batch_size=4))
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.tolist() == [True] * 5 + [False] * 3
    assert sorted(labels[mask].tolist()) == [0, 0, 1, 1, 2]


def _torchvision_adjust(image: np.ndarray, factors, order) -> np.ndarray:
    """torchvision.transforms.functional's float-tensor formulas, written out in numpy."""

    def gray(x):
        return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]

    def blend(x, other, f):
        return np.clip(f * x + (1 - f) * other, 0, 255)

    steps = (lambda x: blend(x, 0.0, factors[0]), lambda x: blend(x, gray(x).mean(), factors[1]),
             lambda x: blend(x, gray(x), factors[2]))
    for which in order:
        image = steps[which](image)
    return image


@pytest.mark.parametrize("order", preprocess.COLOR_ORDERS)
def test_color_adjustments_follow_torchvision(order):
    image = np.random.default_rng(3).uniform(0, 255, (9, 7, 3)).astype(np.float32)
    factors = (1.3, 0.7, 1.25)
    out = preprocess.adjust_colors(tf.constant(image), tf.constant(factors), order).numpy()
    np.testing.assert_allclose(out, _torchvision_adjust(image.astype(np.float64), factors, order), atol=1e-3)


def test_color_jitter_is_keyed_and_bounded():
    image = np.random.default_rng(4).uniform(0, 255, (8, 8, 3)).astype(np.float32)
    outs = [preprocess.color_jitter(tf.constant(image), tf.constant([s, 1], tf.int64), 0.4).numpy() for s in range(12)]
    again = preprocess.color_jitter(tf.constant(image), tf.constant([0, 1], tf.int64), 0.4).numpy()
    np.testing.assert_array_equal(outs[0], again)
    assert len({o.tobytes() for o in outs}) == len(outs)
    # Brightness alone moves the mean by at most 40%; the blends keep values in 0..255.
    for out in outs:
        assert 0.0 <= out.min() and out.max() <= 255.0
        assert 0.5 * image.mean() < out.mean() < 1.5 * image.mean()


def test_color_jitter_leaves_crops_and_flips_alone():
    image = np.random.default_rng(5).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    data = tf.constant(encode(image, "png"))
    for s in range(6):
        key = tf.constant([s, 9], tf.int64)
        plain = preprocess.preprocess_train(data, key, 12, AugmentConfig())
        again = preprocess.preprocess_train(data, key, 12, AugmentConfig(color_jitter=0.0))
        jittered = preprocess.preprocess_train(data, key, 12, AugmentConfig(color_jitter=0.4))
        np.testing.assert_array_equal(plain.numpy(), again.numpy())
        # Same crop and flip: the jittered image is a per-image color change of the plain one,
        # so its grayscale structure (where it is not clipped) stays correlated.
        a, b = denormalize(plain.numpy()).mean(-1).ravel(), denormalize(jittered.numpy()).mean(-1).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.9


def test_color_jitter_strength_is_validated():
    with pytest.raises(ValueError, match="color_jitter"):
        AugmentConfig(color_jitter=1.5)
