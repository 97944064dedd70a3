"""The benchmark's bookkeeping (its timings are the record, not asserted here)."""

import pytest
import torch

from symrun import bench


def test_chain_flops_counts_forward_weight_and_hidden_gradients():
    # 64-128-10 on 64 rows: forward 2·64·(64·128 + 128·10); backward the same for the weight
    # gradients plus the gradient into the hidden layer (2·64·128·10); none into the data.
    fwd = 2 * 64 * (64 * 128 + 128 * 10)
    assert bench.chain_flops([64, 128, 10], 64) == 2 * fwd + 2 * 64 * 128 * 10


def test_write_section_replaces_only_its_own_device(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nanalysis by hand\n\n<!-- bench:cuda -->\ngpu numbers\n<!-- /bench:cuda -->\n")
    bench.write_section(path, torch.device("cpu"), "first")
    bench.write_section(path, torch.device("cpu"), "second")
    text = path.read_text()
    assert "analysis by hand" in text and "gpu numbers" in text
    assert "second" in text and "first" not in text and text.count("<!-- bench:cpu -->") == 1


def test_naive_batches_are_epochs_without_repeats():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    for lean in (False, True):
        batches = bench._batches(x, y, 3, lean)
        epoch = torch.cat([next(batches)[1] for _ in range(3)])            # 3 batches of 3, 1 dropped
        assert len(set(epoch.tolist())) == 9


@pytest.mark.slow
def test_quick_bench_writes_every_workload(tmp_path):
    out = tmp_path / "B.md"
    bench.main(["--quick", "--steps", "3", "--naive-runs", "1", "--write", str(out)])
    text = out.read_text()
    for name in ("W1 mlp", "label flips p = 0.1", "hadamard", "factorization", "Pack-size scaling", "fp32 matmul peak"):
        assert name in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| W1")]
    assert len(rows) == 3 and all("×" in r for r in rows)        # 8 and 32 runs, 8 with label flips
