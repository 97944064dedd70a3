"""model=attention: one multi-head self-attention layer, mean-pooled, with a linear readout.
Rotation mirrors of W_Q, W_K per head → low rank of W_Q W_Kᵀ (docs/theory.md §3)."""

from __future__ import annotations

from dataclasses import dataclass

from symrun.config import ModelConfig
from symrun.models.registry import ModelSpec


@dataclass
class AttentionConfig(ModelConfig):
    """One multi-head self-attention layer over `tokens` tokens of each input row, mean-pooled, then
    a linear readout: rotation symmetry of W_Q, W_K per head → low rank of W_Q W_Kᵀ."""

    name: str = "attention"
    tokens: int = 4
    """T: an input row of d features is read as T tokens of d / T features (T must divide d)."""
    heads: int = 2
    """H: number of attention heads."""
    key_dim: int = 4
    """k: query/key (and value) dimension per head; W_Q W_Kᵀ is (d/T × d/T) of rank ≤ k."""
    positions: bool = True
    """Learned position embeddings added to the tokens (without them the model cannot tell tokens apart)."""


def checks(cfg):
    return [(getattr(cfg.model, k) >= 1, f"model.{k} must be >= 1, got {getattr(cfg.model, k)}")
            for k in ("tokens", "heads", "key_dim")]


SPEC = ModelSpec("attention", AttentionConfig, "symrun.models.nets.attention:Attention", primary=("rank",),
                 checks=checks)
