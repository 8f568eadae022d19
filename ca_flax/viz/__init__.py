"""Seeing what a model does: predictions on image files, attention maps, training curves.

* ``images``: image files through a checkpoint's own evaluation preprocessing.
* ``labels``: class names (dataset's, ImageNet's from an installed list).
* ``attention``: the attention blocks' gates (sown by the blocks) as maps and pictures.
* ``curves``: ``metrics.jsonl`` as loss / accuracy / learning-rate curves.
* ``plotting``: headless matplotlib figures and atomic picture files.
* ``cli``: options the command lines share.
* ``training``: the trainer's hooks (TensorBoard attention images, ``curves.png``).

The command lines are ``python -m ca_flax.predict`` and ``python -m ca_flax.visualize``.
Pictures need matplotlib: ``pip install 'ca-flax[viz]'``. Importing this package
imports neither matplotlib nor JAX nor TensorFlow.
"""
