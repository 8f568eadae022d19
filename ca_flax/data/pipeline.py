"""Train and eval batches for the trainer: tf.data on the host, numpy out.

Determinism and sharding (train):

* The global order of an epoch is a pure function of ``(seed, epoch)``: an exact
  ``index_shuffle`` permutation for in-memory sources, a shuffle buffer seeded with
  ``f(seed, epoch)`` over the fixed record order for TFDS streams. An epoch is
  ``num_train // global_batch_size`` global batches; the remainder is dropped.
* Global batch ``k`` is positions ``[k * G, (k + 1) * G)`` of its epoch's order, and
  process ``p`` of ``P`` takes rows ``[p * L, (p + 1) * L)`` of it (``L = G // P``), so
  the union of the processes' batches at step ``k`` does not depend on ``P``.
* The augmentation of an example is keyed by ``(seed, epoch, position in the epoch)``,
  so batch ``k`` is a pure function of ``(seed, k)``; ``start_step`` jumps straight to
  its epoch and position (no replay of earlier epochs).

Eval: positions ``0 .. n - 1`` in the split's fixed order, padded to
``ceil(n / G) * G`` with masked rows; process ``p`` again takes rows
``[p * L, (p + 1) * L)`` of each global batch, so every process yields the same number
of batches and every example appears exactly once across processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ca_flax.data._tf import tf
from ca_flax.data.config import AugmentConfig, DatasetInfo, default_augment
from ca_flax.data.preprocess import preprocess_eval, preprocess_train
from ca_flax.data.sources import IndexedSource, StreamSource, open_source

Batch = dict[str, np.ndarray]

# The map functions are plain TF ops: AutoGraph conversion only fails noisily on closures.
_plain = tf.autograph.experimental.do_not_convert

# Key domains, so the shuffle and the augmentation draw independent numbers.
_SHUFFLE, _AUGMENT = 0, 1
# Enough epochs to never run out (2**40 steps at one step per epoch).
_MAX_EPOCHS = 2**40
DEFAULT_SHUFFLE_BUFFER = 16_384


class UndecodableImageError(ValueError):
    """An image of the dataset cannot be decoded; the message names its file (or example)."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A train or eval pipeline before it is built: ``rows`` (this process's rows, in order)
    become examples through ``preprocess`` and are batched ``local`` at a time.

    ``replay(b)``, where given, rebuilds the rows from this iterator's batch ``b`` on, so a
    batch that fails to decode can be decoded again row by row to name the bad file. None
    for TFDS streams: replaying would re-read up to an epoch of records, and TFDS decodes
    every image once when it prepares a dataset.
    """

    source: IndexedSource | StreamSource
    split: str
    rows: tf.data.Dataset
    preprocess: Callable[..., dict[str, tf.Tensor]]
    local: int
    num_threads: int | None
    replay: Callable[[int], tf.data.Dataset] | None

    def dataset(self) -> tf.data.Dataset:
        ds = self.rows.map(_plain(self.preprocess), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.local, drop_remainder=True)  # Epochs hold whole batches: none straddles two.
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(self.num_threads))

    def batches(self) -> Iterator[Batch]:
        """The numpy batches; an image that does not decode raises :class:`UndecodableImageError`
        naming it, not a TensorFlow traceback from inside tf.data. Other TensorFlow errors
        (I/O: a network filesystem that fails) pass through as they are."""
        return self._named_errors(self.dataset().as_numpy_iterator())

    def _named_errors(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for index in itertools.count():
            try:
                batch = next(batches)
            except StopIteration:
                return
            except tf.errors.InvalidArgumentError as error:  # what the decode ops raise
                raise UndecodableImageError(self._describe_failure(index, error)) from None
            yield batch

    def _describe_failure(self, index: int, error: tf.errors.OpError) -> str:
        name = self.source.info.name
        bad = self._bad_rows(index) if self.replay is not None else []
        if not bad:  # A stream, or an error the rows alone do not reproduce.
            return f"Dataset {name!r} ({self.split} split): batch {index} of this run failed: {_first_line(error)}."
        return (
            f"Dataset {name!r} ({self.split} split): cannot decode {'; '.join(bad)}. Replace or delete "
            f"{'it' if len(bad) == 1 else 'them'} and rerun (a run resumes from its last checkpoint)."
        )

    def _bad_rows(self, index: int) -> list[str]:
        """Each row of batch ``index`` decoded on its own (eagerly): where it comes from, and why it fails."""
        bad = []
        for row in self.replay(index).take(self.local):
            try:
                self.preprocess(*row)
            except tf.errors.OpError as error:
                bad.append(f"{self.source.describe(self.split, int(row[0]))} ({_first_line(error)})")
        return bad


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """Class count and split sizes of dataset ``name`` (lists files / reads metadata only).

    ``name`` is ``'digits'`` (scikit-learn's bundled 8x8 digits, 80/20 split),
    ``'folder'`` (``data_dir/{train,val}/<class>/<image>``) or a prepared TFDS builder
    name (``'imagenet2012'``, ``'cifar10'``, ...; ``data_dir`` is the TFDS data directory).
    """
    return open_source(name, data_dir).info


def validate_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    global_batch_size: int | None = None,
    process_count: int = 1,
) -> DatasetInfo:
    """Checks, without reading any image, that ``name`` can be trained on; returns its info.

    Call it before compiling anything so a bad path or name fails in a second.

    Raises:
      ValueError: unknown dataset, missing or malformed data, a global batch that does
        not split evenly over ``process_count`` or is larger than the training split.
    """
    info = dataset_info(name, data_dir)
    if global_batch_size is not None:
        _local_batch(global_batch_size, process_count)
        if info.steps_per_epoch(global_batch_size) == 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} is larger than the {info.num_train} "
                f"training examples of {name!r}: not one full batch per epoch."
            )
    return info


def train_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    augment: AugmentConfig | None = None,
    dtype: Any = np.float32,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    num_threads: int | None = None,
) -> tf.data.Dataset:
    """The ``tf.data.Dataset`` behind :func:`train_batches` (same arguments)."""
    return _train_plan(**locals()).dataset()


def _train_plan(
    name: str, *, data_dir, image_size, global_batch_size, seed, start_step, process_index, process_count, augment,
    dtype, shuffle_buffer_size, num_threads,
) -> _Plan:
    local = _local_batch(global_batch_size, process_count)
    _check_process(process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    augment = default_augment(name) if augment is None else augment
    source = open_source(name, data_dir)
    info = source.info
    steps = info.steps_per_epoch(global_batch_size)
    if steps == 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} is larger than the {info.num_train} "
            f"training examples of {name!r}: not one full batch per epoch."
        )
    base_key = _base_key(seed)
    out_dtype = tf.as_dtype(np.dtype(dtype))
    split = info.train_split

    # rows: (item, epoch, position); load(item) -> (image bytes, label) runs in the parallel
    # map below, so files are read concurrently, and only this process's rows are read.
    if isinstance(source, IndexedSource):

        def replay(batch: int) -> tf.data.Dataset:  # the rows from this run's batch `batch` on
            return _indexed_train(source, split, base_key, steps, global_batch_size, local, process_index,
                                  *divmod(start_step + batch, steps))

        rows = replay(0)
        load = source.reader(split)
    else:
        rows = _stream_train(source, split, base_key, steps, global_batch_size, local, process_index,
                             *divmod(start_step, steps), shuffle_buffer_size)
        replay = None
        load = _identity

    def preprocess(item, epoch, position):
        image_bytes, label = load(item)
        key = _fold(_fold(_fold(base_key, _AUGMENT), epoch), position)
        image = preprocess_train(image_bytes, key, image_size, augment)
        return {"image": tf.cast(image, out_dtype), "label": label}

    return _Plan(source, split, rows, preprocess, local, num_threads, replay)


def train_batches(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    augment: AugmentConfig | None = None,
    dtype: Any = np.float32,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    num_threads: int | None = None,
) -> Iterator[Batch]:
    """Endless iterator of this process's training batches, starting at step ``start_step``.

    Each batch is ``{'image': dtype [L, image_size, image_size, 3] normalized,
    'label': int32 [L]}`` with ``L = global_batch_size // process_count``; it is rows
    ``[process_index * L, (process_index + 1) * L)`` of the global batch, and the global
    batch at step ``k`` is a pure function of ``(dataset, seed, k, global_batch_size,
    image_size, augment)``: the same whatever ``process_count`` or ``start_step``. An
    epoch is ``num_train // global_batch_size`` steps (the remainder is dropped) and is
    reshuffled from ``(seed, epoch)``.

    Args:
      name: ``'digits'``, ``'folder'`` or a prepared TFDS builder name.
      data_dir: the folder root for ``'folder'``, the TFDS data directory for TFDS
        (``None``: TFDS's default), unused for ``'digits'``.
      image_size: output side in pixels.
      global_batch_size: examples per step over all processes.
      seed: the run's data seed (0 <= seed < 2**63).
      start_step: the first step to yield (to resume a run).
      process_index, process_count: this process and the number of processes.
      augment: crop / flip settings; ``None`` takes :func:`default_augment` of ``name``.
      dtype: image dtype (``np.float32``; ``jnp.bfloat16`` works too).
      shuffle_buffer_size: TFDS streams only (in-memory sources permute exactly).
      num_threads: tf.data's private thread pool size (``None``: all cores).
    """
    return _train_plan(**locals()).batches()


def eval_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    augment: AugmentConfig | None = None,
    dtype: Any = np.float32,
    num_threads: int | None = None,
) -> tf.data.Dataset:
    """The ``tf.data.Dataset`` behind :func:`eval_batches` (same arguments)."""
    return _eval_plan(**locals()).dataset()


def _eval_plan(
    name: str, *, data_dir, image_size, global_batch_size, process_index, process_count, augment, dtype, num_threads,
) -> _Plan:
    local = _local_batch(global_batch_size, process_count)
    _check_process(process_index, process_count)
    augment = default_augment(name) if augment is None else augment
    source = open_source(name, data_dir)
    info = source.info
    split = info.eval_split
    n = info.num_eval
    num_batches = info.eval_steps(global_batch_size)
    out_dtype = tf.as_dtype(np.dtype(dtype))

    # rows: (item, mask), as in train_dataset.
    if isinstance(source, IndexedSource):

        def locate(i):
            position = _global_position(i, global_batch_size, local, process_index)
            return tf.minimum(position, n - 1), position < n

        def replay(batch: int) -> tf.data.Dataset:
            return tf.data.Dataset.range(batch * local, num_batches * local).map(_plain(locate))

        rows = replay(0)
        load = source.reader(split)
    else:
        stream = source.stream(split)
        padded = stream.concatenate(stream.take(1).repeat(num_batches * global_batch_size - n))
        rows = padded.enumerate().filter(_process_filter(global_batch_size, local, process_index))
        rows = rows.map(_plain(lambda position, example: (example, position < n)))
        replay = None
        load = _identity

    def preprocess(item, mask):
        image_bytes, label = load(item)
        # Padding rows: zeros, label 0, mask False (not decoded).
        image = tf.cond(
            mask,
            lambda: preprocess_eval(image_bytes, image_size, augment),
            lambda: tf.zeros([image_size, image_size, 3], tf.float32),
        )
        label = tf.where(mask, label, 0)
        return {"image": tf.cast(image, out_dtype), "label": label, "mask": mask}

    return _Plan(source, split, rows, preprocess, local, num_threads, replay)


def eval_batches(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    augment: AugmentConfig | None = None,
    dtype: Any = np.float32,
    num_threads: int | None = None,
) -> Iterator[Batch]:
    """One pass over the eval split: ``ceil(num_eval / global_batch_size)`` batches per process.

    Each batch is ``{'image': dtype [L, image_size, image_size, 3], 'label': int32 [L],
    'mask': bool [L]}`` with ``L = global_batch_size // process_count``: rows
    ``[process_index * L, (process_index + 1) * L)`` of the global batch, which is the
    split's examples in their fixed order, the last one padded. Padding rows have
    ``mask`` False (zero image, label 0). Every process yields the same number of batches
    and every example is unmasked exactly once over all processes. The image is the
    central ``augment.eval_crop_fraction`` square resized to ``image_size``.

    Args: as :func:`train_batches` (``augment`` gives ``eval_crop_fraction`` and
    ``resize_method``).
    """
    return _eval_plan(**locals()).batches()


# ---------------------------------------------------------------------------------------
# Epoch orders


def _indexed_train(source: IndexedSource, split: str, base_key: tf.Tensor, steps: int, global_batch: int,
                   local: int, process_index: int, start_epoch: int, start_offset: int) -> tf.data.Dataset:
    """``(example index, epoch, position)`` of this process's rows, epoch after epoch.

    Only this process's positions are enumerated (arithmetically), so resuming and
    sharding cost nothing.
    """
    n = source.num_examples(split)

    def epoch_rows(epoch):
        first = tf.equal(epoch, start_epoch)
        start = tf.where(first, tf.constant(start_offset * local, tf.int64), tf.constant(0, tf.int64))
        shuffle_key = _fold(_fold(base_key, _SHUFFLE), epoch)

        def locate(i):
            position = _global_position(i, global_batch, local, process_index)
            index = tf.random.experimental.index_shuffle(position, shuffle_key, tf.constant(n - 1, tf.int64))
            return index, epoch, position

        return tf.data.Dataset.range(start, steps * local).map(_plain(locate))

    return tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch_rows)


def _stream_train(source: StreamSource, split: str, base_key: tf.Tensor, steps: int, global_batch: int,
                  local: int, process_index: int, start_epoch: int, start_offset: int,
                  buffer_size: int) -> tf.data.Dataset:
    """``((image bytes, label), epoch, position)`` for a TFDS stream.

    Every process reads the whole (still encoded) stream in the same shuffled order and
    keeps its own rows; only those are decoded. Reading is P-fold redundant over P
    processes, the price of batches that do not depend on the process count.
    """
    stream = source.stream(split)
    buffer_size = max(1, min(buffer_size, source.num_examples(split)))
    keep = _process_filter(global_batch, local, process_index)

    def epoch_rows(epoch):
        shuffle_key = _fold(_fold(base_key, _SHUFFLE), epoch)
        shuffle_seed = tf.random.stateless_uniform([], shuffle_key, minval=None, maxval=None, dtype=tf.int64)
        ds = stream.shuffle(buffer_size, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.take(steps * global_batch).enumerate()
        start = tf.where(tf.equal(epoch, start_epoch), tf.constant(start_offset * global_batch, tf.int64),
                         tf.constant(0, tf.int64))
        ds = ds.skip(start).filter(keep)
        return ds.map(_plain(lambda position, example: (example, epoch, position)))

    return tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch_rows)


# ---------------------------------------------------------------------------------------
# Helpers


def _identity(item):
    return item


def _first_line(error: tf.errors.OpError) -> str:
    """TensorFlow's message without the function and op context around it."""
    line = (error.message or type(error).__name__).strip().splitlines()[0]
    line = re.sub(r"^\{\{[^}]*\}\}\s*", "", line)  # {{function_node __wrapped__DecodeImage_device_...}}
    return re.sub(r"\s*\[Op:.*$", "", line).rstrip(" .")  # [Op:DecodeImage] name:


def _global_position(i: tf.Tensor, global_batch: int, local: int, process_index: int) -> tf.Tensor:
    """Position in the global order of this process's ``i``-th row: row ``p * L + i % L`` of batch ``i // L``."""
    return (i // local) * global_batch + process_index * local + i % local


def _process_filter(global_batch: int, local: int, process_index: int):
    def keep(position, _):
        return tf.equal((position % global_batch) // local, process_index)

    return _plain(keep)


def _fold(key: tf.Tensor, data) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _base_key(seed: int) -> tf.Tensor:
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}.")
    return tf.constant([int(seed), 0], tf.int64)


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count} (each process takes an equal share)."
        )
    return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")


def _options(num_threads: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True  # Parallel maps keep their input order.
    options.threading.private_threadpool_size = num_threads or os.cpu_count() or 1
    options.threading.max_intra_op_parallelism = 1  # Parallelism comes from the maps, not inside ops.
    options.experimental_optimization.map_parallelization = True
    options.experimental_optimization.parallel_batch = True
    return options
