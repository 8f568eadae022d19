"""Train input pipeline throughput at ImageNet settings (224x224, Inception crop, flip).

    python benchmarks/input_pipeline.py [--images 256] [--batch 128] [--batches 20]

Writes ``--images`` random-content JPEGs of ImageNet's typical size (500x375, quality
90) into a temporary folder laid out for the ``'folder'`` source, then times
``train_batches('folder', image_size=224, ...)``: read, fused decode + random crop,
resize, flip, normalize, batch. Prints images/s with one tf.data thread (per core) and
with one thread per core (total). The content is smooth noise plus grain, so files are
roughly the size of ImageNet's (~110 KB on average); pure noise would make them ~3x larger
and slower to decode. Timings on shared machines are noisy: compare runs on one machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ca_flax.data import train_batches
from ca_flax.data._tf import tf

IMAGENET_SIZE = (375, 500)  # height, width


def write_images(root: Path, count: int, classes: int = 4, seed: int = 0) -> float:
    """Writes ``count`` JPEGs under root/{train,val}/class_k/; returns the mean file size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
        image = tf.image.resize(coarse, IMAGENET_SIZE, method="bicubic").numpy()
        image += rng.normal(0, 24, image.shape)  # Grain: brings files to ~110 KB.
        data = tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90).numpy()
        for split in ("train", "val"):
            d = root / split / f"class_{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            if split == "train" or i < classes:  # val/ only needs each class once.
                (d / f"{i:05d}.jpg").write_bytes(data)
        sizes.append(len(data))
    return float(np.mean(sizes)) / 1024


def images_per_second(root: Path, batch: int, batches: int, threads: int, image_size: int) -> float:
    it = train_batches("folder", data_dir=root, image_size=image_size, global_batch_size=batch, seed=0,
                       num_threads=threads)
    for _ in itertools.islice(it, 2):  # Warm-up: tracing, thread start, autotuning.
        pass
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kb = write_images(root, args.images)
        print(f"{args.images} JPEGs {IMAGENET_SIZE[1]}x{IMAGENET_SIZE[0]} q90, mean {kb:.0f} KB; "
              f"image_size {args.image_size}, batch {args.batch}, {cores} cores")
        one = images_per_second(root, args.batch, args.batches, 1, args.image_size)
        print(f"1 thread:   {one:8.0f} images/s  (per core)")
        total = images_per_second(root, args.batch, args.batches, cores, args.image_size)
        print(f"{cores} threads: {total:8.0f} images/s  (total; {total / cores:.0f} per core)")


if __name__ == "__main__":
    main()
