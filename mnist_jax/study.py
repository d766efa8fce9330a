"""A study is its variants: a mapping name -> model, each trained over the shared
command-line flags into `<out>/<name>`, then compared by the report. A study module is its
variants, a docstring and a main that calls `main` here:

    VARIANTS = {"w16": ModelConfig(conv_features=(16, 16)), ...}

    def main(argv=None) -> int:
        return study.main(VARIANTS, prog="python -m experiments.width_study", description=...,
                          title="MNIST: how wide?", reference="w32", comparisons="all", argv=argv)

Before training, the study writes what it is into its folder (study.json: title, variants
in order, reference, comparisons, the notebook's rows or not), so that the report, and any
redraw with `python -m mnist_jax.report`, takes them from there and not from folder names.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

from mnist_jax import cli, processes, records, report
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.errors import UserError
from mnist_jax.recorder import finished_with_settings
from mnist_jax.study_files import (STUDY_FILE, StudySpec, fallback_spec, read_spec,
                                   spec_differences, write_spec)
from mnist_jax.train import fit


def run_study(variants: Mapping[str, Any], args: argparse.Namespace, out: str | Path, *,
              spec: StudySpec | None = None, train_config: TrainConfig | None = None) -> dict:
    """Train every variant into `out/<name>` and write the comparison; with `args.resume`,
    keep the finished variants and continue the others.

    Args:
      variants: name -> model, in the study's order; a ModelConfig gets the formulation
        flags (--conv-impl, --pool-impl); any other model goes to fit() as it is.
      args: the parsed shared flags (cli.add_training_args).
      out: the study's folder, already claimed (cli.claimed_out).
      spec: what the study is (names as in `variants`), written first as study.json; on
        --resume, a folder holding another study is refused. Default: the variants in
        order, the first the reference, a title naming them (study_files.fallback_spec).
      train_config: default cli.train_config(args).

    Returns:
      The summary (report.build_summary). Raises TrainingDiverged, after everything is
      written, where a seed's loss became NaN or infinite.
    """
    spec = fallback_spec(list(variants)) if spec is None else spec
    if list(variants) != list(spec.variants):
        raise ValueError(f"the variants {list(variants)} are not the study's "
                         f"{list(spec.variants)}")
    out = Path(out)
    train_config = cli.train_config(args) if train_config is None else train_config
    with processes.agreed():
        described = _describe(out, spec)
    try:
        splits = cli.load_splits(args)
        diverged = []
        for name, model_config in variants.items():
            if isinstance(model_config, ModelConfig):
                model_config = cli.model_config(args, model_config)
            if args.resume and finished_with_settings(out / name, model_config, train_config,
                                                      splits):
                cli.log(f"[{name}] finished in an earlier run: kept")
                diverged.append((name, report.diverged_seeds(out / name)))
                continue
            result = fit(model_config, train_config, splits, out / name,
                         name=name, resume=args.resume)
            diverged.append((name, result.diverged))
    except Exception:
        # Refused before anything else was written: the folder's claim can still be
        # undone (records.RunDir), so the same --out can be used again.
        if (described and processes.is_writer()
                and {p.name for p in out.iterdir()} == {records.LOCK_FILE, STUDY_FILE}):
            (out / STUDY_FILE).unlink()
        raise
    summary = write_report(out, [out / name for name in spec.variants])
    cli.check_finite(diverged)
    return summary


def write_report(out: Path, run_dirs: list[Path]) -> dict | None:
    """The comparison of `run_dirs`, written into `out` and printed (by process 0 of
    several: the others return None)."""
    with processes.agreed():
        summary = report.write_study_report(out, run_dirs) if processes.is_writer() else None
    if summary is not None:
        print(report.format_text(summary))
        print(f"wrote {out}")
    return summary


def _describe(out: Path, spec: StudySpec) -> bool:
    """Write study.json into `out`, or check the one there (a resumed study); whether it
    was written now."""
    saved = read_spec(out)
    if saved is None:
        if processes.is_writer():
            write_spec(out, spec)
        return True
    differences = spec_differences(saved, spec)
    if differences:
        raise UserError(f"cannot resume {out}: it holds another study "
                        f"({'; '.join(differences)})")
    return False


def main(variants: Mapping[str, Any], *, prog: str, description: str, title: str,
         reference: str | None = None, comparisons: str = "reference", notebook: bool = False,
         argv: list[str] | None = None, default_out: str | None = None) -> int:
    """A study's command line: the shared training flags, the folder claimed, run_study,
    errors as one line (cli.run_main). Returns the exit status.

    Args:
      variants: name -> model (a ModelConfig, or a model fit() takes), in the study's order.
      prog: the command, as the help and the resume hint print it
        ("python -m experiments.width_study").
      description: the --help text.
      title: summary.md's heading.
      reference: the variant the others are compared with (default: the first).
      comparisons: "reference" (each variant with the reference) or "all" (every pair);
        with more than one comparison the p-values are Holm-corrected.
      notebook: quote the Keras notebook's runs in the table (the depth study only).
      argv: the arguments (default: sys.argv[1:]).
      default_out: the root of the default --out (default: runs/<the module's last name>).
    """
    spec = StudySpec(title=title, variants=tuple(variants), reference=reference,
                     comparisons=comparisons, notebook=notebook)
    parser = cli.ArgumentParser(prog=prog, description=description)
    cli.add_training_args(parser, default_out=default_out or
                          f"runs/{prog.split()[-1].rsplit('.', 1)[-1]}")
    args = parser.parse_args(argv)

    def run():
        train_config = cli.train_config(args)
        with cli.claimed_out(args, lambda out: [out / name for name in spec.variants],
                             study=True) as claim:
            run_study(variants, args, claim.path, spec=spec, train_config=train_config)

    return cli.run_main(run, debug=args.debug, args=args)
