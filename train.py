"""Train and evaluate a ca-flax model: ``python train.py [--config=configs/...] [--workdir=...]``.

``python train.py --help`` lists the flags and every ``--config.FIELD``; docs/training.md
has the commands. The command line itself is ``ca_flax.training.cli``.
"""

import sys

from ca_flax._extras import MissingExtraError, require

try:  # before ca_flax.training's imports, so a missing package is named with its extra
    require("train.py", "train")
except MissingExtraError as missing_extra:
    print(f"error: {missing_extra}", file=sys.stderr)
    sys.exit(2)

from ca_flax.training.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
