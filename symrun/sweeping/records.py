"""A run folder read back and checked: what state a run is in, and whether its files can be trusted.

A run's files are written atomically (symrun.sweeping.folder), so a crash never leaves half of one; a
file that still cannot be read back was damaged afterwards (a disk error, a hand edit, a copy cut
short) or is a link in a folder received from elsewhere. Such a run is `damaged`, with one line
that names the file and says what to do; nothing here repairs, replaces or retrains anything.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import yaml
from omegaconf import MISSING

from symrun.sweeping import folder, results
from symrun.config import (DATA_OPTIONS, EXECUTION_KEYS, Config, ConfigError, default_values, flatten, flattened,
                           model_options)
from symrun.sweeping.folder import OutputError
from symrun.sweeping.results import (DAMAGED, DIVERGED, FINISHED, FOLDERS, LOCK_NAME, PENDING, STATES, SUBMITIT_FOLDER,
                            checkpoint_path, checkpointed_packs, read_csv, read_json, remove_checkpoint, run_dir,
                            run_ids)

if TYPE_CHECKING:      # pandas comes with the first metrics read: a sweep's training process needs none
    import pandas as pd


@dataclass
class RunRecord:
    """A run folder as read back: its state, status.json, config and (when asked) metrics."""

    run_id: str
    status: str                              # STATES, PENDING, or DAMAGED
    info: Optional[dict] = None              # status.json; None when missing or damaged
    config: Optional[dict] = None            # config.yaml, flattened; None when missing or damaged
    metrics: Optional[pd.DataFrame] = None   # metrics.csv (finished and diverged runs, when asked)
    problem: Optional[str] = None            # DAMAGED: one line naming the file and what to do


def _damaged(path: Path, what: str) -> str:
    return (f"{path} is damaged ({what}): restore it from a copy, or delete the folder {path.parent} "
            "to train that run again")


def read_run(sweep_dir: Path, rid: str, metrics: bool = False, config: bool = True) -> RunRecord:
    """Read runs/<rid>/ without following a link and check what it holds (config.yaml unless
    `config` is false, metrics.csv when `metrics`). A file that cannot be read back (empty, not the
    right kind of content, truncated, a link) makes the run DAMAGED with a one-line `problem`
    (`info` is kept when status.json itself is sound); nothing is repaired. A run without a
    status.json is PENDING here, whether or not a pack has started it: `read_runs` (what the
    tables and `symrun status` read) also reads the packs' records and says RUNNING."""
    return _read_run(sweep_dir, rid, "parsed" if metrics else None, config)[0]


def _read_run(sweep_dir: Path, rid: str, metrics: Optional[str], config: bool,
              runs: Optional[folder.Folders] = None,
              started: Optional[dict[str, dict]] = None) -> tuple[RunRecord, Optional[str]]:
    """read_run, through one opening of the run's folder (in `runs`, the sweep's runs/ opened
    once, when given); `metrics` "raw": (the record, the text of its metrics.csv, unchecked,
    when its status says there is one). `started` (results.started_runs): the status a started
    pack's record gives a run that has no status.json of its own yet."""
    sweep_dir = Path(sweep_dir)
    with contextlib.ExitStack() as stack:
        try:
            run = stack.enter_context(runs.opened(rid, create=False) if runs is not None
                                      else folder.opened(run_dir(sweep_dir, rid), sweep_dir, create=False))
        except FileNotFoundError:
            return RunRecord(rid, PENDING), None
        except OutputError as e:                   # the run's folder, or runs/, is a link or a file
            return RunRecord(rid, DAMAGED, problem=str(e)), None
        info, problem = _read_status(run, rid)
        cfg, config_problem = _read_config(run) if config else (None, None)
        if problem is not None:
            return RunRecord(rid, DAMAGED, config=cfg, problem=problem), None
        if info is None:
            if started is None or rid not in started:   # never started; a folder without config.yaml yet was cut short while planned
                return RunRecord(rid, PENDING, config=cfg), None
            info = started[rid]                          # its pack is training it (or was, until a kill)
        if config_problem is not None:
            return RunRecord(rid, DAMAGED, info, problem=config_problem), None
        record = RunRecord(rid, info["status"], info, cfg)
        if metrics is None or record.status not in (FINISHED, DIVERGED):
            return record, None
        if metrics == "raw":
            try:
                return record, run.read_bytes("metrics.csv").decode("utf-8")
            except (OSError, UnicodeDecodeError):
                return record, None                       # read_run names the problem
        record.metrics, problem = _read_metrics(run, info)
        if problem is not None:
            return RunRecord(rid, DAMAGED, info, cfg, problem=problem), None
        return record, None


def read_sweep(sweep_dir: Path) -> tuple[dict, Optional[str]]:
    """sweep.json as a dict ({} when missing) and, when it cannot be read back, the problem."""
    path = Path(sweep_dir) / "sweep.json"
    if folder.kind(path, sweep_dir) is None:
        return {}, None
    info = read_json(path, sweep_dir)
    if not _sweep_ok(info):
        return {}, (f"{path} is damaged: restore it, or delete it to start the folder's history afresh "
                    "(its runs are kept; until then the tables do not know which keys were swept)")
    return info, None


def _sweep_ok(info) -> bool:
    """sweep.json as write_plan writes it: swept keys (names, none a column the tables make
    themselves) and a list of launches."""
    swept, launches = (info.get("swept", []), info.get("launches", [])) if isinstance(info, dict) else (None, None)
    return (isinstance(swept, list) and all(isinstance(k, str) for k in swept) and not {"run_id", "status", "step"} & set(swept)
            and isinstance(launches, list) and all(isinstance(x, dict) for x in launches))


def folder_problems(sweep_dir: Path) -> list[str]:
    """One line for each part of the folder itself that cannot be read back: a damaged sweep.json,
    a runs/ that is a link (its runs are not read) or not a folder."""
    found = [read_sweep(sweep_dir)[1]]
    what = folder.kind(Path(sweep_dir) / "runs", sweep_dir)
    if what == "link":
        found.append(str(folder.link_error(Path(sweep_dir) / "runs")))
    elif what not in (None, "dir"):
        found.append(f"{Path(sweep_dir) / 'runs'} is not a folder: its runs cannot be read")
    return [line for line in found if line]


def _read_status(run: folder.Opened, rid: str) -> tuple[Optional[dict], Optional[str]]:
    path = run.path / "status.json"
    try:
        raw = run.read_bytes(path.name)
    except FileNotFoundError:
        return None, None
    except OutputError as e:
        return None, str(e)
    try:
        st = json.loads(raw)
    except ValueError:
        return None, _damaged(path, "empty" if not raw.strip() else "not valid JSON")
    if not isinstance(st, dict):
        kind = {type(None): "null", list: "a list", str: "a string", bool: "a boolean"}.get(type(st), "a number")
        return None, _damaged(path, f"it holds {kind}, not a run's status")
    if st.get("run_id") != rid:
        return None, _damaged(path, "no run_id" if "run_id" not in st else f"its run_id is {st['run_id']!r}")
    if st.get("status") not in STATES or not isinstance(st.get("final", {}), dict):
        return None, _damaged(path, f"unknown status {st.get('status')!r}" if st.get("status") not in STATES
                              else "its final metrics are not a mapping")
    return st, None


def _read_config(run: folder.Opened) -> tuple[Optional[dict], Optional[str]]:
    path = run.path / "config.yaml"
    try:
        raw = run.read_bytes(path.name)
        shaped = results.read_shaped(path, raw)
        if shaped is not None and (checked := _shape_checked(*shaped)) is not None:
            return checked
        cfg = results.parse_config(path, raw)
    except FileNotFoundError:
        return None, _damaged(path, "missing")
    except OutputError as e:
        return None, str(e)
    except (yaml.YAMLError, UnicodeDecodeError):
        return None, _damaged(path, "not valid YAML")
    return _checked(path, cfg)


def _checked(path: Path, cfg: Any) -> tuple[Optional[dict], Optional[str]]:
    """A parsed config.yaml, flattened, or why it is not a run's config."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or not isinstance(cfg.get("data"), dict):
        return None, _damaged(path, "not a run's config: no model and data sections")
    model, data = cfg["model"].get("name"), cfg["data"].get("name")
    if model not in model_options() or data not in DATA_OPTIONS:
        return None, _damaged(path, f"unknown model {model!r} or data {data!r}")
    flat, defaults = flatten(cfg), default_values(model_options()[model], DATA_OPTIONS[data])
    required = [k for k, v in defaults.items() if v == MISSING and flat.get(k) in (None, MISSING)]
    if required:        # a setting with no default (model._target_ of model=module, data.path of data=file)
        return None, _damaged(path, f"it lacks {required[0]}, which has no default")
    wrong = [k for k, v in flat.items() if k in defaults and not _same_kind(v, defaults[k])]
    if wrong:
        return None, _damaged(path, f"{wrong[0]}: {flat[wrong[0]]!r} is not a value of its type")
    return flat, None


def _shape_checked(shape: results.Shape, values: list) -> Optional[tuple[dict, Optional[str]]]:
    """_read_config of a file of a known shape, from the shape's checks and its per-run values:
    what `_checked` gives for its parsed tree, ~5× faster (a 4,608-run folder is read by every
    status, collect and report). None when the shape or one of these values fails a check (the
    file is then checked whole, for the same message)."""
    known = _SHAPE_CHECKS.get((shape.key, shape.slots))
    if known is None:
        known = _SHAPE_CHECKS[(shape.key, shape.slots)] = _check_shape(shape)
    if known is False:
        return None
    template, keys, missing, typed, defaults = known
    flat = dict(template)
    flat.update(zip(keys, values))
    if any(flat[k] in (None, MISSING) for k in missing) or not all(_same_kind(flat[k], defaults[k]) for k in typed):
        return None
    return flat, None


def _check_shape(shape: results.Shape):
    """(the shape's flat config, its slots' flat keys, those of them a value is required for,
    those with a default whose type a value must have, the defaults), or False when what the
    slots do not hold fails a check of _checked."""
    tree = shape.tree
    if not isinstance(tree.get("model"), dict) or not isinstance(tree.get("data"), dict):
        return False
    model, data = tree["model"].get("name"), tree["data"].get("name")
    if model not in model_options() or data not in DATA_OPTIONS:
        return False
    flat, defaults = flatten(tree), default_values(model_options()[model], DATA_OPTIONS[data])
    keys = tuple(f"{group}.{name}" if group else name for group, name in shape.slots)
    fixed = [k for k in flat if k not in keys]
    if any(v == MISSING and k not in keys and flat.get(k) in (None, MISSING) for k, v in defaults.items()):
        return False
    if any(k in defaults and not _same_kind(flat[k], defaults[k]) for k in fixed):
        return False
    missing = [k for k, v in defaults.items() if v == MISSING and k in keys]
    typed = [k for k in flat if k in keys and k in defaults]
    return flat, keys, missing, typed, defaults


# (shape key, its slots) → _check_shape's answer
_SHAPE_CHECKS: dict[tuple, Any] = {}


def _same_kind(value, default) -> bool:
    """Whether a saved setting has its default's type (the tables compare and sort them); a
    setting whose default is null may hold any value."""
    if type(value) is type(default) or default is None or value is None:    # the first: most settings, cheaply
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    return isinstance(value, type(default))


def _read_metrics(run: folder.Opened, info: dict) -> tuple[Optional[pd.DataFrame], Optional[str]]:
    """metrics.csv, checked against status.json: it must end with a whole line, have a step
    column, and end with the row status.json names as final (a file cut at a line break too)."""
    path = run.path / "metrics.csv"
    try:
        raw = run.read_bytes(path.name).decode("utf-8")
    except FileNotFoundError:
        return None, _damaged(path, "missing")
    except OutputError as e:
        return None, str(e)
    except UnicodeDecodeError:
        return None, _damaged(path, "not text")
    if not raw.endswith("\n"):
        return None, _damaged(path, "empty" if not raw else "its last line is cut short")
    import pandas as pd

    try:
        frame = read_csv(io.StringIO(raw))
    except (ValueError, pd.errors.ParserError):
        return None, _damaged(path, "not a table")
    problem = _check_metrics(path, frame, info)
    return (None, problem) if problem is not None else (frame, None)


def _check_metrics(path: Path, frame: pd.DataFrame, info: dict, last: Optional[dict] = None) -> Optional[str]:
    """None when `frame` has a step column and ends with the row status.json names as final
    (`last`: that row as a dict, when the caller has it already)."""
    if last is None:
        last = frame.iloc[-1].to_dict() if len(frame) else {"step": None}     # no row: not finite at step 0
    step_ok = "final_step" not in info or last.get("step") == info["final_step"]   # older status.json: unchecked
    values_ok = all(_same(last.get(k), v) for k, v in info.get("final", {}).items())
    if "step" not in frame.columns or not step_ok or not values_ok:
        return _damaged(path, "its rows do not end with the final row status.json records")
    return None


def read_runs(sweep_dir: Path, rids: list[str]) -> list[RunRecord]:
    """read_run(…, metrics=True) for many runs, with the same records and the same problems
    (and RUNNING for a run without a status.json yet that a started pack's record lists,
    results.write_pack_start), their metrics.csv files parsed together: one pandas parse for all
    files with the same header line instead of one each (~0.5 ms a run of parser start-up). A
    group that does not parse whole, and a file with a quote in it, go one file at a time,
    through read_run's checks."""
    sweep_dir = Path(sweep_dir)
    started = results.started_runs(sweep_dir)
    with runs_folder(sweep_dir) as runs:
        read = [_read_run(sweep_dir, rid, "raw", True, runs, started) for rid in rids]
    records = [record for record, _ in read]
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, (record, raw) in enumerate(read):
        if record.status not in (FINISHED, DIVERGED):
            continue
        raw = raw or ""                            # unreadable: read_run below names the problem
        header, _, body = raw.partition("\n")
        if body and raw.endswith("\n") and '"' not in raw and "\n\n" not in raw and "__run" not in header:
            groups.setdefault(header, []).append((i, body))
        else:
            records[i] = read_run(sweep_dir, record.run_id, metrics=True)
    for header, members in groups.items():
        frames = _parse_together(header, members)
        for i, body in members:
            record = records[i]
            path = run_dir(sweep_dir, record.run_id) / "metrics.csv"
            if frames is None or i not in frames:
                records[i] = read_run(sweep_dir, record.run_id, metrics=True)
            elif (problem := _check_metrics(path, frames[i][0], record.info, last=frames[i][1])) is not None:
                records[i] = RunRecord(record.run_id, DAMAGED, record.info, record.config, problem=problem)
            else:
                record.metrics = frames[i][0]
    return records


def _parse_together(header: str, members: list[tuple[int, str]]) -> Optional[dict[int, tuple[pd.DataFrame, dict]]]:
    """The files of one header as one CSV with a leading `__run` column, split back by run:
    {run: (its rows, its last row as a dict)}, the last rows taken in one call (~8 µs a run,
    not the ~70 of a row at a time)."""
    import pandas as pd

    lines = [f"__run,{header}\n"]
    for i, body in members:
        lines += [f"{i},{line}\n" for line in body[:-1].split("\n")]
    try:
        with warnings.catch_warnings():      # a row with more fields than the header: read one by one
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = read_csv(io.StringIO("".join(lines)), index_col=False)
    except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning):
        return None
    if frame.empty or frame["__run"].dtype.kind != "i":
        return None
    runs = frame.pop("__run").to_numpy()
    # read_csv leaves a block per column; one per dtype makes each run's slice, and the tables'
    # concatenation of them, ~3× cheaper
    frame = frame.copy()
    starts = [0, *(np.flatnonzero(runs[1:] != runs[:-1]) + 1), len(runs)]      # a run's rows are together
    lasts = frame.iloc[np.asarray(starts[1:]) - 1].to_dict("records")
    return {int(runs[a]): (_rows(frame, a, b), last) for a, b, last in zip(starts, starts[1:], lasts)}


def _rows(frame: pd.DataFrame, a: int, b: int) -> pd.DataFrame:
    """Rows a:b of `frame`, indexed from 0 as a file of their own reads (without reset_index's copy)."""
    part = frame.iloc[a:b]
    part.index = range(b - a)          # pandas makes it a RangeIndex
    return part


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@contextlib.contextmanager
def runs_folder(sweep_dir: Path):
    """The sweep's runs/ opened once (folder.folders), to read many runs; None when it cannot be
    (missing, a link, not a folder): each run is then read on its own, which says why."""
    with contextlib.ExitStack() as stack:
        try:
            runs = stack.enter_context(folder.folders(Path(sweep_dir, "runs"), Path(sweep_dir), create=False))
        except OSError:
            runs = None
        yield runs


def is_finished(sweep_dir: Path, rid: str) -> bool:
    """Whether the run's status.json says finished (whatever the state of its other files)."""
    info = read_run(sweep_dir, rid, config=False).info
    return info is not None and info["status"] == FINISHED


def needs_training(sweep_dir: Path, rid: str) -> bool:
    """Whether a sweep trains this run: its status.json is missing or says it did not finish.
    A finished run, or one whose status.json cannot be read (it may be a finished one), is never
    trained again: its files are replaced only when the user deletes its folder."""
    return _needs_training(read_run(sweep_dir, rid, config=False))


def _needs_training(record: RunRecord) -> bool:
    return record.status == PENDING or (record.info is not None and record.info["status"] != FINISHED)


def needing_training(sweep_dir: Path, rids) -> list[str]:
    """The runs of `rids` that needs_training says a sweep trains, in order; a run whose folder
    is not there at all is read no further."""
    present = _present(sweep_dir)
    with runs_folder(sweep_dir) as runs:
        return [rid for rid in rids if rid not in present or _needs_training(_read_run(sweep_dir, rid, None, False, runs)[0])]


def _present(sweep_dir: Path) -> set[str]:
    return set(run_ids(sweep_dir))


def check_folder(sweep_dir: Path, planned, suite: Optional[Path] = None) -> None:
    """Before a sweep writes into `sweep_dir` (a member of the `suite` folder, if given): refuse,
    with one line, a folder whose files would lead a write elsewhere or replace what cannot be
    read back — a link at any name symrun writes (sweep.lock, runs/, runs/<id>/ of a planned run,
    checkpoints/, launches/, a suite's member folder), a damaged sweep.json, or a planned run whose
    status.json is damaged (it may be a finished run: retraining would replace its files). Reads
    only."""
    sweep_dir = Path(sweep_dir)
    if suite is not None:
        if folder.kind(sweep_dir, suite) == "link":
            raise folder.link_error(sweep_dir)
        _check_names(Path(suite), ["launches", SUBMITIT_FOLDER])      # the suite folder's own
    if not sweep_dir.exists():
        return
    present = _present(sweep_dir)           # runs/<id> of runs not present need no look
    _check_names(sweep_dir, [LOCK_NAME, *FOLDERS, SUBMITIT_FOLDER, *(f"runs/{rid}" for rid in planned if rid in present)])
    problem = read_sweep(sweep_dir)[1]
    if problem is not None:
        raise OutputError(problem)
    for rid in (r for r in planned if r in present):
        record = read_run(sweep_dir, rid, config=False)
        if record.status == DAMAGED and record.info is None:     # finished or not, nobody can tell
            raise OutputError(record.problem)


def _check_names(root: Path, names: list[str]) -> None:
    """Each of `names` inside `root` is missing or what symrun writes there (the lock a file,
    the rest folders), never a link."""
    for name in names:
        what = folder.kind(root / name, root)
        if what == "link":
            raise folder.link_error(root / name)
        if what is not None and what != ("file" if name == LOCK_NAME else "dir"):
            raise OutputError(f"{root / name} is not a {'file' if name == LOCK_NAME else 'folder'}: "
                              "remove it, or use another folder")


def remove_stale_temps(sweep_dir: Path) -> list[Path]:
    """Delete what a killed sweep left behind: write_atomic's temporary files in the sweep folder,
    its run folders and checkpoints/, checkpoints of packs whose runs all finished since, and
    records of started packs (results.write_pack_start) without a checkpoint whose runs all have
    a status.json of their own since (trained again in another pack, or failed). Links are never
    entered. Call it holding the sweep's lock."""
    sweep_dir = Path(sweep_dir)
    runs = [sweep_dir / "runs" / rid for rid in run_ids(sweep_dir)]
    stale = folder.remove_temps(sweep_dir, [sweep_dir, sweep_dir / "checkpoints", *runs])
    for ids in checkpointed_packs(sweep_dir):
        if all(is_finished(sweep_dir, rid) for rid in ids):
            remove_checkpoint(sweep_dir, ids)
            stale.append(checkpoint_path(sweep_dir, ids))
    for path, running, _ in results.pack_records(sweep_dir):
        if (folder.kind(path.with_suffix(".pt"), sweep_dir) is None
                and all(read_run(sweep_dir, rid, config=False).info is not None for rid in running)):
            folder.remove(path, sweep_dir)
            stale.append(path)
    return stale


def unfinished_packs(sweep_dir: Path) -> list[list[str]]:
    """Packs to train again as they were, not regrouped: those with a checkpoint, and those of the
    folder's last launch that ended part-way (some runs written, then a kill). Trained whole again
    (sweep.run_pack writes only the runs not finished), they give the numbers an uninterrupted
    pack gives, bit for bit: a run's float rounding depends on the size of its pack."""
    last = next(iter(results.launch_plans(sweep_dir)), {})
    packs = [ids for ids in last.get("packs", []) if isinstance(ids, list) and all(isinstance(r, str) for r in ids)]
    done = {rid for ids in packs for rid in ids if is_finished(sweep_dir, rid)}
    partial = [ids for ids in packs if done & set(ids) and not set(ids) <= done]
    return checkpointed_packs(sweep_dir) + partial


def check_consistent(sweep_dir: Path, configs: dict[str, Config], swept: list[str]) -> None:
    """Refuse a grid that would mix, unseen, runs of other settings into the folder's tables: a
    setting fixed in the new grid (not a grid axis now nor in the folder's sweep.json) must have
    the value every run already in the folder has. Seeds and execution keys (EXECUTION_KEYS) are
    exempt. Runs whose config.yaml cannot be read are left out (reported as damaged)."""
    sweep_dir = Path(sweep_dir)
    if not configs or not run_ids(sweep_dir):
        return
    axes = set(swept) | set(read_sweep(sweep_dir)[0].get("swept", []))
    exempt = set(EXECUTION_KEYS) | {"seed"} | axes
    flat = [flattened(c) for c in configs.values()]
    fixed = {k: v for k, v in flat[0].items() if k not in exempt and all(f.get(k, v) == v for f in flat)}
    for rid in run_ids(sweep_dir):
        old = read_run(sweep_dir, rid).config if rid not in configs else None
        if old is None:
            continue
        for key, value in fixed.items():
            if key in old and old[key] != value:
                raise ConfigError(f"{key}={_text(value)} differs from {key}={_text(old[key])} of the runs already in "
                                  f"{sweep_dir}, where it is not a grid axis: to keep both in one sweep make it one "
                                  f"({key}={_text(old[key])},{_text(value)}), else choose another hydra.sweep.dir")


def _text(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
