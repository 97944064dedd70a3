"""`make results`: run every experiment preset at its CPU size and write docs/results.md.

Each section holds the preset's own description (its file's header comment), the command that
made it, the summary over seeds, the structure figures, and — where a closed form exists — how
many grid points land on it, as computed by `report.theory_agreement`, never written by hand.

    python -m symrun.gallery [--only NAME ...] [--outputs DIR] [--docs DIR]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pandas as pd

from symrun.sweeping import job, results, sweep
from symrun.analysis import report
from symrun.config import CONFIG_DIR
from symrun.models import registry

# Narrative order; presets not listed follow alphabetically.
ORDER = ["rescaling_sparsity", "symmetry_removal", "dead_neurons", "rotation_low_rank", "rotation_noise",
         "attention_rank", "transformer_rank", "dcs", "permutation_homogeneity", "neural_collapse", "plasticity"]
# Presets that read data a user supplies (not on the machine that builds the gallery).
NEEDS_DATA = {"resnet_cifar": "data.root=DIR (a CIFAR-10 folder)"}


def presets() -> list[str]:
    names = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if p.stem not in NEEDS_DATA)
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def description(name: str) -> list[str]:
    """The preset file's header comment, one string per paragraph line."""
    lines = []
    for line in (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            lines.append(line[1:].strip())
    return lines


def run_preset(name: str, outputs: Path) -> tuple[list[Path], float]:
    """Train a preset's whole grid (a suite: each member's) in this process; (sweep folders, seconds)."""
    start = time.perf_counter()
    dirs = []
    for plan in sweep.plans([f"experiment={name}"], outputs):
        sweep.write_plan(plan)
        job.run_plan(plan)
        dirs.append(plan.sweep_dir)
    return dirs, time.perf_counter() - start


def section(name: str, sweep_dirs: Path | list[Path], seconds: float, docs: Path) -> str:
    """A preset's section; a suite's holds one sub-section per member sweep."""
    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    figures_dir = docs / "results" / name
    shutil.rmtree(figures_dir, ignore_errors=True)
    figures_dir.mkdir(parents=True)
    text = description(name)
    out = [f"## {name}", "", f"**{text[0]}**" if text else "", ""]
    out += [" ".join(ln for ln in text[1:] if ln), ""] if len(text) > 1 else []
    reports = [report.build(d) for d in dirs]
    counts: dict[str, int] = {}
    for rep in reports:
        for status, n in rep.status_counts.items():
            counts[status] = counts.get(status, 0) + int(n)
    out += ["```bash", f"symrun sweep experiment={name}", "```", "",
            f"{sum(counts.values())} runs, {report.status_line(counts)}; {seconds:.0f} s on this machine.", ""]
    for d, rep in zip(dirs, reports):
        member = d.name if len(dirs) > 1 else None
        if member:
            out += [f"### {member}", ""]
        out += _body(d, rep, figures_dir / member if member else figures_dir, f"{name}/{member}" if member else name)
    return "\n".join(out)


def _body(sweep_dir: Path, rep: report.Report, figures_dir: Path, link: str) -> list[str]:
    """One sweep's agreement line, structure figures (copied under docs/) and summary table."""
    structure = {m for spec in registry.specs().values() for m in spec.primary}
    figures_dir.mkdir(parents=True, exist_ok=True)
    out = []
    agreement = report.theory_agreement(sweep_dir)
    if agreement:
        out += ["Against theory: " + "; ".join(agreement) + ".", ""]
    contrast = report.removal_contrast(sweep_dir)
    if contrast:
        out += ["Symmetry removal, the final value's range over the grid (means over seeds): " + "; ".join(contrast) + ".", ""]
    for fig in rep.figures:
        if (any(fig.name.startswith(f"phase_{m}_") or fig.name.startswith(f"heatmap_{m}_") for m in structure)
                or fig.name in {f"tasks_{m}.png" for m in ("accuracy", "dead_units", "feature_effective_rank")}):
            shutil.copy2(fig, figures_dir / fig.name)
            out += [f"![{fig.stem}](results/{link}/{fig.name})", ""]
    out += [_markdown(rep.summary), ""]
    return out


def _markdown(summary: pd.DataFrame) -> str:
    """mean ± std columns as one markdown table (no extra dependency)."""
    if summary.empty:
        return ""
    cols = [c for c in summary.columns if not c.endswith(" std")]
    head = [c.removesuffix(" mean") for c in cols]
    rows = []
    for _, row in summary.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cell = f"{v:.4g}" if isinstance(v, float) else str(v)
            std = row.get(c.replace(" mean", " std")) if c.endswith(" mean") else None
            cells.append(cell + (f" ± {std:.1g}" if std is not None and std == std else ""))
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="presets to run (default: all)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs") / "gallery")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    names = args.only or presets()
    sections = []
    for name in names:
        sweep_dirs, seconds = run_preset(name, args.outputs)
        print(f"{name}: {seconds:.0f} s → {', '.join(map(str, sweep_dirs))}", flush=True)
        sections.append(section(name, sweep_dirs, seconds, args.docs))
    header = ["# Results", "",
              "Every preset of `configs/experiment/`, run at its CPU-sized default by `make results`",
              "(`python -m symrun.gallery`), which writes this file. Each section: what the preset shows",
              "(its own description), the command, the agreement with the closed form where one exists",
              "(computed), the figures and the summary over seeds.", "",
              "Not run here, as they read data a user supplies: "
              + ", ".join(f"`symrun sweep experiment={n} {need}`" for n, need in NEEDS_DATA.items()) + ".", ""]
    results.write_atomic(args.docs / "results.md", "\n".join(header + sections))
    print(f"wrote {args.docs / 'results.md'}")


if __name__ == "__main__":
    main()
