"""One multi-head self-attention layer, packed over runs."""

from __future__ import annotations

import math

import torch

from symrun.models.nets.base import PackedModel
from symrun.config import ConfigError
from symrun.models.attention import AttentionConfig
from symrun.analysis.symmetries import Rotation


class Attention(PackedModel):
    """One multi-head self-attention layer, mean-pooled over tokens, then a linear readout.

    An input row (d,) is read as T tokens of e = d/T features, X (T, e), plus learned positions.
    Per head h: A = softmax((X W_Q)(X W_K)ᵀ/√k) over keys, head output A (X W_V) W_O; heads are
    summed (= concatenated, then W_O), averaged over tokens and mapped to the output by `readout`.
    Parameters: query (R, H, e, k) = W_Q, key (R, H, k, e) = W_Kᵀ (so query @ key = W_Q W_Kᵀ),
    value (R, H, e, k), out (R, H, k, e), readout (R, e, o) [, position (R, T, e)].

    Scores depend on W_Q, W_K only through W_Q W_Kᵀ, so (W_Q, W_K) → (W_Q R, W_K R) for orthogonal R
    of the k-space is a symmetry; its mirrors drive the rank of W_Q W_Kᵀ down under weight decay
    (docs/theory.md §3). (W_V, W_O) → (W_V R, Rᵀ W_O) is one too.
    """

    def __init__(self, cfg: AttentionConfig, in_dim: int, out_dim: int):
        if in_dim % cfg.tokens:
            raise ConfigError(f"model.tokens={cfg.tokens} must divide the input dimension {in_dim}")
        self.cfg, self.t, self.e, self.o = cfg, cfg.tokens, in_dim // cfg.tokens, out_dim

    def shapes(self):
        s, h, k, e = self.cfg.init_scale, self.cfg.heads, self.cfg.key_dim, self.e
        out = {"query": ((h, e, k), s / math.sqrt(e)), "key": ((h, k, e), s / math.sqrt(e)),
               "value": ((h, e, k), s / math.sqrt(e)), "out": ((h, k, e), s / math.sqrt(h * k)),
               "readout": ((e, self.o), s / math.sqrt(e))}
        if self.cfg.positions:
            out["position"] = ((self.t, e), s)      # on the scale of the N(0, 1) input features
        return out

    def example_width(self):
        """The tokens, each head's queries, keys, values and T × T scores, the heads' outputs."""
        t, h, k, e = self.t, self.cfg.heads, self.cfg.key_dim, self.e
        return 2 * t * e + h * t * (3 * k + 2 * t) + t * e + self.o

    def forward(self, params, x):
        r = params["query"].shape[0]
        tokens = x.reshape(*x.shape[:-1], self.t, self.e).expand(r, *x.shape[-2:-1], self.t, self.e)  # (R, B, T, e)
        if self.cfg.positions:
            tokens = tokens + params["position"].unsqueeze(1)
        q = torch.einsum("rbte,rhek->rhbtk", tokens, params["query"])               # (R, H, B, T, k)
        k = torch.einsum("rbte,rhke->rhbtk", tokens, params["key"])
        v = torch.einsum("rbte,rhek->rhbtk", tokens, params["value"])
        att = torch.softmax(q @ k.mT / math.sqrt(self.cfg.key_dim), dim=-1)          # (R, H, B, T, T)
        heads = torch.einsum("rhbtk,rhke->rbte", att @ v, params["out"])             # (R, B, T, e)
        return heads.mean(dim=-2) @ params["readout"]                                # (R, B, o)

    def symmetries(self):
        return [Rotation("query", "key"), Rotation("value", "out")]

    def products(self, params):
        qk = params["query"] @ params["key"]                                         # (R, H, e, e)
        per_head = {f"head{h}": qk[:, h] for h in range(qk.shape[1])} if qk.shape[1] > 1 else {}
        return {"": qk, **per_head}

    def balance_pair(self, params):
        return params["query"], params["key"]

