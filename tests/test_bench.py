"""The benchmark's bookkeeping (its timings are the record, not asserted here)."""

import subprocess
import sys

import pytest
import torch

from symrun import bench, wholebench


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
    for name in ("W1 mlp", "label flips p = 0.1", "hadamard", "factorization", "Pack-size scaling", "fp32 matmul peak",
                 "as a whole process", "`symrun sweep` s", "torch.func s", "Where `symrun sweep` spends its time",
                 "Within each round", "its floor", "start-up"):
        assert name in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| W1 mlp")]
    assert len(rows) == 3 and all("×" in r for r in rows)        # 8 and 32 runs, 8 with label flips
    whole = [ln for ln in text.splitlines() if ln.startswith(("| W1:", "| W1 as your own nn.Module", "| Hadamard d=20"))]
    assert len(whole) == 3 and all(r.count("×**") == 2 for r in whole)          # vs lean, vs torch.func
    # around training, then its floor, as percentages (3 steps: both are ~100 %; the arithmetic is
    # test_the_floor_is_start_up_and_metrics_over_them_and_the_steps)
    shares = [[int(c.strip().rstrip("%")) for c in r.split("|")[-3:-1]] for r in whole]
    assert all(0 <= floor <= around <= 100 for around, floor in shares)
    for phase in ("training steps", "critical weight decay λ_c", "tables and figures", "planning"):
        assert sum(ln.startswith(f"| {phase}") for ln in text.splitlines()) == 3      # one profile per workload
    # the report is built by a forked child, which cProfile does not see: the sweep's wait for it is the phase
    assert all(float(ln.split("|")[2]) > 0 for ln in text.splitlines() if ln.startswith("| tables and figures"))


def test_the_start_up_floor_takes_each_processs_fastest_round():
    # (import torch, import hydra/omegaconf/typer, a bare interpreter), seconds, two rounds: torch's
    # import and the CLI libraries' beyond a bare start, each at its fastest
    assert wholebench.startup_floor([(2.0, 0.30, 0.02), (1.8, 0.35, 0.03)]) == pytest.approx(1.8 + 0.30 - 0.02)
    assert wholebench.startup_floor([(1.5, 0.01, 0.02)]) == 1.5           # the libraries never count below zero


def test_the_floor_is_start_up_and_metrics_over_them_and_the_steps():
    # a 10 s sweep with 6 s of steps: 40 % around training; of the 4 s, start-up 2 s and the
    # metrics 1 s are the floor, 3 / (3 + 6)
    t = wholebench.Timing(10.0, 0.0, "")
    r = wholebench.Result(wholebench.w1(10), t, t, 10.0, t, {}, sweep_trained=6.0, sweep_metrics=1.0, startup=2.0)
    assert r.around() == pytest.approx(0.4) and r.floor() == pytest.approx(1 / 3)


def _script(tmp_path, name: str, *args: str) -> tuple[list[list[str]], float]:
    from symrun import baselines

    path = tmp_path / f"{name}.py"
    path.write_text(baselines.SCRIPTS[name])
    out = tmp_path / f"{name}.csv"
    done = subprocess.run([sys.executable, str(path), *args, "--out", str(out)], capture_output=True, text=True, check=True)
    rows = [line.split(",") for line in out.read_text().splitlines()]
    return rows, wholebench.trained_seconds(done.stdout)


@pytest.mark.slow
def test_the_baseline_scripts_train_the_same_grid(tmp_path):
    """The lean loop and the torch.func recipe start every run from the same initialisation
    (torch.manual_seed(seed), then the module), so on full-batch GD — no sampling — they must end
    at the same losses; and training lowers the loss."""
    grid = ["--model", "hadamard", "--lr", "0.1", "--wds", "0,0.05", "--seeds", "2"]
    lean, t_lean = _script(tmp_path, "lean", *grid, "--steps", "200")
    func, _ = _script(tmp_path, "torch_func", *grid, "--steps", "200")
    untrained, _ = _script(tmp_path, "lean", *grid, "--steps", "0")
    assert lean[0] == func[0] == ["weight_decay", "seed", "train_loss"] and len(lean) == len(func) == 5
    for a, b, c in zip(lean[1:], func[1:], untrained[1:]):
        assert a[:2] == b[:2] and float(a[2]) == pytest.approx(float(b[2]), rel=1e-4)
        assert float(a[2]) < 0.5 * float(c[2])
    assert t_lean > 0
    part, _ = _script(tmp_path, "lean", *grid, "--steps", "5", "--runs", "3")             # a subset of the grid
    assert len(part) == 4
    mlp, _ = _script(tmp_path, "torch_func", "--model", "mlp", "--batch", "64", "--steps", "30", "--wds", "0", "--seeds", "2")
    assert len(mlp) == 3 and all(float(r[2]) < 2.3 for r in mlp[1:])          # below chance level, ln 10


def test_a_sweeps_seconds_are_its_packs_steps_and_the_rest_summed(cli, tmp_path):
    import json

    cli("sweep", "--outputs", "out", "model=hadamard", "data.n=40,50", "seed=0,1", "train.steps=300")
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/*/runs/*/status.json")]
    per_pack = {s["pack"]: s["train_time_s"] for s in statuses}
    assert len(statuses) == 4 and len(per_pack) == 2                  # two data sizes: two packs
    assert all(0 < s["train_time_s"] < s["wall_time_s"] for s in statuses)   # the steps, not the pack's metrics
    # and the packs' time outside their steps: their metrics at step 0 and at the end, λ_c
    outside = {s["pack"]: s["wall_time_s"] - s["train_time_s"] for s in statuses}
    trained, metrics = wholebench.sweep_seconds(tmp_path / "out")
    assert trained == pytest.approx(sum(per_pack.values()), rel=1e-12)
    assert metrics == pytest.approx(sum(outside.values()), rel=1e-9) and metrics > 0
