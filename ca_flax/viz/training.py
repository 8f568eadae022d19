"""The pictures a training run leaves behind, hooked into the trainer by two calls.

* At each evaluation: the attention maps of one fixed evaluation image (the split's
  first) as a TensorBoard image, ``attention`` (CA and CBAM: the maps over the image; SE:
  its channel gates as bars; nothing for a model without attention).
* At the end: ``WORKDIR/curves.png`` (``ca_flax.viz.curves``), written atomically.

Only process 0 draws, from the replicated parameters fetched to its host, on its own
first device: nothing it does involves the other processes. A picture is never worth a
run: any failure (matplotlib missing, a plotting error) is a console warning and that
kind of picture is not tried again. ``config.write_pictures = False`` turns it all off.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

CURVES_FILE = "curves.png"


class TrainingPictures:
    """Draws the run's pictures; every method returns normally whatever happens."""

    def __init__(self, config: Any, model: Any, workdir: str | Path, writer: Any, steps_per_epoch: int) -> None:
        import jax

        from ca_flax.data import synthetic

        self.config, self.model, self.workdir, self.writer = config, model, Path(workdir), writer
        self.steps_per_epoch = steps_per_epoch
        self.enabled = jax.process_index() == 0 and bool(config.get("write_pictures", True))
        # The attention needs attention blocks and real images (not the synthetic benchmark).
        self.attention_enabled = (self.enabled and getattr(model, "attention", None) is not None
                                  and config.dataset != synthetic.NAME)
        self._image = None
        self._recorder = None

    def _warn(self, what: str, error: BaseException) -> None:
        from ca_flax.training.metrics import console

        console(f"Warning: {what} failed and is skipped from now on: {type(error).__name__}: {error}")
        if not isinstance(error, ImportError):
            console("".join(traceback.format_exception(error, limit=-3)).rstrip())

    def on_evaluation(self, step: int, state: Any) -> None:
        """Logs the attention maps of the fixed evaluation image at ``step``."""
        if not self.attention_enabled:
            return
        try:
            self.writer.write_images(step, {"attention": self._attention_pixels(step, state)[None]})
        except Exception as error:  # noqa: BLE001 - a picture never stops a run
            self.attention_enabled = False
            self._warn("logging the attention maps to TensorBoard", error)

    def _attention_pixels(self, step: int, state: Any) -> Any:
        from ca_flax.training import parallel
        from ca_flax.viz.attention import attention_figure, gate_recorder, model_attention
        from ca_flax.viz.images import to_display
        from ca_flax.viz.plotting import figure_class, figure_pixels

        figure_class()  # fail with the install hint before computing anything
        if self._image is None:
            self._image = self._first_eval_image()
            self._recorder = gate_recorder(self.model)
        variables = parallel.fetch({"params": state.params, "batch_stats": state.batch_stats})
        _, blocks = model_attention(self.model, variables, self._image, self._recorder)
        figure = attention_figure(to_display(self._image[0]), blocks, title=f"step {step}")
        return figure_pixels(figure, dpi=72)

    def _first_eval_image(self) -> Any:
        import jax
        from ca_flax import data

        config = self.config
        batch = next(data.eval_batches(config.dataset, data_dir=config.data_dir, image_size=config.image_size,
                                       global_batch_size=1))
        return jax.device_put(batch["image"][:1], jax.local_devices()[0])

    def on_end(self) -> None:
        """Writes ``WORKDIR/curves.png`` from the run's ``metrics.jsonl``."""
        if not self.enabled:
            return
        try:
            from ca_flax.viz.curves import plot_curves, read_run
            from ca_flax.viz.plotting import save_figure

            run = read_run(self.workdir, steps_per_epoch=self.steps_per_epoch)
            save_figure(plot_curves([run]), self.workdir / CURVES_FILE)
        except Exception as error:  # noqa: BLE001 - the run is done; the picture is an extra
            self._warn(f"writing {self.workdir / CURVES_FILE}", error)
