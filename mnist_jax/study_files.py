"""What a study folder holds besides its runs: study.json (what the study is: its title,
its variants in order, the reference, which pairs are compared, whether the notebook's
Keras runs are quoted), summary.json and summary.md, and the summary of an interrupted
study.

Only records.py below it: the report reads these files, the study runner (study.py) and
the command line's folder claim (cli.py) write them, and none of the three needs to import
another to do so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mnist_jax import records
from mnist_jax.errors import UserError

STUDY_FILE = "study.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
COMPARISONS = ("reference", "all")  # each variant with the reference, or every pair


@dataclass(frozen=True)
class StudySpec:
    """What a study is, as its folder records it (study.json).

    Args:
      title: the heading of summary.md.
      variants: the variants' names in the study's order; each is its run's folder.
      reference: the variant the others are compared with (default: the first).
      comparisons: "reference" (each variant with the reference) or "all" (every pair).
      notebook: quote the Keras notebook's single runs beside variants with its conv
        features (the depth study only: another study's models are not the notebook's).
    """
    title: str
    variants: tuple[str, ...]
    reference: str | None = None
    comparisons: str = "reference"
    notebook: bool = False

    def __post_init__(self):
        if isinstance(self.variants, (str, bytes)):
            raise ValueError(f"variants must be a sequence of names, got {self.variants!r}")
        variants = tuple(self.variants)
        object.__setattr__(self, "variants", variants)
        if self.reference is None and variants:
            object.__setattr__(self, "reference", variants[0])
        if not isinstance(self.title, str) or not self.title.strip():
            raise ValueError(f"a study needs a title, got {self.title!r}")
        if not variants:
            raise ValueError("a study needs at least one variant")
        for name in variants:
            if (not isinstance(name, str) or name in ("", ".", "..")
                    or any(c in name for c in "/\\\0") or name.startswith(".")):
                raise ValueError(f"variant name {name!r} cannot be a folder's name")
        if len(set(variants)) != len(variants):
            raise ValueError(f"variant names repeat: {list(variants)}")
        if self.reference not in variants:
            raise ValueError(f"reference {self.reference!r} is not one of the variants "
                             f"{list(variants)}")
        if self.comparisons not in COMPARISONS:
            raise ValueError(f"comparisons must be one of {COMPARISONS}, "
                             f"got {self.comparisons!r}")
        if not isinstance(self.notebook, bool):
            raise ValueError(f"notebook must be True or False, got {self.notebook!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "variants": list(self.variants)}

    @classmethod
    def from_dict(cls, d: dict) -> "StudySpec":
        return cls(**d)

    def pairs(self) -> list[tuple[str, str]]:
        """The comparisons as (baseline, variant) names, in the study's order: the
        reference is the baseline of every pair it is in."""
        if self.comparisons == "reference":
            return [(self.reference, v) for v in self.variants if v != self.reference]
        pairs = []
        for i, a in enumerate(self.variants):
            for b in self.variants[i + 1:]:
                pairs.append((b, a) if b == self.reference else (a, b))
        return pairs


def fallback_spec(names: list[str]) -> StudySpec:
    """For a folder without study.json (one `mnist_jax.train` run, or a study written
    before study.json): the runs in the order given, the first the reference, no notebook
    rows, and a title naming the runs."""
    names = list(names)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return StudySpec(title=f"MNIST: {listed}", variants=tuple(names))


def write_spec(out_dir: str | Path, spec: StudySpec) -> None:
    records.write_json(Path(out_dir) / STUDY_FILE, spec.to_dict())


def read_spec(out_dir: str | Path) -> StudySpec | None:
    """The folder's study.json, or None where it has none. A damaged one is a UserError
    naming it."""
    path = Path(out_dir) / STUDY_FILE
    if not path.is_file():
        return None
    try:
        d = records.read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"it holds a JSON {type(d).__name__}, not an object")
        return StudySpec.from_dict(d)
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"{path} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from None


def spec_differences(saved: StudySpec, spec: StudySpec) -> list[str]:
    """The fields where two descriptions of a study differ, in words."""
    a, b = saved.to_dict(), spec.to_dict()
    return [f"{key}: {a[key]!r} there, {b[key]!r} now" for key in a if a[key] != b[key]]


def write_interrupted_summary(out_dir: str | Path, run_dirs: list[str | Path]) -> dict:
    """After an interrupt: summary.json and summary.md say the study is unfinished, and
    how far each run got (its finished epochs, each seed's best so far)."""
    runs = []
    for run_dir in map(Path, run_dirs):
        run = {"name": run_dir.name, "dir": str(run_dir)}
        try:
            if (run_dir / records.RESULT_FILE).is_file():
                run["status"] = "finished"
            elif (run_dir / records.HISTORY_FILE).is_file():
                history = records.read_history(run_dir / records.HISTORY_FILE)
                run["status"] = "interrupted"
                run["seeds"] = [_seed_so_far(seed, [r for r in history if r["seed"] == seed])
                                for seed in dict.fromkeys(r["seed"] for r in history)]
            else:
                run["status"] = "not started" if not run_dir.exists() else "no epoch finished"
        except (ValueError, OSError, KeyError) as e:
            run["status"] = f"unreadable ({type(e).__name__})"
        runs.append(run)
    summary = {"status": "interrupted", "runs": runs}
    lines = ["# Interrupted", "", "The study did not finish; resume it with `--resume` and "
             "the same flags. Finished epochs so far:", ""]
    for run in runs:
        lines.append(f"- {run['name']}: {run['status']}")
        for seed in run.get("seeds", []):
            diverged = (f", diverged in epoch {seed['diverged_epoch']} (loss not finite)"
                        if seed["diverged_epoch"] is not None else "")
            best = (f"best val_accuracy so far {seed['best_val_accuracy']:.4f} (epoch "
                    f"{seed['best_epoch']})" if seed["best_epoch"] is not None else
                    "no result (no epoch before it diverged)")
            lines.append(f"  - seed {seed['seed']}: {seed['epochs_finished']} epoch(s)"
                         f"{diverged}, {best}")
    records.write_json(Path(out_dir) / SUMMARY_JSON, summary)
    records.atomic_write_text(Path(out_dir) / SUMMARY_MD, "\n".join(lines) + "\n")
    return summary


def _seed_so_far(seed: int, rows: list[dict]) -> dict:
    """A seed's finished epochs and its best so far, from the epochs before it diverged
    (one whose loss was not finite measures broken weights): none if it diverged first."""
    diverged = next((r["epoch"] for r in rows if r.get("diverged")), None)
    kept = [r for r in rows if diverged is None or r["epoch"] < diverged]
    best = max(kept, key=lambda r: (r["val_accuracy"], -r["epoch"])) if kept else None
    return {"seed": seed, "epochs_finished": len(rows), "diverged_epoch": diverged,
            "best_epoch": best["epoch"] if best else None,
            "best_val_accuracy": best["val_accuracy"] if best else None}
