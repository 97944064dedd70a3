"""`symrun bench`'s headline: a sweep as its user runs it, timed as a whole process.

`symrun sweep ARGS` (start-up, planning, training, the default metrics with λ_c, tables,
figures) against the two scripts a PyTorch user would write for the same grid
(symrun.baselines: a lean loop per run and the torch.func ensembling recipe), each its own
process run with this Python, one after another. The lean loop trains the runs one after
another, so it is timed on its first `lean_runs` runs and scaled: its start-up (the process's
time outside training) plus its training time × runs / lean_runs. The three ways are timed in
`repeat` rounds, each round one of each back to back, so a machine whose speed drifts over
minutes (a shared host's) slows a round's three alike: the table gives each way's fastest, and
the ratios within each round say how far the drift moved them. A cProfile of one more
`symrun sweep` process says where its time goes, by phase (`PHASES`); the share of the sweep
outside its training steps is set against its floor (`Result.floor`): the start-up any torch
command line pays and the default metrics, which must stay, with nothing else.
"""

from __future__ import annotations

import contextlib
import os
import pstats
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from symrun import baselines

W1_DECAYS = "0,0.0001,0.0003,0.001,0.003,0.01,0.03,0.1"
HADAMARD_DECAYS = ",".join(f"{i / 100:g}" for i in range(17))       # 0, 0.01, …, 0.16


@dataclass
class Grid:
    """One workload: the `symrun sweep` arguments and the baseline scripts' arguments for it."""

    name: str
    short: str
    runs: int
    sweep: list[str]
    script: list[str]
    lean_runs: int                    # runs the lean loop is timed on, then scaled to `runs`
    files: dict[str, str] = field(default_factory=dict)   # written into the sweep's folder first: a user's module


def w1(steps: int, seeds: int = 32, lean_runs: int = 16) -> Grid:
    """The issue's W1 grid: 64-128-10 tanh MLP on digits, batch 64, SGD lr 0.05, 8 wd × 32 seeds."""
    return Grid(f"W1: mlp 64-128-10 tanh, digits, batch 64, SGD, {steps} steps — 8 wd × {seeds} seeds", "W1", 8 * seeds,
                ["model=mlp", "model.width=128", "model.activation=tanh", "data=digits", "data.batch_size=64",
                 "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0", f"train.steps={steps}", f"train.log_every={steps}",
                 f"optim.weight_decay={W1_DECAYS}", f"seed=range(0,{seeds})"],
                ["--model", "mlp", "--batch", "64", "--lr", "0.05", "--wds", W1_DECAYS, "--seeds", str(seeds),
                 "--steps", str(steps)], min(lean_runs, 8 * seeds))


# W1's network as a user writes it: a plain nn.Module, trained by symrun through torch.func (model=module)
W1_MODULE = """import torch
from torch import nn


class W1(nn.Module):
    def __init__(self, d_in=64, width=128, d_out=10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, width), nn.Linear(width, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))
"""


def w1_module(steps: int, seeds: int = 32, lean_runs: int = 16) -> Grid:
    """W1 with the network as the user's own nn.Module (model=module): the same baselines."""
    base = w1(steps, seeds, lean_runs)
    sweep = ["model=module", "model._target_=w1net.W1", *base.sweep[3:]]     # model, width and activation are the module's
    return Grid(base.name.replace("W1: mlp", "W1 as your own nn.Module (model=module):"), "W1 module", base.runs, sweep,
                base.script, base.lean_runs, {"w1net.py": W1_MODULE})


def hadamard(steps: int, seeds: int = 256, lean_runs: int = 64) -> Grid:
    """The issue's large grid: the Hadamard model on a 200 × 20 teacher, full-batch GD at lr 0.1,
    17 wd × 256 seeds = 4,352 runs."""
    return Grid(f"Hadamard d=20, n=200, full-batch GD, {steps} steps — 17 wd × {seeds} seeds", "Hadamard", 17 * seeds,
                ["model=hadamard", "data.batch_size=null", f"train.steps={steps}", f"train.log_every={steps}",
                 f"optim.weight_decay={HADAMARD_DECAYS}", f"seed=range(0,{seeds})"],
                ["--model", "hadamard", "--lr", "0.1", "--wds", HADAMARD_DECAYS, "--seeds", str(seeds),
                 "--steps", str(steps)], min(lean_runs, 17 * seeds))


# Where a sweep's time goes: each phase is the cumulative time of these functions in the profile
# (file name, function name); "training steps" is train_pack without its evaluations and λ_c;
# what no phase claims (interpreter start-up, imports, the CLI, Hydra's launcher) is the rest.
PHASES: list[tuple[str, list[tuple[str, str]]]] = [
    ("planning: compose and check every config, load data, size packs",
     [("sweep.py", "sweeper_plans")]),
    ("writing the plan (a config.yaml per run)", [("sweep.py", "write_plan")]),
    ("the pack job building its configs", [("job.py", "pack_configs")]),
    ("training steps", [("engine.py", "train_pack")]),
    ("metrics at step 0 and at the end", [("engine.py", "log")]),
    ("critical weight decay λ_c", [("critical.py", "at_end")]),
    ("writing the runs' files", [("results.py", "write_runs")]),
    # built by a child process forked as the sweep starts (symrun.sweeping.reporter), which cProfile
    # does not see: the sweep's wait for it, or the report itself where it is built in the sweep
    ("tables and figures", [("reporter.py", "report")]),
]
# a phase whose functions run inside another's: subtracted from the outer one
INSIDE = {"training steps": ["metrics at step 0 and at the end", "critical weight decay λ_c"]}


def phases(profile: Path) -> dict[str, float]:
    """Seconds per phase of a profiled `symrun sweep` process, the rest, the total, and (not a
    phase: it overlaps them) the time spent importing modules."""
    stats = pstats.Stats(str(profile)).stats

    def cumulative(file: str, function: str) -> float:
        return sum(row[3] for (f, _, name), row in stats.items() if name == function and f.endswith(file))

    raw = {label: sum(cumulative(f, fn) for f, fn in funcs) for label, funcs in PHASES}
    out = {label: raw[label] - sum(raw[inner] for inner in INSIDE.get(label, [])) for label in raw}
    total = max(row[3] for row in stats.values())
    out["start-up, imports, the CLI and Hydra's launcher (the rest)"] = total - sum(out.values())
    out["total"] = total
    out["of which importing modules"] = cumulative("<frozen importlib._bootstrap>", "_find_and_load")
    return out


@dataclass
class Timing:
    wall: float
    cpu: float                        # the child process's user + system seconds
    stdout: str


def timed(cmd: list[str], cwd: Path) -> Timing:
    """Run `cmd` as a child process in `cwd`, with this checkout of symrun importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       *filter(None, [os.environ.get("PYTHONPATH")])]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(cmd[:4])} … exited with {done.returncode}: {tail}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Timing(wall, cpu, done.stdout)


def sweep_seconds(out: Path) -> tuple[float, float]:
    """(training steps, the rest of its packs' time) of the finished sweep in the outputs folder
    `out`, each summed over packs: a pack's train_time_s, and its wall_time_s less that — its
    start, the metrics at step 0 and at the end, and λ_c (runs.csv; the runs of a pack share
    both)."""
    from symrun.sweeping import results

    tables = sorted(Path(out).glob("*/*/runs.csv"))
    if len(tables) != 1:
        raise RuntimeError(f"expected one sweep's runs.csv under {out}, found {len(tables)}")
    packs = results.read_csv(tables[0]).groupby("pack")[["train_time_s", "wall_time_s"]].max()
    return float(packs["train_time_s"].sum()), float((packs["wall_time_s"] - packs["train_time_s"]).sum())


# The start-up every symrun sweep pays whatever symrun does: a Python process importing torch, and
# the libraries its command line is made of (Hydra, OmegaConf, Typer), less a bare interpreter's
# start (counted once, in torch's).
FLOOR_IMPORTS = ("import torch", "import hydra, omegaconf, typer", "pass")


def startup_floor(times: list[tuple[float, ...]]) -> float:
    """Seconds of the start-up floor from rounds of FLOOR_IMPORTS' processes (seconds each, in
    that order), each process's fastest taken."""
    torch_, cli, bare = (min(column) for column in zip(*times))
    return torch_ + max(0.0, cli - bare)


def trained_seconds(stdout: str) -> float:
    match = re.search(r"train_seconds=([0-9.]+)", stdout)
    if match is None:
        raise RuntimeError(f"a baseline script printed no train_seconds: {stdout[-200:]!r}")
    return float(match.group(1))


@dataclass
class Result:
    grid: Grid
    sweep: Timing
    lean: Timing                      # on grid.lean_runs runs
    lean_scaled: float                # seconds for every run of the grid
    torch_func: Timing
    profile: dict[str, float]
    rounds: list[tuple[float, float, float]] = field(default_factory=list)   # (sweep, lean scaled, torch.func) s
    sweep_trained: float = 0.0        # of the fastest sweep's seconds, those in its training steps
    sweep_metrics: float = 0.0        # … and those in its packs outside the steps (`sweep_seconds`)
    startup: float = 0.0              # the start-up floor (`startup_floor`), its processes timed in each round

    def around(self) -> float:
        """The share of the fastest sweep's wall clock outside its training steps."""
        return 1 - self.sweep_trained / self.sweep.wall

    def floor(self) -> float:
        """The share of a sweep outside training that the issue's own terms fix: the start-up
        floor and the default metrics as computed (λ_c included), over them and the steps —
        what 'around training' would be with nothing else at all (no planning, files, tables
        or figures)."""
        fixed = self.startup + self.sweep_metrics
        return fixed / (fixed + self.sweep_trained)

    def ratios(self, baseline: int) -> list[float]:
        """Per round: the baseline's seconds (1 lean loop, 2 torch.func) over the sweep's."""
        return [r[baseline] / r[0] for r in self.rounds]


def measure(grid: Grid, device: str, repeat: int = 1, say: Callable[[str], None] = print,
            where: Optional[Path] = None) -> Result:
    """Every way on `grid` on `device` in `repeat` rounds (each round the three back to back; the
    fastest of each way kept, and every round's seconds), then one profiled sweep; in a new
    folder inside `where` (default: a temporary folder, removed afterwards)."""
    with contextlib.ExitStack() as stack:
        if where is None:
            where = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="symrun-bench-")))
        work = Path(tempfile.mkdtemp(prefix="grid-", dir=where))
        for name, source in grid.files.items():
            (work / name).write_text(source)
        scripts = {}
        for name, source in baselines.SCRIPTS.items():
            scripts[name] = work / f"{name}.py"
            scripts[name].write_text(source)
        python = sys.executable
        args, script = [*grid.sweep, f"device={device}"], [*grid.script, "--device", device]
        sweep_cmd = lambda out: [python, "-m", "symrun", "sweep", "--outputs", str(work / out), *args]  # noqa: E731

        def scaled(t: Timing) -> float:
            train = trained_seconds(t.stdout)
            return t.wall - train + train * grid.runs / grid.lean_runs

        sweeps, leans, funcs, imports = [], [], [], []
        for i in range(repeat):           # a round: one of each, back to back, and the start-up floor's processes
            sweeps.append(timed(sweep_cmd(f"sweep-{i}"), work))
            leans.append(timed([python, str(scripts["lean"]), *script, "--runs", str(grid.lean_runs),
                                "--out", str(work / "lean.csv")], work))
            funcs.append(timed([python, str(scripts["torch_func"]), *script, "--out", str(work / "func.csv")], work))
            imports.append(tuple(timed([python, "-c", code], work).wall for code in FLOOR_IMPORTS))
            say(f"{grid.name}, round {i + 1}: symrun sweep {sweeps[-1].wall:.1f} s, lean loop {leans[-1].wall:.1f} s on "
                f"{grid.lean_runs} runs → {scaled(leans[-1]):.1f} s for {grid.runs}, torch.func {funcs[-1].wall:.1f} s")
        fastest = lambda ts: min(ts, key=lambda t: t.wall)  # noqa: E731
        sweep, lean, torch_func = fastest(sweeps), fastest(leans), fastest(funcs)
        trained, metrics_ = sweep_seconds(work / f"sweep-{sweeps.index(sweep)}")
        rounds = [(s.wall, scaled(le), f.wall) for s, le, f in zip(sweeps, leans, funcs)]
        prof = work / "sweep.prof"
        timed([python, "-m", "cProfile", "-o", str(prof), "-m", "symrun", "sweep", "--outputs", str(work / "profiled"),
               *args], work)
        return Result(grid, sweep, lean, scaled(lean), torch_func, phases(prof), rounds, trained, metrics_,
                      startup_floor(imports))


def report(results: list[Result], repeat: int) -> str:
    """The markdown of the whole-process comparison and the profiles."""
    from symrun.bench import markdown_table

    rows = []
    for r in results:
        rows.append([r.grid.name, str(r.grid.runs), f"{r.sweep.wall:.1f}", f"{r.lean_scaled:.1f}", f"{r.torch_func.wall:.1f}",
                     f"**{r.lean_scaled / r.sweep.wall:.1f}×**", f"**{r.torch_func.wall / r.sweep.wall:.2f}×**",
                     f"{r.around():.0%}", f"{r.floor():.0%}"])
    parts = [markdown_table(["workload", "runs", "`symrun sweep` s", "lean loop s", "torch.func s", "vs lean loop",
                             "vs torch.func", "around training", "its floor"], rows), "",
             f"Seconds are wall-clock of whole processes, the fastest of {repeat} round{'s' if repeat != 1 else ''} (a round: the three ways back "
             "to back); the ratios are of the fastest. Within each round: "
             + "; ".join(f"{r.grid.short} {_spread(r.ratios(1))}× the lean loop, {_spread(r.ratios(2), 2)}× torch.func"
                         for r in results)
             + ". The lean loop is timed on its first "
             "runs and scaled (its start-up plus its training time × runs / runs timed): "
             + "; ".join(f"{r.grid.short}: {r.grid.lean_runs} runs in {r.lean.wall:.1f} s, "
                         f"{trained_seconds(r.lean.stdout):.1f} s of them training" for r in results)
             + ". CPU seconds (user + system) of the same processes: "
             + "; ".join(f"{r.grid.short}: sweep {r.sweep.cpu:.1f}, lean ({r.grid.lean_runs} runs) "
                         f"{r.lean.cpu:.1f}, torch.func {r.torch_func.cpu:.1f}" for r in results)
             + ". *Around training* is the fastest sweep's wall-clock time outside its training steps (each pack's "
             "`train_time_s`, runs.csv): start-up, planning, the metrics and λ_c, the files, tables and figures. "
             + "; ".join(f"{r.grid.short}: {r.sweep_trained:.1f} s of {r.sweep.wall:.1f} s in training steps" for r in results)
             + ". *Its floor* is what around training would be with only what the sweep cannot leave out: "
             "the start-up any such command pays (processes importing torch, and Hydra, OmegaConf and Typer, "
             "less a bare interpreter's start) and the default metrics as the sweep computed them (its packs' "
             "time outside the steps: the metrics at step 0 and at the end, λ_c), over those and the steps; "
             "no planning, files, tables or figures. "
             + "; ".join(f"{r.grid.short}: start-up {r.startup:.1f} s, metrics {r.sweep_metrics:.1f} s" for r in results)
             + ". The profiles below say where the rest goes; cProfile's own overhead inflates the Python-heavy phases "
             "there, so their shares run higher than the wall clock's."]
    for r in results:
        total = r.profile["total"]
        lines = [[label, f"{seconds:.1f}", f"{seconds / total:.0%}"] for label, seconds in r.profile.items()
                 if label not in ("total", "of which importing modules")]
        lines.append(["total (under cProfile)", f"{total:.1f}", "100%"])
        lines.append(["of which importing modules (overlaps the phases above)", f"{r.profile['of which importing modules']:.1f}",
                      f"{r.profile['of which importing modules'] / total:.0%}"])
        parts += ["", f"Where `symrun sweep` spends its time — {r.grid.name} (cProfile of the whole process; its "
                      "overhead inflates the Python-heavy phases, so read shares more than seconds):", "",
                  markdown_table(["phase", "seconds", "share"], lines)]
    return "\n".join(parts)


def _spread(values: list[float], digits: int = 1) -> str:
    """'a' for one value, 'a–b' (lowest–highest) for more."""
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if len(values) == 1 or f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f}–{hi:.{digits}f}"


def run(device: str, quick: bool, steps: Optional[int], repeat: int, say: Callable[[str], None] = print) -> str:
    """Both workloads (or, `quick`, small versions of them) on `device`: the markdown section.

    Every sweep folder is kept until the last workload is done. Removing tens of thousands of
    files makes the next ones slow to create for a while on a filesystem mounted with online
    discard (this project's machine: 0.03 ms a file after quiet, 0.5 ms right after a removal),
    which would charge one workload's clean-up to the next one's sweep."""
    grids = ([w1(steps or 20, seeds=2, lean_runs=4), w1_module(steps or 20, seeds=2, lean_runs=4),
              hadamard(steps or 20, seeds=4, lean_runs=8)] if quick
             else [w1(steps or 1000), w1_module(steps or 1000), hadamard(steps or 500)])
    with tempfile.TemporaryDirectory(prefix="symrun-bench-") as tmp:
        return report([measure(g, device, repeat, say, Path(tmp)) for g in grids], repeat)
