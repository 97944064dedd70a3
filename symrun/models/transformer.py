"""model=transformer: a decoder-only, pre-LN transformer for next-character prediction on
data=text. Rotation mirrors of W_Q, W_K (and W_V, W_O) per head → low rank of W_Q W_Kᵀ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from symrun.config import ModelConfig
from symrun.models.registry import ModelSpec


@dataclass
class TransformerConfig(ModelConfig):
    """A small decoder-only transformer (pre-LN, causal) for next-character prediction on
    data=text; rotation symmetry of W_Q, W_K per head → low rank of W_Q W_Kᵀ. The context length
    is data.context."""

    name: str = "transformer"
    layers: int = 2
    heads: int = 4
    d_model: int = 32
    key_dim: Optional[int] = None
    """Query/key/value dimension per head; null = d_model / heads."""
    mlp_ratio: int = 4
    """Hidden width of each block's MLP = mlp_ratio · d_model."""


def checks(cfg):
    m = cfg.model
    out = [(getattr(m, k) >= 1, f"model.{k} must be >= 1, got {getattr(m, k)}") for k in ("layers", "heads", "d_model", "mlp_ratio")]
    out.append((m.key_dim is not None and m.key_dim >= 1 or m.key_dim is None and m.heads >= 1 and m.d_model % m.heads == 0,
                f"model.key_dim must be >= 1, or null with model.heads dividing model.d_model ({m.d_model})"))
    return out


SPEC = ModelSpec("transformer", TransformerConfig, "symrun.models.nets.transformer:Transformer",
                 primary=("rank", "effective_rank"), reads="text", checks=checks)
