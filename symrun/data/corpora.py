"""Real data read from local files: CIFAR-10 in its python format, and character-level text.

Neither downloads. CIFAR-10 is read directly from the python-pickle batches (torchvision's
reader insists on the files' published checksums, so it cannot read a subset or a stand-in);
the pickles are opened with an unpickler that accepts numpy arrays and plain containers only.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from symrun.config import Cifar10DataConfig, TextDataConfig
from symrun.data.dataset import DataError, Dataset
from symrun.seeds import derive_seed

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR_SIDE, CIFAR_CLASSES = 32, 10


class _ArraysOnly(pickle.Unpickler):
    """Unpickles what the CIFAR batches hold (dicts, lists, bytes, numpy arrays) and refuses any
    other global, so a malicious file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def cifar_folder(root: Path) -> Path:
    """The cifar-10-batches-py folder under `root` (torchvision's layout), or `root` itself."""
    return root / CIFAR_FOLDER if (root / CIFAR_FOLDER).is_dir() else root


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3072) uint8 in CHW order, labels (N,) int64) of one batch file."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:  # unpickling and key errors come in many types
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * CIFAR_SIDE**2:
        raise DataError(f"{path}: not a CIFAR-10 python batch (data is {images.dtype} {images.shape}, "
                        f"expected uint8 (N, {3 * CIFAR_SIDE**2}))")
    if labels.shape != (len(images),) or labels.min(initial=0) < 0 or labels.max(initial=0) >= CIFAR_CLASSES:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({len(labels)} labels for {len(images)} images, "
                        f"labels must be 0..{CIFAR_CLASSES - 1})")
    return images, labels


def cifar10(cfg: Cifar10DataConfig) -> Dataset:
    """CIFAR-10 from `cfg.root`; x (n, 3072) float32 standardised per channel with the training
    images' mean and std, in CHW order; y (n,) int64 class labels."""
    folder = cifar_folder(Path(cfg.root).expanduser())
    missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"no CIFAR-10 at {folder} (missing {', '.join(missing)}; data.root must hold "
                        f"{CIFAR_FOLDER} from the python version: data_batch_1..5 and test_batch)")
    train = [_cifar_batch(folder / name) for name in CIFAR_FILES[:-1]]
    x, y = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    x_test, y_test = _cifar_batch(folder / "test_batch")
    x, y = _subset(x, y, cfg.subset, cfg.seed, "subset")
    x_test, y_test = _subset(x_test, y_test, cfg.test_subset, cfg.seed, "test-subset")
    channels = x.reshape(len(x), 3, -1).astype(np.float64) / 255.0
    mean, std = channels.mean(axis=(0, 2)), channels.std(axis=(0, 2)).clip(min=1e-8)

    def standardise(images: np.ndarray) -> np.ndarray:
        z = (images.reshape(len(images), 3, -1) / 255.0 - mean[:, None]) / std[:, None]
        return z.reshape(len(images), -1).astype(np.float32)

    return Dataset(standardise(x), y, "classification", standardise(x_test), y_test, CIFAR_CLASSES)


def _subset(x: np.ndarray, y: np.ndarray, size, seed: int, purpose: str):
    if size is None or size >= len(x):
        return x, y
    keep = np.sort(np.random.default_rng(derive_seed(seed, purpose)).permutation(len(x))[:size])
    return x[keep], y[keep]


# ---------------------------------------------------------------------------------------------
# character-level text


def text(cfg: TextDataConfig) -> Dataset:
    """Windows of `cfg.context` character ids, x (n, T) (as floats, the engine's input dtype;
    exact below 2²⁴), and the next character at each position, y (n, T) int64. The last
    `test_fraction` of the text gives the test windows."""
    source = cfg.path or "the generated text"
    if cfg.path is None:
        content = grammar_text(cfg.length, cfg.seed)
    else:
        try:
            content = Path(cfg.path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{cfg.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not content:
            raise DataError(f"{cfg.path}: the text file is empty")
    codes = np.frombuffer(content.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.unique(codes)
    ids = np.searchsorted(vocab, codes)
    cut = len(ids) - int(round(cfg.test_fraction * len(ids)))
    stride = cfg.stride or cfg.context
    x, y = _windows(ids[:cut], cfg.context, stride)
    if len(x) == 0:
        raise DataError(f"{source}: {cut} characters of training text, fewer than data.context + 1 = {cfg.context + 1}")
    x_test, y_test = _windows(ids[cut:], cfg.context, stride)
    has_test = len(x_test) > 0
    return Dataset(x.astype(np.float64), y, "classification", x_test.astype(np.float64) if has_test else None,
                   y_test if has_test else None, len(vocab))


def _windows(ids: np.ndarray, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ids[s : s+T] and targets ids[s+1 : s+T+1] for s = 0, stride, …: (n, T) each."""
    starts = np.arange(0, len(ids) - context, stride)
    index = starts[:, None] + np.arange(context)
    return ids[index].astype(np.int64), ids[index + 1].astype(np.int64)


# A small grammar written for symrun: its sentences have structure at several scales (spelling,
# agreement of articles, phrase order), so a character model has something to learn.
_WORDS = {
    "det": ["the", "a", "every", "one", "no"],
    "adj": ["small", "red", "quiet", "old", "bright", "heavy", "green"],
    "noun": ["cat", "river", "lamp", "stone", "bird", "garden", "clock", "window"],
    "name": ["Ada", "Emmy", "Kurt", "Sofia", "Alan"],
    "verb": ["sees", "holds", "finds", "follows", "likes", "paints"],
    "intransitive": ["sleeps", "waits", "sings", "falls"],
    "adverb": ["slowly", "often", "today", "again", "quietly"],
}


def grammar_text(length: int, seed: int) -> str:
    """At least `length` characters of sentences from the grammar above, cut to `length`;
    deterministic in `seed`."""
    rng = np.random.default_rng(derive_seed(seed, "text"))
    pick = lambda kind: _WORDS[kind][rng.integers(len(_WORDS[kind]))]  # noqa: E731

    def noun_phrase() -> str:
        if rng.random() < 0.25:
            return pick("name")
        return " ".join([pick("det")] + ([pick("adj")] if rng.random() < 0.5 else []) + [pick("noun")])

    def clause() -> str:
        if rng.random() < 0.6:
            return f"{noun_phrase()} {pick('verb')} {noun_phrase()}"
        return f"{noun_phrase()} {pick('intransitive')}" + (f" {pick('adverb')}" if rng.random() < 0.5 else "")

    parts, size = [], 0
    while size < length:
        sentence = clause() + (f", and {clause()}" if rng.random() < 0.3 else "")
        sentence = sentence[0].upper() + sentence[1:] + (".\n" if rng.random() < 0.2 else ". ")
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:length]
