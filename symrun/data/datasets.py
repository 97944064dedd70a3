"""Datasets (synthetic teacher, bundled digits, a user's file, CIFAR-10 from a local folder,
character-level text) and per-run minibatch order.

Nothing here downloads: the teacher is generated from `data.seed`, digits ship with
scikit-learn, `data=file` reads the user's own `.npz` or `.csv`, `data=cifar10` a CIFAR-10 folder
already on disk, and `data=text` a local text file (or a text generated from a small grammar).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from symrun.training import memory
from symrun.data import corpora
from symrun.data.dataset import DataError, Dataset
from symrun.config import Cifar10DataConfig, DataConfig, DigitsDataConfig, FileDataConfig, TeacherDataConfig, TextDataConfig
from symrun.seeds import by_seed, derive_seed, generator

if TYPE_CHECKING:       # torch waits for the minibatch orders: reading a sweep back needs none
    import torch


def load(cfg: DataConfig) -> Dataset:
    """Build the dataset a data config describes (deterministic in `cfg.seed`)."""
    if isinstance(cfg, TeacherDataConfig):
        return _teacher(cfg)
    if isinstance(cfg, DigitsDataConfig):
        x, y = digits()
        return _finish(x / 16.0, y.astype(np.int64), None, None, "classification", cfg.test_fraction, cfg.seed)
    if isinstance(cfg, FileDataConfig):
        x, y, x_test, y_test = _read_file(Path(cfg.path).expanduser(), cfg.target)
        return _finish(x, y, x_test, y_test, cfg.task, cfg.test_fraction, cfg.seed)
    if isinstance(cfg, (Cifar10DataConfig, TextDataConfig)):
        return corpora.cifar10(cfg) if isinstance(cfg, Cifar10DataConfig) else corpora.text(cfg)
    raise DataError(f"unknown data option '{cfg.name}'")


def source_file(cfg: DataConfig) -> Optional[Path]:
    """The one file a data option reads, as it reads it (data=file, data=text with a path), else None."""
    if isinstance(cfg, (FileDataConfig, TextDataConfig)) and cfg.path is not None:
        return Path(cfg.path).expanduser()
    return None


def file_digest(path: Path) -> Optional[str]:
    """The SHA-256 of a regular file's bytes, or None when `path` is not one (missing, a folder, a
    FIFO or a device: opened without blocking and never read). A file read before in this process
    and unchanged since (the same inode, size and modification time) is not read again: a sweep's
    packs share one data file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with os.fdopen(fd, "rb") as f:
        if key not in _DIGESTS:
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple[int, int, int, int], str] = {}


def digest(cfg: DataConfig) -> Optional[str]:
    """The SHA-256 of the file a data option reads (`source_file`), None where it reads none. A
    run records it (status.json, runs.csv's data_sha256), so that a report reads back only the
    data its runs were trained on (symrun.analysis.agreement)."""
    path = source_file(cfg)
    return None if path is None else file_digest(path)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as load_digits gives them, (pixels 0–16 (1797, 64), labels
    (1797,)), read once per process and read-only. The CSV is read where scikit-learn keeps it,
    without importing scikit-learn's dataset loaders (~1 s of a sweep's start-up); an install
    without that file goes through load_digits."""
    spec = importlib.util.find_spec("sklearn")
    where = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if where is not None and where.is_file():
        with gzip.open(where, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        x, y = table[:, :-1], table[:, -1].astype(int)
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data, bunch.target
    x.flags.writeable = y.flags.writeable = False
    return x, y


def for_task(ds: Dataset, change: str, data_seed: int, task: int) -> Dataset:
    """Task `task` of a task sequence (config.TasksConfig): task 0 is `ds`; task k ≥ 1 permutes
    the input features (`pixels`) or the class labels (`labels`, classification only) with a
    permutation drawn from (data_seed, k), the same for every run."""
    if task == 0:
        return ds
    rng = np.random.default_rng(derive_seed(data_seed, f"task-{task}"))
    if change == "pixels":
        perm = rng.permutation(ds.in_dim)
        return Dataset(ds.x[:, perm], ds.y, ds.task, None if ds.x_test is None else ds.x_test[:, perm],
                       ds.y_test, ds.n_classes)
    if ds.task != "classification":
        raise DataError("tasks.change=labels permutes class labels: it needs a classification task")
    perm = rng.permutation(ds.n_classes)
    return Dataset(ds.x, perm[ds.y], ds.task, ds.x_test, None if ds.y_test is None else perm[ds.y_test], ds.n_classes)


def _teacher(cfg: TeacherDataConfig) -> Dataset:
    n_all, d, o = cfg.n + cfg.n_test, cfg.dim, cfg.out_dim
    # x, the targets and their copies in float64 (and whitening's d × d matrices), before any is made
    memory.check(8 * (3 * n_all * (d + o) + (3 * d * d if cfg.whiten else 0)),
                 f"the teacher's data ({n_all} rows of data.dim={d})", "lower data.dim, data.n or data.n_test")
    rng = np.random.default_rng(derive_seed(cfg.seed, "teacher"))
    x = rng.standard_normal((n_all, d))
    if cfg.teacher == "sparse_linear":
        beta = np.zeros((d, o))
        for j in range(o):
            idx = rng.choice(d, size=min(cfg.nonzero, d), replace=False)
            # Spread magnitudes so coefficients leave the lasso path at different λ.
            beta[idx, j] = rng.choice([-1.0, 1.0], size=len(idx)) * np.linspace(1.0, 0.2, len(idx))
        target = x @ beta
    elif cfg.teacher == "low_rank":
        r = min(cfg.rank, d, o)
        a, _ = np.linalg.qr(rng.standard_normal((o, r)))
        b, _ = np.linalg.qr(rng.standard_normal((d, r)))
        s = np.linspace(1.0, 0.3, r)          # distinct singular values → a staircase of ranks under SVT
        target = x @ (a * s @ b.T).T
    else:  # mlp teacher: y = a·tanh(W x)
        w = rng.standard_normal((cfg.hidden, d)) / np.sqrt(d)
        a = rng.standard_normal((o, cfg.hidden)) / np.sqrt(cfg.hidden)
        target = np.tanh(x @ w.T) @ a.T
    y = target + cfg.noise_std * rng.standard_normal((n_all, o))
    x_tr, y_tr, x_te, y_te = x[: cfg.n], y[: cfg.n], x[cfg.n:], y[cfg.n:]
    if cfg.whiten:
        # Exact whitening: XᵀX/n = I on the training set (docs/theory.md §5.2 assumes it).
        cov = x_tr.T @ x_tr / cfg.n
        evals, evecs = np.linalg.eigh(cov)
        inv_sqrt = evecs @ np.diag(evals ** -0.5) @ evecs.T
        x_tr, x_te = x_tr @ inv_sqrt, x_te @ inv_sqrt
    has_test = cfg.n_test > 0
    return Dataset(x_tr, y_tr, "regression", x_te if has_test else None, y_te if has_test else None)


def _read_file(path: Path, target: Optional[list[str]]):
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                _check_npz(path, z)
                arrays = {k: z[k] for k in z.files}
        except DataError:
            raise
        except Exception as e:  # zip/format errors come in many types
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        if "x" not in arrays or "y" not in arrays:
            raise DataError(f"{path}: an .npz needs arrays 'x' and 'y' (found: {', '.join(arrays) or 'none'})")
        if ("x_test" in arrays) != ("y_test" in arrays):
            raise DataError(f"{path}: give both 'x_test' and 'y_test' or neither")
        return arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test")
    if path.suffix == ".csv":
        import pandas as pd

        if not target:
            raise DataError("data=file with a .csv needs data.target=[column,...] naming the target column(s)")
        try:
            frame = pd.read_csv(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable .csv file ({e})") from None
        missing = [c for c in target if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: target column(s) {missing} not in the header {list(frame.columns)}")
        if len(frame) == 0:
            raise DataError(f"{path}: the file has a header but no rows")
        features = frame.drop(columns=list(target))
        bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
        if bad or features.shape[1] == 0:
            raise DataError(f"{path}: feature columns must be numeric (non-numeric: {bad})" if bad else f"{path}: no feature columns")
        y = frame[list(target)].to_numpy(copy=True)      # copies: pandas' own arrays may be read-only
        return features.to_numpy(dtype=np.float64, copy=True), (y[:, 0] if len(target) == 1 else y), None, None
    raise DataError(f"{path}: data=file reads .npz or .csv, got '{path.suffix or 'no extension'}'")


def _check_npz(path: Path, z) -> None:
    """Each array's dtype and size from its header, before any is read: numbers only, and no
    more than the memory there is (a few bytes of a compressed file can claim terabytes)."""
    need = 0
    for name in z.files:
        with z.zip.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
        if name in ("x", "y", "x_test", "y_test") and dtype.kind not in "biuf":
            raise DataError(f"{path}: array '{name}' holds {dtype} values, not numbers")
        need += 3 * int(np.prod(shape, dtype=np.float64)) * 8     # read, then converted to float64
    memory.check(need, f"the arrays of {path}", "use a smaller data file")


def _finish(x, y, x_test, y_test, task: str, test_fraction: float, seed: int) -> Dataset:
    """Validate shapes, infer the task, split off a test set; arrays in the Dataset conventions."""
    if np.size(x) == 0 or np.size(y) == 0:
        raise DataError("x and y must not be empty")
    x = _as_2d(x, "x")
    if len(y) != len(x):
        raise DataError(f"x has {len(x)} rows but y has {len(y)}")
    if x_test is not None:
        x_test = _as_2d(x_test, "x_test")
        if x_test.shape[1] != x.shape[1] or len(y_test) != len(x_test):
            raise DataError(f"x_test/y_test shapes {x_test.shape}/{np.shape(y_test)} do not match x {x.shape}")
    for name, a in (("y", y), ("y_test", y_test)):
        if a is not None and np.asarray(a).dtype.kind not in "biuf":
            raise DataError(f"{name} must be numeric")
        if a is not None and not np.isfinite(np.asarray(a, dtype=np.float64)).all():
            raise DataError(f"{name} contains NaN or infinite values")
    inferred = task == "auto"
    if inferred:
        task = _infer_task(np.asarray(y))
    if x_test is None and test_fraction > 0:
        perm = np.random.default_rng(derive_seed(seed, "split")).permutation(len(x))
        n_test = max(1, int(round(test_fraction * len(x))))
        test, train = perm[:n_test], perm[n_test:]
        x, y, x_test, y_test = x[train], np.asarray(y)[train], x[test], np.asarray(y)[test]
    if len(x) == 0:
        raise DataError("the training set is empty")
    n_classes = None
    if task == "classification":
        try:
            y, y_test = _labels(y, "y"), None if y_test is None else _labels(y_test, "y_test")
        except DataError as e:
            if not inferred:
                raise
            raise DataError(f"{e} (data.task=auto took y's few whole numbers for class labels: "
                            "set data.task=regression if they are a regression target)") from None
        n_classes = int(max(y.max(), -1 if y_test is None else y_test.max())) + 1
    else:
        y = _as_2d(np.asarray(y, dtype=np.float64), "y")
        y_test = None if y_test is None else _as_2d(np.asarray(y_test, dtype=np.float64), "y_test")
    return Dataset(x, y, task, x_test, y_test, n_classes)


def _as_2d(a, name: str) -> np.ndarray:
    if np.asarray(a).dtype.kind not in "biuf":
        raise DataError(f"{name} must hold numbers, got {np.asarray(a).dtype} values")
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(len(a), -1) if a.ndim != 2 else a
    if not np.isfinite(a).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return a


SPARSE_CLASSES = 100   # above this many outputs, most of them for labels that never occur is refused


def _labels(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim > 1 and y.shape[1:] != (1,) * (y.ndim - 1):
        raise DataError(f"{name}: classification needs one label per row, got shape {y.shape}")
    y = y.reshape(-1)
    if not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0:
        raise DataError(f"{name}: classification labels must be non-negative integers")
    # One output per label 0..max: labels {0, 10000} would make 10001 outputs, and neural
    # collapse's class × class matrices gigabytes, for two classes.
    distinct, classes = len(np.unique(y)), int(y.max()) + 1
    if classes > SPARSE_CLASSES and classes > 2 * distinct:
        raise DataError(f"{name}: classification labels must be numbered 0..C−1: they go up to {classes - 1} but "
                        f"only {distinct} distinct labels occur; renumber them 0..{distinct - 1}")
    return y.astype(np.int64)


def _infer_task(y: np.ndarray) -> str:
    flat = y.reshape(len(y), -1)
    if flat.shape[1] == 1 and np.all(np.mod(flat, 1) == 0) and len(np.unique(flat)) <= 50:
        return "classification"
    return "regression"


class BatchOrder:
    """Per-run minibatch indices: each run shuffles with its own stream, epoch by epoch.

    A run's order depends only on (its seed, n, batch_size), never on the other runs of its
    pack. The last partial batch of an epoch is dropped so every step has the same shape.

    Runs of one seed (a grid over weight decay, lr or noise) share one stream, so each epoch's
    permutation is drawn once per distinct seed. `generators` still has one entry per run (those
    of a seed are one object), as a checkpoint saves and restores them.
    """

    def __init__(self, n: int, batch_size: int, seeds: list[int], device: torch.device):
        if batch_size > n:
            raise DataError(f"data.batch_size={batch_size} exceeds the {n} training examples")
        import torch

        self.n, self.batch_size, self.device = n, batch_size, device
        distinct, places = by_seed(seeds)
        self.distinct = [generator(s, "data-order") for s in distinct]
        self.generators = [self.distinct[i] for i in places]
        self.index = torch.tensor(places)                                     # run → its seed's stream
        self.per_epoch = n // batch_size
        self.step_in_epoch = self.per_epoch  # draw an epoch at the first call
        self.perm: torch.Tensor | None = None

    def next(self) -> torch.Tensor:
        """Indices of the next minibatch, (R, B)."""
        if self.step_in_epoch == self.per_epoch:
            import torch

            perms = torch.stack([torch.randperm(self.n, generator=g) for g in self.distinct])
            self.perm = (perms if len(self.distinct) == len(self.generators) else perms[self.index]).to(self.device)  # (R, n)
            self.step_in_epoch = 0
        s = self.step_in_epoch * self.batch_size
        self.step_in_epoch += 1
        return self.perm[:, s: s + self.batch_size]
