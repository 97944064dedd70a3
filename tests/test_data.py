"""Data: the user's files are read faithfully or refused with one clear line; streams are per run."""

import numpy as np
import pandas as pd
import pytest
import torch

from symrun.config import DigitsDataConfig, FileDataConfig, TeacherDataConfig
from symrun.data import BatchOrder, DataError, load


def test_npz_with_test_split_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x, y, xt, yt = rng.normal(size=(30, 4)), rng.normal(size=30), rng.normal(size=(10, 4)), rng.normal(size=10)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    ds = load(FileDataConfig(path=str(tmp_path / "d.npz")))
    assert ds.task == "regression" and ds.out_dim == 1
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y[:, 0], y)
    np.testing.assert_array_equal(ds.x_test, xt)


def test_csv_targets_and_task_inference(tmp_path):
    frame = pd.DataFrame({"a": [0.1, 0.2, 0.3, 0.4], "b": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 1, 2]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    ds = load(FileDataConfig(path=str(tmp_path / "d.csv"), target=["label"]))
    assert ds.task == "classification" and ds.n_classes == 3 and ds.in_dim == 2
    np.testing.assert_array_equal(ds.y, [0, 1, 1, 2])
    reg = load(FileDataConfig(path=str(tmp_path / "d.csv"), target=["label"], task="regression"))
    assert reg.task == "regression" and reg.y.shape == (4, 1)
    two = load(FileDataConfig(path=str(tmp_path / "d.csv"), target=["a", "b"]))
    assert two.task == "regression" and two.out_dim == 2 and two.in_dim == 1


def test_negative_whole_targets_taken_for_labels_name_data_task_regression(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3))
    np.savez(tmp_path / "d.npz", x=x, y=np.array([1.0, -1.0, 2.0, -2.0, 0.0, 1.0]))
    with pytest.raises(DataError, match=r"must be non-negative integers \(data.task=auto took .* set data.task=regression"):
        load(FileDataConfig(path=str(tmp_path / "d.npz")))
    with pytest.raises(DataError, match=r"must be non-negative integers$"):     # asked for: no guess to correct
        load(FileDataConfig(path=str(tmp_path / "d.npz"), task="classification"))
    assert load(FileDataConfig(path=str(tmp_path / "d.npz"), task="regression")).y[:, 0].tolist() == [1, -1, 2, -2, 0, 1]


def test_test_fraction_splits_without_overlap(tmp_path):
    x = np.arange(40, dtype=float).reshape(20, 2)
    np.savez(tmp_path / "d.npz", x=x, y=x[:, 0] * 0.5)
    ds = load(FileDataConfig(path=str(tmp_path / "d.npz"), test_fraction=0.25))
    assert len(ds.x) == 15 and len(ds.x_test) == 5
    assert not set(ds.x[:, 0]) & set(ds.x_test[:, 0])


@pytest.mark.parametrize("writer, message", [
    (lambda p: np.savez(p / "d.npz", x=np.ones((3, 2))), "needs arrays 'x' and 'y'"),
    (lambda p: np.savez(p / "d.npz", x=np.ones((3, 2)), y=np.ones(4)), "3 rows but y has 4"),
    (lambda p: np.savez(p / "d.npz", x=np.array([[1.0, np.nan]]), y=np.ones(1)), "NaN"),
    (lambda p: (p / "d.npz").write_text("not a zip"), "not a readable .npz"),
    (lambda p: np.savez(p / "d.npz", x=np.ones((3, 2)), y=np.ones(3), x_test=np.ones((2, 2))), "both 'x_test' and 'y_test'"),
])
def test_malformed_npz_is_refused(tmp_path, writer, message):
    writer(tmp_path)
    with pytest.raises(DataError, match=message):
        load(FileDataConfig(path=str(tmp_path / "d.npz")))


def test_malformed_csv_is_refused(tmp_path):
    pd.DataFrame({"a": ["x", "y"], "t": [1.0, 2.0]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match="numeric"):
        load(FileDataConfig(path=str(tmp_path / "d.csv"), target=["t"]))
    with pytest.raises(DataError, match="not in the header"):
        load(FileDataConfig(path=str(tmp_path / "d.csv"), target=["nope"]))
    with pytest.raises(DataError, match="data.target"):
        load(FileDataConfig(path=str(tmp_path / "d.csv")))
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(DataError, match=".npz or .csv"):
        load(FileDataConfig(path=str(tmp_path / "d.txt")))


def test_digits_are_bundled_and_split():
    ds = load(DigitsDataConfig(test_fraction=0.2))
    assert ds.task == "classification" and ds.n_classes == 10 and ds.in_dim == 64
    assert len(ds.x) + len(ds.x_test) == 1797
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0


def test_teacher_is_deterministic_in_its_seed_and_whitening_is_exact():
    a, b, c = (load(TeacherDataConfig(seed=s)) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.allclose(a.x, c.x)
    w = load(TeacherDataConfig(teacher="low_rank", out_dim=5, whiten=True))
    np.testing.assert_allclose(w.x.T @ w.x / len(w.x), np.eye(w.in_dim), atol=1e-10)
    sparse = load(TeacherDataConfig(noise_std=0.0, nonzero=3))
    beta = np.linalg.lstsq(sparse.x, sparse.y, rcond=None)[0]
    assert np.count_nonzero(np.abs(beta) > 1e-8) == 3


def test_batch_order_of_a_run_does_not_depend_on_its_neighbours():
    alone = BatchOrder(10, 3, [7], torch.device("cpu"))
    packed = BatchOrder(10, 3, [1, 7, 2], torch.device("cpu"))
    seen = []
    for _ in range(7):                      # crosses epoch boundaries (3 batches per epoch, last dropped)
        a, p = alone.next(), packed.next()
        assert torch.equal(a[0], p[1])
        seen.append(a[0])
    epoch = torch.cat(seen[:3])
    assert len(set(epoch.tolist())) == 9    # no index repeats within an epoch
    with pytest.raises(DataError):
        BatchOrder(3, 4, [0], torch.device("cpu"))


def test_runs_of_one_seed_share_an_order_drawn_once_and_equal_to_a_run_alone():
    alone = BatchOrder(10, 3, [7], torch.device("cpu"))
    packed = BatchOrder(10, 3, [7, 1, 7, 7], torch.device("cpu"))
    assert len(packed.distinct) == 2 and packed.generators[0] is packed.generators[3]
    for _ in range(7):
        a, p = alone.next(), packed.next()
        assert torch.equal(p[0], a[0]) and torch.equal(p[2], a[0]) and torch.equal(p[3], a[0])
        assert not torch.equal(p[1], a[0])


def test_degenerate_files_are_refused(tmp_path):
    pd.DataFrame({"a": [], "t": []}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(DataError, match="no rows"):
        load(FileDataConfig(path=str(tmp_path / "empty.csv"), target=["t"]))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 2)), y=np.zeros(0))
    with pytest.raises(DataError, match="empty"):
        load(FileDataConfig(path=str(tmp_path / "empty.npz")))
    np.savez(tmp_path / "two.npz", x=np.ones((4, 2)), y=np.ones((4, 2), dtype=int))
    with pytest.raises(DataError, match="one label per row"):
        load(FileDataConfig(path=str(tmp_path / "two.npz"), task="classification"))


def test_digits_read_without_scikit_learn_are_load_digits():
    from sklearn.datasets import load_digits

    from symrun.data import datasets

    x, y = datasets.digits()
    bunch = load_digits()
    assert np.array_equal(x, bunch.data) and x.dtype == bunch.data.dtype
    assert np.array_equal(y, bunch.target)
    with pytest.raises(ValueError):         # shared by every load in the process: read-only
        x[0, 0] = 1.0


def test_a_data_files_digest_is_of_its_bytes_and_none_for_what_is_not_a_regular_file(tmp_path):
    import hashlib
    import os

    from symrun.data import datasets, digest

    (tmp_path / "d.csv").write_bytes(b"a,t\n1,2\n")
    assert digest(FileDataConfig(path=str(tmp_path / "d.csv"))) == hashlib.sha256(b"a,t\n1,2\n").hexdigest()
    assert digest(DigitsDataConfig()) is None and digest(TeacherDataConfig()) is None      # they read no file of the user's
    os.mkfifo(tmp_path / "fifo.csv")          # no writer: a blocking read would hang
    assert datasets.file_digest(tmp_path / "fifo.csv") is None
    assert datasets.file_digest(tmp_path) is None and datasets.file_digest(tmp_path / "missing.csv") is None
