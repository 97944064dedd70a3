"""Where results live and how they are written. Every output path is built here; symrun.sweeping.records reads
a run folder back and checks it, symrun.sweeping.tables rebuilds the sweep's tables.

    outputs/<name>/<YYYY-MM-DD_HH-MM-SS>-<4 hex>/      a sweep: hydra.sweep.dir (the suffix keeps same-second
                                                      sweeps apart); a suite: one per member, <preset>/,
                                                      and its launches/<k>/ (sweep.write_launch)
        sweep.json                                    swept keys and every launch into it (overrides, counts)
        launches/<k>/plan.json                        launch k's grid (run ids in grid order) and packs
        launches/<k>/multirun.yaml                    the sweep's Hydra config for launch k
        launches/<k>/packs/<i>/                       Hydra's folder for its job i: .hydra/ (the config of
                                                      the pack's runs: symrun.sweeping.job), symrun.log
        .submitit/<job id>/                           submitit's scripts and logs (its launchers)
        runs.csv  results.csv                         tidy tables, rebuilt from runs/ at any time (symrun.sweeping.tables)
        figures.json                                  the figures the last report drew (symrun.analysis.report)
        checkpoints/<hash of run ids>.json            a started pack's record: its run ids, the runs it is training
                                                      and its info (they read as running until each has its status.json)
        checkpoints/<hash of run ids>.pt              an unfinished pack's state (train.checkpoint_every)
        runs/<run_id>/config.yaml                     the resolved config
                      metrics.csv                     one row per logged step
                      params.pt                       the parameters of metrics.csv's last row
                      <name>.npy, <name>.png          arrays a model saves for a run's own figures (resnet18)
                      status.json                     written last: finished | failed | diverged (running in folders of
                                                      earlier versions)

Every file symrun writes or reads is written and read through symrun.sweeping.folder, which never follows a
link inside a sweep folder. Hydra (.hydra/, the job's log) and submitit (.submitit/) write theirs with plain
open(), so those names are checked not to be links before they write (records.check_folder, job.RunChecks).
run_id = readable prefix + hash of the settings that differ from the defaults (open_lth
style: adding a new setting with a default renames no existing run).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import yaml

from symrun.sweeping import folder
from symrun.config import EXECUTION_KEYS, PER_RUN_KEYS, Config, default_values, flattened, to_dict
from symrun.sweeping.folder import OutputError, one_sync, read_bytes, write_atomic  # noqa: F401 — part of this module's API

if TYPE_CHECKING:       # torch is imported where a run's parameters are: reading tables back needs none
    import pandas as pd     # and pandas where tables are: a sweep's training process needs none
    import torch

FINISHED, FAILED, DIVERGED, RUNNING = "finished", "failed", "diverged", "running"
PENDING = "pending"           # planned (config.yaml written) but never started: no status.json yet
INTERRUPTED = "interrupted"   # `running`, but no sweep holds the folder's lock any more (symrun.sweeping.tables)
DAMAGED = "damaged"           # a file of the run cannot be read back: see records.RunRecord.problem
STATES = (FINISHED, FAILED, DIVERGED, RUNNING)    # what a status.json may say
MIN_FREE_BYTES = 64 * 2**20   # below this a sweep would likely die mid-write: refuse it up front
LOCK_NAME = "sweep.lock"
FOLDERS = ("runs", "checkpoints", "launches")     # what symrun makes inside a sweep folder
SUBMITIT_FOLDER = ".submitit"     # what submitit writes there with plain open() (the SLURM and local launchers)


def new_sweep_dir(root: Path, name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path(root) / name / f"{stamp}-{secrets.token_hex(2)}"


def run_dir(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir, "runs", run_id)       # one Path built, not three (a sweep asks ~10 times a run)


def launch_plan(folder_: Path, k: int) -> Path:
    """Launch k's plan in a sweep's (or a suite's) folder; Hydra's job folders go beside it."""
    return Path(folder_) / "launches" / str(k) / "plan.json"


def write_launch_plan(root: Path, first: int, plan: dict) -> Path:
    """Write `plan` as launch k's plan.json, k the first number ≥ `first` whose launch folder
    does not exist yet: Hydra and submitit then write their job folders into a folder made here,
    never into one a received sweep folder brought along. Returns its path."""
    k = first
    while folder.kind(launch_plan(root, k).parent, root) is not None:
        k += 1
    path = launch_plan(root, k)
    write_json(path, plan, root=root)
    return path


def launch_plans(root: Path) -> list[dict]:
    """The plans of the launches into a sweep's (or suite's) folder that can be read, newest first."""
    root = Path(root)
    try:
        found = folder.entries(root / "launches", root)
    except OutputError:
        return []
    ks = sorted((int(n) for n, what in found.items() if n.isdigit() and what == "dir"), reverse=True)
    return [p for p in (read_json(launch_plan(root, k), root) for k in ks) if _plan_ok(p)]


def _plan_ok(plan: Any) -> bool:
    """A plan.json of the shape write_launch_plan gives it (a damaged one is left out): a sweep's
    grid of run ids and packs of run ids, or a suite's plans and packs of [member, pack]."""
    return (isinstance(plan, dict) and isinstance(plan.get("packs", []), list)
            and all(isinstance(pack, list) for pack in plan.get("packs", []))
            and isinstance(plan.get("grid", []), list) and all(isinstance(r, str) for r in plan.get("grid", [])))


def launch_config(folder_: Path, k: int) -> Path:
    """The sweep's Hydra config as launch k composed it (multirun.yaml, as Hydra's sweepers save it)."""
    return launch_plan(folder_, k).parent / "multirun.yaml"


def job_subdir(k: int) -> str:
    """hydra.sweep.subdir of launch k's jobs (Hydra fills in the job's number): packs/<i> beside its plan."""
    return f"launches/{k}/packs/${{hydra.job.num}}"


def check_writable(sweep_dir: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Refuse an output location that cannot take a sweep's results, before any training.

    The nearest folder that exists on the way to `sweep_dir` must be a folder in which a file can
    be created (a probe file is created and removed: permission bits alone do not tell, e.g. for
    root or read-only mounts), on a disk with at least `min_free` bytes free."""
    existing = Path(os.path.abspath(sweep_dir))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write results under {sweep_dir}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".symrun-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write results under {sweep_dir}: {existing} is not writable ({e.strerror})") from None
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise OutputError(f"not enough free disk space for results under {sweep_dir}: {free / 2**20:.1f} MiB free "
                          f"on the disk of {existing}, symrun needs at least {min_free / 2**20:.0f} MiB")


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path):
    """Hold `sweep_dir`/sweep.lock exclusively while a sweep writes into the folder; a second sweep
    into the same folder is refused with OutputError. flock(2) locks belong to the open file, so
    the operating system releases them when the process dies, even by SIGKILL: no stale locks.
    Only the top-level sweep process locks; launcher workers write their own runs' files.
    The lock file is opened without following a link (a link would have its target truncated)."""
    path = Path(sweep_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = folder.open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise OutputError(f"another symrun sweep ({holder}) is writing to {sweep_dir}; wait for it to end "
                          "or choose another hydra.sweep.dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lock_held(sweep_dir: Path) -> bool:
    """Whether a sweep holds `sweep_dir`'s lock now (tried with a shared, non-blocking flock that
    is let go at once; a link or a missing lock file is no sweep)."""
    path = Path(sweep_dir) / LOCK_NAME
    if folder.kind(path, sweep_dir) != "file":
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def run_ids(sweep_dir: Path) -> list[str]:
    """The names under runs/ that are run folders (or links in their place, which read_run
    reports as damaged), sorted."""
    try:
        found = folder.entries(Path(sweep_dir) / "runs", sweep_dir)
    except OutputError:
        return []
    return sorted(name for name, what in found.items() if what in ("dir", "link"))


def run_id(cfg: Config) -> str:
    return _named(cfg, _changed(cfg))


def _changed(cfg: Config) -> dict[str, Any]:
    """The settings of `cfg` that make its run id: those that differ from their defaults, and the
    model's and data's names (execution settings never)."""
    defaults = default_values(type(cfg.model), type(cfg.data))
    return {k: v for k, v in flattened(cfg).items()
            if k not in EXECUTION_KEYS and (defaults.get(k, _ABSENT) != v or k in ("model.name", "data.name"))}


_ABSENT = object()


def _named(cfg: Config, changed: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(sorted(changed.items()), default=str).encode()).hexdigest()[:10]
    return f"{cfg.model.name}-s{cfg.seed}-{digest}"


class RunIds:
    """run_id of configs that differ from `first` in the per-run settings `keys` only, as a
    shape's runs do (composition.Shape.run): the other settings are flattened and compared with
    their defaults once, and each run adds its own values of `keys` (a 4,352-run grid's ids in
    ~0.03 s, not 0.2). The same ids as run_id (tests/test_sweep.py)."""

    def __init__(self, first: Config, keys: Iterable[str]):
        self.keys = [(k, k.split(".")) for k in keys]
        per_run = {k for k, _ in self.keys}
        assert per_run <= set(PER_RUN_KEYS), per_run
        self.defaults = default_values(type(first.model), type(first.data))
        self.fixed = {k: v for k, v in _changed(first).items() if k not in per_run}

    def __call__(self, cfg: Config) -> str:
        changed = dict(self.fixed)
        for key, path in self.keys:
            value = cfg
            for name in path:
                value = getattr(value, name)
            if self.defaults.get(key, _ABSENT) != value:
                changed[key] = value
        return _named(cfg, changed)


def checkpoint_path(sweep_dir: Path, run_ids_: list[str]) -> Path:
    """Where the pack of exactly these runs keeps its checkpoint (and, beside it as .json, their
    ids). Named by its runs, not by a launch's pack number, so a rerun of the sweep finds it."""
    digest = hashlib.sha256(json.dumps(list(run_ids_)).encode()).hexdigest()[:16]
    return Path(sweep_dir) / "checkpoints" / f"{digest}.pt"


def remove_checkpoint(sweep_dir: Path, run_ids_: list[str]) -> None:
    path = checkpoint_path(sweep_dir, run_ids_)
    for p in (path, path.with_suffix(".json")):
        folder.remove(p, sweep_dir)


def write_pack_start(sweep_dir: Path, ids: list[str], running: list[str], info: dict) -> None:
    """Record that the pack of `ids` has started training its runs `running`, with the pack's
    `info`: one file for the pack (checkpoints/<hash>.json, the sidecar of its checkpoint), not a
    `running` status.json a run (4,352 files and ~0.6 s for a 4,352-run pack). Each listed run
    reads as running (`started_runs`) until its own status.json is written; the record goes with
    the pack's checkpoint once every run is (remove_checkpoint)."""
    write_json(checkpoint_path(sweep_dir, ids).with_suffix(".json"),
               {"run_ids": list(ids), "running": list(running), "info": info}, sweep_dir)


def started_runs(sweep_dir: Path) -> dict[str, dict]:
    """{run id: the status.json its started pack's record stands for (`running`, the pack's
    info)} over every pack record in checkpoints/ (`write_pack_start`). A record that cannot be
    read back (damaged, a link) is passed over: its runs read as pending, which they are as far
    as a sweep is concerned (it trains every run not finished)."""
    out: dict[str, dict] = {}
    for _, running, info in pack_records(sweep_dir):
        out.update((rid, {**info, "run_id": rid, "status": RUNNING}) for rid in running)
    return out


def pack_records(sweep_dir: Path) -> list[tuple[Path, list[str], dict]]:
    """(path, the runs it started, the pack's info) of each started pack's record in
    checkpoints/ that can be read back (`write_pack_start`)."""
    out = []
    for path, record in _sidecars(Path(sweep_dir))[1]:
        running, info = (record.get("running"), record.get("info")) if isinstance(record, dict) else (None, None)
        if isinstance(running, list) and all(isinstance(r, str) for r in running) and isinstance(info, dict):
            out.append((path, running, info))
    return out


def remove_empty_checkpoints(sweep_dir: Path) -> None:
    """Delete checkpoints/ when nothing is left in it: the sweep's packs have all written their
    runs, and their records and checkpoints went with them. Call it when no pack of the folder
    runs (one writing its record meanwhile could find its folder gone)."""
    folder.remove_if_empty(Path(sweep_dir) / "checkpoints", Path(sweep_dir))


def checkpointed_packs(sweep_dir: Path) -> list[list[str]]:
    """The run ids of each pack with a checkpoint in the folder (from the .json beside each .pt)."""
    sweep_dir = Path(sweep_dir)
    found, sidecars = _sidecars(sweep_dir)
    packs = []
    for path, sidecar in sidecars:
        ids = sidecar.get("run_ids") if isinstance(sidecar, dict) else None
        state = path.with_suffix(".pt").name
        if (isinstance(ids, list) and ids and all(isinstance(r, str) for r in ids)
                and found.get(state) == "file" and checkpoint_path(sweep_dir, ids).name == state):
            packs.append(ids)
    return packs


def _sidecars(sweep_dir: Path) -> tuple[dict[str, str], list[tuple[Path, Any]]]:
    """checkpoints/'s entries ({name: kind}, folder.entries) and each .json file's path and JSON
    (None where it cannot be read back), by name; nothing when checkpoints/ cannot be entered."""
    try:
        found = folder.entries(sweep_dir / "checkpoints", sweep_dir)
    except OutputError:
        return {}, []
    return found, [(sweep_dir / "checkpoints" / name, read_json(sweep_dir / "checkpoints" / name, sweep_dir))
                   for name in sorted(found) if found[name] == "file" and name.endswith(".json")]


def write_json(path: Path, obj: Any, root: Optional[Path] = None) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n", root)


def read_json(path: Path, root: Optional[Path] = None) -> Any:
    """The JSON in `path` (read without following a link), or None when it is missing or unreadable."""
    try:
        return json.loads(read_bytes(path, root))
    except (FileNotFoundError, OutputError, ValueError):
        return None


def write_csv(path: Path, frame: pd.DataFrame, root: Optional[Path] = None) -> None:
    """Floats as pandas writes them by default: the shortest text that reads back to the same
    number (0.1, not 0.10000000000000001)."""
    write_atomic(path, frame.to_csv(index=False), root)


def csv_text(rows: list[dict]) -> str:
    """A run's metric rows as the CSV `write_csv(pd.DataFrame(rows))` would write, for what
    read_csv reads back (the same values, every float to the bit), ~20× faster for a few rows:
    a sweep writes one such file per run. Columns in the order keys first appear; a missing
    value, None or NaN, is an empty cell; a float is its repr."""
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["step"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row.get(c)) for c in columns] for row in rows)
    return out.getvalue()


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return repr(float(value)) if isinstance(value, float) else value


def read_csv(path: Path | io.StringIO, **kw) -> pd.DataFrame:
    """A table symrun wrote, every float read back to the bit."""
    import pandas as pd

    # pandas 3 reads floats exactly by default (and deprecates the option); pandas 2 needs to be asked.
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return pd.read_csv(path, **exact, **kw)


# libyaml's C parser and emitter where PyYAML has them (the same safe YAML, the same text): a run's
# config.yaml reads in 0.36 ms instead of 2.6 and writes ~4× faster — per run, several times a sweep
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# config.yaml files this process wrote: path → (their bytes, the dict they were dumped from).
# Reading one back whose bytes are still these gives that dict without parsing it again (PyYAML
# builds a config's 60-odd nodes in Python: ~0.4 ms a run, 2 s at the end of a 4,608-run sweep);
# a file changed since is parsed. Safe YAML round-trips the plain values of a config exactly
# (tests/test_tables.py checks the two agree).
WRITTEN_CONFIGS: dict[str, tuple[bytes, dict, Optional[tuple[Shape, list]]]] = {}


@dataclass(frozen=True)
class Shape:
    """What the config.yaml files of a grid share: the config with a slot name in place of each
    per-run value (config.PER_RUN_KEYS), and each slot's (group, name), in the order a file's
    values come in (`read_shaped`). `key` tells shapes apart."""
    key: str
    tree: dict
    slots: tuple[tuple[str, str], ...]


def save_config(sweep_dir: Path, rid: str, cfg: Config) -> None:
    save_configs(sweep_dir, [(rid, cfg)])


def save_configs(sweep_dir: Path, configs: Iterable[tuple[str, Config]]) -> None:
    """Each (run id, config) as runs/<run id>/config.yaml, runs/ opened once for all."""
    base = os.path.abspath(os.path.join(sweep_dir, "runs"))
    written = {}
    for rid, cfg in configs:      # composed in this process, which keeps them for reading back
        tree = to_dict(cfg)
        text, shaped = _dumped(tree)
        written[rid] = (text.encode("utf-8"), tree, shaped)
    with folder.folders(Path(sweep_dir, "runs"), sweep_dir) as runs:
        def save(rid: str) -> None:
            with runs.opened(rid) as d:
                d.write_atomic("config.yaml", written[rid][0])
        folder.write_each(save, list(written))
    WRITTEN_CONFIGS.update((os.path.join(base, rid, "config.yaml"), kept) for rid, kept in written.items())


_TEMPLATES: dict[str, Optional[tuple[str, Shape]]] = {}
_SCALARS: dict[tuple, str] = {}
_SLOT = "symrun_per_run_value_{}_"      # the closing _ keeps slot 1 from being a prefix of slot 10


def config_yaml(tree: dict) -> str:
    """`yaml.dump(tree)` as config.yaml holds it. A grid's runs differ in their per-run settings
    (config.PER_RUN_KEYS) only, so the rest is dumped once per shape, with a slot for each of
    those, and each run's numbers are put in the slots, each as YAML writes that number alone
    (the same text: tests/test_tables.py). A value that is not a plain number or a short word,
    or a shape whose slots cannot be told apart, is dumped whole."""
    return _dumped(tree)[0]


def _dumped(tree: dict) -> tuple[str, Optional[tuple[Shape, list]]]:
    """(config_yaml(tree), its shape and per-run values when it was written from a template)."""
    shape, values, slots = _with_slots(tree)
    if values is None:
        return yaml.dump(tree, Dumper=YAML_DUMPER, sort_keys=False), None
    key = repr(shape)
    if key not in _TEMPLATES:
        text = yaml.dump(shape, Dumper=YAML_DUMPER, sort_keys=False)
        names = [_SLOT.format(i) for i in range(len(values))]
        ok = all(text.count(f" {slot}\n") == 1 and text.count(slot) == 1 for slot in names)
        _TEMPLATES[key] = (_as_format(text, names), Shape(key, _copied(shape), tuple(slots))) if ok else None
    template = _TEMPLATES[key]
    if template is None:
        return yaml.dump(tree, Dumper=YAML_DUMPER, sort_keys=False), None
    return template[0].format(*(_scalar(v) for v in values)), (template[1], values)


def _with_slots(tree: dict) -> tuple[dict, Optional[list], list[tuple[str, str]]]:
    """(`tree` with each per-run setting's value replaced by a slot name, those values, each
    slot's (group, name)), or (tree, None, []) when one of them is not a plain number, bool,
    null or short word."""
    shape, values, slots = dict(tree), [], []
    for key in PER_RUN_KEYS:
        group, _, name = key.rpartition(".")
        node = shape if not group else shape.get(group)
        if not isinstance(node, dict) or name not in node:
            continue
        value = node[name]
        if not (type(value) in (int, float, bool, type(None)) or _short_word(value)):
            return tree, None, []
        if group:
            node = shape[group] = dict(node)
        node[name] = _SLOT.format(len(values))
        values.append(value)
        slots.append((group, name))
    return shape, values, slots


def _short_word(value: Any) -> bool:
    """A string YAML writes the same alone as in a mapping (`cosine`): no line to wrap."""
    return type(value) is str and 0 < len(value) <= 40 and value.isprintable() and " " not in value


def _as_format(text: str, slots: list[str]) -> str:
    text = text.replace("{", "{{").replace("}", "}}")
    for i, slot in enumerate(slots):
        text = text.replace(slot, "{%d}" % i)
    return text


def _scalar(value: Any) -> str:
    key = (type(value), repr(value))         # repr: 0.0 and -0.0 are equal keys, not equal text
    if key not in _SCALARS:
        _SCALARS[key] = yaml.dump(value, Dumper=YAML_DUMPER).removesuffix("\n...\n").removesuffix("\n")
    return _SCALARS[key]


def parse_config(path: Path, raw: bytes) -> Any:
    """config.yaml's content from its bytes: the dict it was written from when this process
    wrote exactly these bytes (WRITTEN_CONFIGS), else read (`_read_yaml`). Raises yaml.YAMLError
    or UnicodeDecodeError for a file that is not YAML."""
    known = WRITTEN_CONFIGS.get(os.path.abspath(path))
    if known is not None and known[0] == raw:
        return known[1]
    return _read_yaml(raw)


def read_shaped(path: Path, raw: bytes) -> Optional[tuple[Shape, list]]:
    """(its shape, its per-run values) for a config.yaml whose bytes this process wrote, or that
    matches a shape read before (`_read_yaml`): what parse_config would give, without building
    the tree; None for any other file (parse_config reads it)."""
    known = WRITTEN_CONFIGS.get(os.path.abspath(path))
    if known is not None and known[0] == raw:
        return known[2]
    for pattern, shape in _SHAPES:
        if (found := pattern.fullmatch(raw)) is not None:
            return shape, [_value(text) for text in found.groups()]
    return None


def _value(text: bytes) -> Any:
    if text not in _VALUES:
        _VALUES[text] = yaml.load(text, Loader=YAML_LOADER)
    return _VALUES[text]


# The shapes of config.yaml read so far (config_yaml's, in reverse): its text as a pattern with a
# group for each per-run value, and the shape (whose slots are in the groups' order).
_SHAPES: list[tuple[re.Pattern, Shape]] = []
_SHAPES_KEPT = 16
# A per-run value's text that YAML reads alone as it reads it in its mapping: a word that starts
# with a letter (bools and null among them), or a number (.inf and .nan included) — not `-`, `---`
# or `...`, which a mapping reads otherwise.
_PLAIN = rb"([A-Za-z_][-+.0-9A-Za-z_]*|[-+]?(?:\.?[0-9][-+.0-9A-Za-z_]*|\.(?:inf|Inf|INF|nan|NaN|NAN)))"
_VALUES: dict[bytes, Any] = {}


def _read_yaml(raw: bytes) -> Any:
    """yaml.load of a config.yaml's bytes. A sweep's files differ in their per-run values only
    (config_yaml), so once one file of a shape is parsed, the others of that shape are matched
    against its text, and only the per-run values are read, each once per distinct text: a
    report or collect in a new process reads a 4,352-run folder's configs in 0.15 s, not the
    2.3 s of PyYAML building ~150 nodes a file. A file that does not match every byte of a known shape
    outside those values, or holds there anything but a plain number or word, is parsed whole
    (tests/test_tables.py checks the two agree)."""
    for pattern, shape in _SHAPES:
        found = pattern.fullmatch(raw)
        if found is None:
            continue
        tree = _copied(shape.tree)
        for (group, name), text in zip(shape.slots, found.groups()):
            (tree[group] if group else tree)[name] = _value(text)
        return tree
    tree = yaml.load(raw, Loader=YAML_LOADER)
    if isinstance(tree, dict) and len(_SHAPES) < _SHAPES_KEPT:
        _learn_shape(tree)
    return tree


def _learn_shape(tree: dict) -> None:
    shape, values, slots = _with_slots(tree)
    if not values:
        return
    text = yaml.dump(shape, Dumper=YAML_DUMPER, sort_keys=False).encode("utf-8")
    pattern, where = re.escape(text), []
    for i in range(len(values)):
        slot = _SLOT.format(i).encode()
        if text.count(b" " + slot + b"\n") != 1 or text.count(slot) != 1:
            return
        pattern = pattern.replace(re.escape(slot), _PLAIN)
        where.append(text.index(slot))
    # the pattern's groups come in the text's order, not the slots'
    order = sorted(range(len(slots)), key=where.__getitem__)
    _SHAPES.append((re.compile(pattern, re.DOTALL), Shape(repr(shape), _copied(shape), tuple(slots[i] for i in order))))


def _copied(node: Any) -> Any:
    """A copy of a tree of dicts and lists (its leaves are immutable), as copy.deepcopy makes one,
    4× faster on a config (0.065 against 0.27 s for 4,352 of them)."""
    if isinstance(node, dict):
        return {k: _copied(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copied(v) for v in node]
    return node


def load_config_dict(sweep_dir: Path, rid: str) -> dict:
    return yaml.load(folder.read_text(run_dir(sweep_dir, rid) / "config.yaml", sweep_dir), Loader=YAML_LOADER)


def status(sweep_dir: Path, rid: str) -> Optional[dict]:
    """A run's status.json as written, or None (symrun.sweeping.records.read_run checks it)."""
    return read_json(run_dir(sweep_dir, rid) / "status.json", sweep_dir)


def write_status(sweep_dir: Path, rid: str, state: str, **info: Any) -> None:
    write_statuses(sweep_dir, [(rid, state, info)])


def write_statuses(sweep_dir: Path, statuses: Iterable[tuple[str, str, dict]]) -> None:
    """Each (run id, state, info) as runs/<run id>/status.json, runs/ opened once for all."""
    with folder.folders(Path(sweep_dir, "runs"), sweep_dir) as runs:
        def write(item: tuple[str, str, dict]) -> None:
            rid, state, info = item
            with runs.opened(rid) as d:
                d.write_atomic("status.json", json.dumps({"run_id": rid, "status": state, **info}, indent=2, default=str) + "\n")
        folder.write_each(write, list(statuses))


def write_run(sweep_dir: Path, rid: str, state: str, rows: list[dict], params: Optional[dict],
              arrays: Optional[dict] = None, **info: Any) -> None:
    """A run's metrics, parameters and arrays (<name>.npy, for its figures), then its status
    (the completion marker) last, with the last row's step and metrics (which read_run checks
    metrics.csv against: a truncated file is caught)."""
    write_runs(sweep_dir, [(rid, state, rows, params, arrays, info)])


def write_runs(sweep_dir: Path, runs: list[tuple[str, str, list[dict], Optional[dict], Optional[dict], dict]]) -> None:
    """write_run for many runs, (rid, state, rows, params, arrays, info) each, with two syncs in
    all: every run's files made durable together, then every status.json, so that no completion
    marker reaches the disk before its run's files."""
    with one_sync(sweep_dir), folder.folders(Path(sweep_dir, "runs"), sweep_dir) as folders:
        def write(run: tuple) -> None:
            rid, _, rows, params, arrays, _ = run
            with folders.opened(rid) as d:
                _write_files(d, rows, params, arrays)
        folder.write_each(write, runs)
    with one_sync(sweep_dir):
        write_statuses(sweep_dir, [(rid, state, {"final": {k: v for k, v in rows[-1].items() if k != "step"} if rows else {},
                                                 "final_step": rows[-1]["step"] if rows else None, **info})
                                   for rid, state, rows, _, _, info in runs])


def _write_files(d: folder.Opened, rows: list[dict], params: Optional[dict], arrays: Optional[dict]) -> None:
    import numpy as np
    import torch

    d.write_atomic("metrics.csv", csv_text(rows))
    if params is not None:
        buf = io.BytesIO()
        torch.save(params, buf)
        d.write_atomic("params.pt", buf.getvalue())
    for name, array in (arrays or {}).items():
        buf = io.BytesIO()
        np.save(buf, array.numpy() if isinstance(array, torch.Tensor) else array, allow_pickle=False)
        d.write_atomic(f"{name}.npy", buf.getvalue())


class ParamsError(ValueError):
    """A parameters file that is not a state dict of tensors; the message is one line."""


def load_params(path: Path) -> dict[str, torch.Tensor]:
    """A run's params.pt (or any saved state dict) as {name: tensor} on the CPU.

    torch.load with weights_only=True unpickles only tensors and plain containers, so a file
    holding arbitrary Python objects is refused instead of executed."""
    import torch

    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such parameters file") from None
    except Exception as e:  # noqa: BLE001 — unpickling and zip errors come in many types
        raise ParamsError(f"{path}: not a state dict of tensors readable with weights_only=True "
                          f"(it holds other Python objects, or is not a torch.save file: {type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ParamsError(f"{path}: not a state dict (expected {{name: tensor}}, got {type(state).__name__})")
    return state


def provenance(device: str) -> dict:
    """Git commit and dirty flag (when run from a checkout), torch version, device."""
    import torch

    info = {"torch": torch.__version__, "device": device, "git_commit": None, "git_dirty": None,
            "slurm_job_id": slurm_job_id()}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def slurm_job_id() -> Optional[str]:
    """The SLURM job running this process (`<array job>_<task>` for an array task), if any: the
    name of its submitit folder and log files, and what `sacct -j` takes."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")
