"""The training loss of every run of a pack at once (docs/theory.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def loss_per_run(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Half-MSE (1/2n)Σ‖f − y‖² or mean cross-entropy, per run: out (R, B, o) → (R,). A sequence
    model's (R, B, T, classes) with targets (B, T) takes the mean over every position."""
    if task == "regression":
        return 0.5 * _sum_over(-1, (out - y).pow(2)).mean(-1)
    # log-sum-exp written out: F.cross_entropy over a 10-wide last axis costs ~4× more on CPU here
    shift = out - out.detach().amax(dim=-1, keepdim=True)
    picked = shift.gather(-1, y.expand(out.shape[:-1]).unsqueeze(-1)).squeeze(-1)    # (R, B[, T])
    return (shift.exp().sum(dim=-1).log() - picked).flatten(1).mean(dim=-1)


def loss_and_grad_t(out: torch.Tensor, y: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_per_run of a feature-major output (R, o, B) — of `out.mT` — and its gradient with
    respect to `out`, written out, for a model's hand-written step (PackedModel.loss_and_grads):
    (f − y)/B for half-MSE, (softmax(f) − onehot(y))/B for cross-entropy. `out` is overwritten
    (it becomes the gradient). Targets as loss_per_run takes them: shared (B[, o]) or per run
    (R, B[, o])."""
    n = out.shape[-1]
    if task == "regression":
        target = y.mT if y.dim() == out.dim() else y.T
        grad = out.sub_(target)
        loss = 0.5 * _sum_over(1, grad.square()).mean(-1)
        return loss, grad.mul_(1.0 / n)
    out.sub_(out.amax(dim=1, keepdim=True))
    labels = y.expand(out.shape[0], n).unsqueeze(1)                  # (R, 1, B)
    picked = out.gather(1, labels).squeeze(1)                        # (R, B)
    grad = out.exp_()
    total = grad.sum(dim=1, keepdim=True)
    loss = (total.squeeze(1).log() - picked).mean(-1)
    grad.div_(total).scatter_add_(1, labels, grad.new_full((1, 1, 1), -1.0).expand(labels.shape))
    return loss, grad.mul_(1.0 / n)


def _sum_over(dim: int, t: torch.Tensor) -> torch.Tensor:
    """t.sum(dim), the same values; a single output (dim of size 1) is taken as it is. torch's CPU
    sum over an axis of size 1 costs ~8× the values' own copy: 1.5 ms a step for the Hadamard
    grid's 2,176 runs × 200 residuals on a part's thread, half the rest of its step."""
    return t.squeeze(dim) if t.shape[dim] == 1 else t.sum(dim)


@dataclass(frozen=True)
class RunLoss:
    """loss_per_run with its targets bound, out (R, B, o) ↦ (R,), for code that takes a loss as a
    function of the output (symrun.analysis.critical); `grad_t` is its gradient with respect to a
    feature-major output (R, o, B), written out (loss_and_grad_t: `out_t` is overwritten)."""

    y: torch.Tensor
    task: str

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        return loss_per_run(out, self.y, self.task)

    def grad_t(self, out_t: torch.Tensor) -> torch.Tensor:
        return loss_and_grad_t(out_t, self.y, self.task)[1]
