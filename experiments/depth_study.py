"""Does a third convolution help? The notebook's two CNNs, trained with its protocol.

    python -m experiments.depth_study --data-dir ../shared/mnist

Trains conv (32, 32) and conv (32, 32, 64), each with Dense(128) + Dropout(0.5) + Dense(10),
Adam 1e-3, batch 32, at most 20 epochs, validating on the 10k test set each epoch, early
stopping on val_accuracy with patience 5 and the best weights restored. Writes into --out
(default runs/depth_study/<date-time>) a folder per model (config.json, history.csv,
result.json, checkpoints/best/<epoch>/) and summary.json, summary.md and curves.png.

Expect about 99.2-99.4% best val accuracy for 2-conv and 98.6-99.0% for 3-conv (seeds 0-2
gave 99.19/99.38/99.43% and 98.91/98.91/98.82%); on the 2-core development CPU about 6 s
per epoch and 3 to 4 minutes for the whole study. On a GPU: not measured yet.
"""

from __future__ import annotations

import sys

from mnist_jax import cli, report
from mnist_jax.config import ModelConfig
from mnist_jax.train import fit

VARIANTS = {
    "2conv": ModelConfig(conv_features=(32, 32)),
    "3conv": ModelConfig(conv_features=(32, 32, 64)),
}


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m experiments.depth_study",
        description="Train the 2-conv and 3-conv CNNs on MNIST with the notebook's protocol "
                    "and write their comparison (summary.json, summary.md, curves.png).")
    cli.add_training_args(parser, default_out="runs/depth_study")
    args = parser.parse_args(argv)

    def run():
        train_config = cli.train_config(args)
        out = cli.check_out_dir(args.out, args.default_out)
        splits = cli.load_splits(args)
        diverged = []
        for name, model_config in VARIANTS.items():
            result = fit(cli.model_config(args, model_config), train_config, splits, out / name,
                         name=name)
            diverged.append((name, result.diverged))
        summary = report.write_study_report(out, [out / name for name in VARIANTS])
        print(report.format_text(summary))
        print(f"wrote {out}")
        cli.check_finite(diverged)

    return cli.run_main(run)


if __name__ == "__main__":
    sys.exit(main())
