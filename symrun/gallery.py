"""`make results`: run every experiment preset at its CPU size and write docs/results.md.

Each section holds the preset's own description (its file's header comment), then the report.md
of each of its sweeps (symrun.analysis.document: the command, the grid, the agreement with theory, the
figures, the summary, the runs to look at), so the gallery and a sweep's report are one text.

    python -m symrun.gallery [--only NAME ...] [--outputs DIR] [--docs DIR]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from symrun.analysis import document, report
from symrun.sweeping import job, results, sweep
from symrun.config import CONFIG_DIR

# Narrative order; presets not listed follow alphabetically.
ORDER = ["rescaling_sparsity", "symmetry_removal", "dead_neurons", "rotation_low_rank", "rotation_noise", "lr_drop",
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
    """A preset's section: its description, then each member sweep's report.md (symrun.analysis.document)
    with its headings one level down and its gallery figures copied under docs/results/."""
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
    out += [f"{sum(counts.values())} runs, {report.status_line(counts)}; {seconds:.0f} s on this machine.", ""]
    for d, rep in zip(dirs, reports):
        member = d.name if len(dirs) > 1 else None
        target = figures_dir / member if member else figures_dir
        link = _linker(target, f"results/{name}/{member}" if member else f"results/{name}", report.structure_metrics(rep.runs))
        body = document.render(d, rep, link, level=3 if member else 2)
        out += (body.split("\n", 2)[2:] if not member else [body]) + [""]   # a lone sweep: the preset's heading is its own
    return "\n".join(out)


def shown(figure: Path, structure: list[str]) -> bool:
    """The figures the gallery copies: the structure metrics' phase diagrams, heatmaps and
    learning curves, and the plasticity curves (the rest stay in the sweep folder)."""
    stem = figure.stem
    return figure.suffix == ".png" and (
        any(stem.startswith(f"phase_{m}_vs") or stem.startswith(f"heatmap_{m}_") or stem == f"curves_{m}" for m in structure)
        or stem in {f"tasks_{m}" for m in ("accuracy", "dead_units", "feature_effective_rank")})


def _linker(figures_dir: Path, prefix: str, structure: list[str]):
    def link(figure: Path):
        if not shown(figure, structure):
            return None
        figures_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(figure, figures_dir / figure.name)
        return f"{prefix}/{figure.name}"
    return link


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
              "(its own description), then its sweep's report.md as `symrun report` writes it: the command,",
              "the grid, the agreement with the closed form where one exists (computed), the figures, the",
              "summary over seeds and the runs to look at.", "",
              "Not run here, as they read data a user supplies: "
              + ", ".join(f"`symrun sweep experiment={n} {need}`" for n, need in NEEDS_DATA.items()) + ".", ""]
    results.write_atomic(args.docs / "results.md", "\n".join(header + sections))
    print(f"wrote {args.docs / 'results.md'}")


if __name__ == "__main__":
    main()
