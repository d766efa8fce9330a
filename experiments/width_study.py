"""How wide should the two convolutions be? The notebook's 2-conv CNN with 16, 32 (the
notebook's) and 64 features per convolution, over several seeds, every pair compared.

    python -m experiments.width_study --data-dir ../shared/mnist

The same flags, protocol, files and --resume as experiments/depth_study.py; w32 is the
reference, and the three pairwise Welch tests are Holm-corrected. Written with the library
API alone (mnist_jax/study.py): a new study is its variants.
"""

from __future__ import annotations

import sys

from mnist_jax import study
from mnist_jax.config import ModelConfig

VARIANTS = {f"w{w}": ModelConfig(conv_features=(w, w)) for w in (16, 32, 64)}


def main(argv=None) -> int:
    return study.main(
        VARIANTS, prog="python -m experiments.width_study",
        description="Train the 2-conv CNN with 16, 32 and 64 features per convolution and "
                    "compare every pair (summary.json, summary.md, curves.png).",
        title="MNIST: how wide should the convolutions be?", reference="w32",
        comparisons="all", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
