"""A decoder-only transformer for next-character prediction, packed over runs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from symrun.models.nets.base import PackedModel, in_chunks, runs_of
from symrun.models.transformer import TransformerConfig
from symrun.analysis.symmetries import Rotation


class Transformer(PackedModel):
    """Decoder-only, pre-LN transformer over windows of T characters (data=text).

    h = E[x] + P;  per layer: h += Σ_heads A_h (a W_V) W_O with a = LN(h),
    A_h = causal softmax((a W_Q)(a W_K)ᵀ/√k);  h += W₂ GELU(W₁ LN(h) + b₁) + b₂;
    logits = LN(h) W_U, at every position (next-character prediction).
    Parameters (per run): embed (V, d), position (T, d), per layer l `layers.l.query` (H, d, k)
    = W_Q, `layers.l.key` (H, k, d) = W_Kᵀ (so query @ key = W_Q W_Kᵀ), value (H, d, k), out
    (H, k, d), ln1/ln2 weight and bias (d), mlp.in (d, f), mlp.in_bias (f), mlp.out (f, d),
    mlp.out_bias (d); ln_f weight and bias, unembed (d, V).

    The scores see W_Q, W_K only through W_Q W_Kᵀ, so (W_Q, W_K) → (W_Q R, W_K R) is a symmetry
    for orthogonal R, and so is (W_V, W_O) → (W_V R, Rᵀ W_O): the rotation mirrors of every
    head (docs/theory.md §3), which drive the rank of W_Q W_Kᵀ down under weight decay.
    """

    def __init__(self, cfg: TransformerConfig, in_dim: int, out_dim: int):
        self.cfg, self.t, self.v = cfg, in_dim, out_dim
        self.k = cfg.key_dim or cfg.d_model // cfg.heads
        self.f = cfg.mlp_ratio * cfg.d_model

    def shapes(self):
        s, d, h, k, f, v = self.cfg.init_scale, self.cfg.d_model, self.cfg.heads, self.k, self.f, self.v
        out = {"embed": ((v, d), s), "position": ((self.t, d), s)}   # the residual stream starts at unit scale
        for l in range(self.cfg.layers):
            p = f"layers.{l}."
            out.update({p + "ln1.weight": ((d,), 0.0), p + "ln1.bias": ((d,), 0.0),
                        p + "query": ((h, d, k), s / math.sqrt(d)), p + "key": ((h, k, d), s / math.sqrt(d)),
                        p + "value": ((h, d, k), s / math.sqrt(d)), p + "out": ((h, k, d), s / math.sqrt(h * k)),
                        p + "ln2.weight": ((d,), 0.0), p + "ln2.bias": ((d,), 0.0),
                        p + "mlp.in": ((d, f), s / math.sqrt(d)), p + "mlp.in_bias": ((f,), 0.0),
                        p + "mlp.out": ((f, d), s / math.sqrt(f)), p + "mlp.out_bias": ((d,), 0.0)})
        out.update({"ln_f.weight": ((d,), 0.0), "ln_f.bias": ((d,), 0.0), "unembed": ((d, v), s / math.sqrt(d))})
        return out

    def example_width(self):
        """Per layer: two LayerNorms and residual sums of the stream (T × d each), each head's
        queries, keys, values and T × T scores (masked, then softmaxed), the MLP's hidden units
        before and after GELU; then the last LayerNorm and the logits (T × V)."""
        t, d, h, k, f = self.t, self.cfg.d_model, self.cfg.heads, self.k, self.f
        layer = 4 * t * d + h * t * (3 * k + 3 * t) + 2 * t * f
        return t + t * d + self.cfg.layers * layer + t * d + t * self.v

    def init_params(self, seeds, device, dtype):
        """LayerNorm scales start at 1, shifts at 0."""
        params = super().init_params(seeds, device, dtype)
        with torch.no_grad():
            for name, p in params.items():
                if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                    p.add_(1.0)
        return params

    @staticmethod
    def _norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """LayerNorm over the last axis with per-run scale and shift (R, d); h (R, B, T, d)."""
        return F.layer_norm(h, h.shape[-1:]) * weight[:, None, None] + bias[:, None, None]

    def forward(self, params, x):
        return in_chunks(self._forward, params, x, self.example_width())

    def _forward(self, params, x):
        r = runs_of(params)
        tokens = x.long()                                   # ids travel as floats in the engine's dtype
        if tokens.dim() == 2:
            tokens = tokens.expand(r, *tokens.shape)        # (R, B, T)
        t = tokens.shape[-1]
        runs = torch.arange(r, device=x.device)[:, None, None]
        h = params["embed"][runs, tokens] + params["position"][:, None, :t]                   # (R, B, T, d)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)                   # key after query
        for l in range(self.cfg.layers):
            p = lambda name: params[f"layers.{l}.{name}"]  # noqa: E731
            a = self._norm(h, p("ln1.weight"), p("ln1.bias"))
            q = torch.einsum("rbtd,rhdk->rhbtk", a, p("query"))                                 # (R, H, B, T, k)
            k = torch.einsum("rbtd,rhkd->rhbtk", a, p("key"))
            v = torch.einsum("rbtd,rhdk->rhbtk", a, p("value"))
            scores = (q @ k.mT / math.sqrt(self.k)).masked_fill(future, float("-inf"))          # (R, H, B, T, T)
            h = h + torch.einsum("rhbtk,rhkd->rbtd", scores.softmax(dim=-1) @ v, p("out"))
            a = self._norm(h, p("ln2.weight"), p("ln2.bias"))
            hidden = F.gelu(a @ p("mlp.in")[:, None] + p("mlp.in_bias")[:, None, None])         # (R, B, T, f)
            h = h + hidden @ p("mlp.out")[:, None] + p("mlp.out_bias")[:, None, None]
        return self._norm(h, params["ln_f.weight"], params["ln_f.bias"]) @ params["unembed"][:, None]   # (R, B, T, V)

    def symmetries(self):
        return [Rotation(f"layers.{l}.{a}", f"layers.{l}.{b}")
                for l in range(self.cfg.layers) for a, b in (("query", "key"), ("value", "out"))]

    def products(self, params):
        """W_Q W_Kᵀ: all heads of all layers (averaged: the unsuffixed columns) and each head
        (`layer{l}.head{h}`)."""
        qk = [params[f"layers.{l}.query"] @ params[f"layers.{l}.key"] for l in range(self.cfg.layers)]   # (R, H, d, d)
        per_head = {f"layer{l}.head{h}": m[:, h] for l, m in enumerate(qk) for h in range(m.shape[1])}
        return {"": torch.stack(qk, dim=1), **per_head}
