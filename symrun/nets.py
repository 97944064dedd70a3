"""Real networks: torchvision's ResNet-18 on images and a small decoder-only transformer on text.

Both are PackedModels: parameters carry the leading run axis R. ResNet-18 runs as packs of one
(config.ALONE_MODELS); its forward calls torchvision's module through `torch.func.functional_call`
with run r's slice of every parameter and of its own BatchNorm running statistics. The
transformer is written out with einsums, like model=attention, so each head's W_Q and W_K are
parameters whose product can be measured, and a weight-decay grid trains as one pack.

Evaluation (autograd off) goes through the batch in chunks, so a metric pass over a whole
training set fits in memory.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from symrun.config import ConfigError, ResNetConfig, TransformerConfig
from symrun.metrics import dead_groups, independent_fraction
from symrun.models import PackedModel, Params
from symrun.symmetries import NeuronSet, Rotation, Slot, Swap, gather

EVAL_CHUNK = 256   # inputs per forward pass when no gradient is needed


def in_chunks(forward: Callable, params: Params, x: torch.Tensor, size: int = EVAL_CHUNK) -> torch.Tensor:
    """forward(params, x) over chunks of the batch when autograd is off; x is (B, ...) shared by
    the runs or (R, B, ...) per run, the output (R, B, ...)."""
    axis = 0 if x.dim() == 2 else 1
    if torch.is_grad_enabled() or x.shape[axis] <= size:
        return forward(params, x)
    return torch.cat([forward(params, chunk) for chunk in x.split(size, dim=axis)], dim=1)


def runs_of(params: Params) -> int:
    return next(iter(params.values())).shape[0]


class ResNet18(PackedModel):
    """torchvision's resnet18 with the CIFAR stem: conv1 3×3 stride 1, no max-pool.

    Inputs are rows of 3·s·s pixels in CHW order (data=cifar10). With autograd on, forward
    trains: BatchNorm uses batch statistics and updates run r's running statistics; with it off
    (the engine's metric passes), forward evaluates with the running statistics.

    Symmetry: the inner channels of each residual block (conv1 → bn1 → ReLU → conv2) can be
    permuted — conv1's output filters, bn1's scale and shift and conv2's input filters together —
    so each pair of channels has a Swap mirror whose constraint is two identical channels.
    Init follows torchvision: conv N(0, 2/fan_out), BN scale 1 and shift 0; the classifier
    N(0, 1/fan_in) with zero bias. Every parameter is decayed (BN included).
    """

    BLOCKS = tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))
    second_order = False   # a forward with autograd on updates the BatchNorm statistics: no λ_c at the end

    def __init__(self, cfg: ResNetConfig, in_dim: int, out_dim: int):
        try:
            from torchvision.models import resnet18
        except ImportError:
            raise ConfigError("model=resnet18 needs torchvision: pip install 'symrun[vision]'") from None
        side = math.isqrt(in_dim // 3)
        if 3 * side * side != in_dim:
            raise ConfigError(f"model=resnet18 needs 3-channel square images (data=cifar10); the data has {in_dim} features")
        self.cfg, self.side = cfg, side
        with torch.device("meta"):   # a skeleton: every tensor it computes with comes from params and stats
            net = resnet18(num_classes=out_dim)
            net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = torch.nn.Identity()
        self.net = net
        self.stats: Params = {}        # BatchNorm running statistics, (R, ...) each; set by init_params

    def shapes(self):
        out = {}
        for name, p in self.net.named_parameters():
            if p.dim() == 4:
                std = math.sqrt(2 / (p.shape[0] * p.shape[2] * p.shape[3]))   # kaiming normal, fan_out
            elif name == "fc.weight":
                std = 1 / math.sqrt(p.shape[1])
            else:                                                                # BN scale/shift, fc bias
                std = 0.0
            out[name] = (tuple(p.shape), self.cfg.init_scale * std)
        return out

    def init_params(self, seeds, device, dtype):
        """Parameters; the first call also creates each run's BatchNorm running statistics (mean 0,
        variance 1), which a later draw (shrink-and-perturb's fresh initialisation) leaves alone."""
        params = super().init_params(seeds, device, dtype)
        with torch.no_grad():
            for name, module in self.net.named_modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    params[f"{name}.weight"].add_(1.0)
        if self.stats:
            return params
        for name, b in self.net.named_buffers():
            like = dict(dtype=b.dtype if name.endswith("num_batches_tracked") else dtype, device=device)
            fill = torch.ones if name.endswith("running_var") else torch.zeros
            self.stats[name] = fill((len(seeds), *b.shape), **like)
        return params

    def _tensors(self, params: Params, r: int) -> dict[str, torch.Tensor]:
        return {**{k: v[r] for k, v in params.items()}, **{k: v[r] for k, v in self.stats.items()}}

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 3, self.side, self.side)                           # (B, 3, s, s)

    def forward(self, params, x):
        return in_chunks(self._forward, params, x)

    def _forward(self, params, x):
        self.net.train(torch.is_grad_enabled())
        outs = [functional_call(self.net, self._tensors(params, r), (self._images(x if x.dim() == 2 else x[r]),))
                for r in range(runs_of(params))]
        return torch.stack(outs)                                                 # (R, B, classes)

    def channel_sets(self) -> list[NeuronSet]:
        """Each block's inner channels: conv1's output filters, bn1's scale and shift, conv2's
        input filters (lead axis: the run)."""
        return [NeuronSet(b, (Slot(f"{b}.conv1.weight", 1), Slot(f"{b}.bn1.weight", 1), Slot(f"{b}.bn1.bias", 1),
                              Slot(f"{b}.conv2.weight", 2))) for b in self.BLOCKS]

    def symmetries(self):
        return [Swap(ns) for ns in self.channel_sets()]

    @torch.no_grad()
    def probe(self, params: Params, probe: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({layer: RMS of each channel's output over the probe images and positions, (R, C)},
        penultimate features (R, N, 512)). Layers: each block's inner channels after bn1 and
        ReLU, and 'penultimate' (the pooled features the classifier reads)."""
        rms: dict[str, list] = {name: [] for name in (*self.BLOCKS, "penultimate")}
        features = []
        self.net.eval()
        for r in range(runs_of(params)):
            sums: dict[str, torch.Tensor] = {}
            counts: dict[str, int] = {}
            feats: list[torch.Tensor] = []

            def record(name: str, post: Callable):
                def hook(module, inputs, output):
                    a = post(output)                                             # (N, C[, H, W])
                    dims = [0, *range(2, a.dim())]
                    sums[name] = sums.get(name, 0) + a.double().pow(2).sum(dim=dims)
                    counts[name] = counts.get(name, 0) + a.numel() // a.shape[1]
                    if name == "penultimate":
                        feats.append(a)
                return hook

            handles = [self.net.get_submodule(f"{b}.bn1").register_forward_hook(record(b, torch.relu)) for b in self.BLOCKS]
            handles.append(self.net.avgpool.register_forward_hook(record("penultimate", lambda t: t.flatten(1))))
            try:
                for chunk in probe.split(EVAL_CHUNK):
                    functional_call(self.net, self._tensors(params, r), (self._images(chunk),))
            finally:
                for h in handles:
                    h.remove()
            for name in rms:
                rms[name].append((sums[name] / counts[name]).sqrt())
            features.append(torch.cat(feats))
        return {k: torch.stack(v) for k, v in rms.items()}, torch.stack(features)

    def probe_metrics(self, params, probe, cfg):
        """Per block b: dead_fraction.b — channels whose output RMS over the probe set is
        ≤ sparsity_atol or ≤ sparsity_rtol · the layer's largest (science.md §4's group
        criterion applied to the activation side, Σₓ|h_j(x)| = 0 included); and
        independent_fraction.b — groups of identical channels (parameter vectors within
        homogeneity_threshold, transitive, dead excluded) / channels. Unsuffixed: over all
        blocks' channels. dead_fraction.penultimate: the same for the pooled features."""
        rms, _ = self.probe(params, probe)
        out, dead_all, groups, width = {}, [], 0.0, 0
        for ns in self.channel_sets():
            dead = dead_groups(rms[ns.name].unsqueeze(-1), cfg.sparsity_atol, cfg.sparsity_rtol)    # (R, C)
            frac = independent_fraction(gather(ns, params), cfg.homogeneity_threshold, dead)       # (R,)
            out[f"dead_fraction.{ns.name}"] = dead.double().mean(-1)
            out[f"independent_fraction.{ns.name}"] = frac
            dead_all.append(dead)
            groups, width = groups + frac.double() * dead.shape[-1], width + dead.shape[-1]
        out["dead_fraction"] = torch.cat(dead_all, dim=-1).double().mean(-1)
        out["independent_fraction"] = groups / width
        pen = dead_groups(rms["penultimate"].unsqueeze(-1), cfg.sparsity_atol, cfg.sparsity_rtol)
        out["dead_fraction.penultimate"] = pen.double().mean(-1)
        return out

    def run_arrays(self, params, probe):
        """penultimate_correlation: Pearson correlation of the 512 pooled features over the probe
        images, (R, 512, 512), NaN for a feature that is constant there (e.g. dead)."""
        _, features = self.probe(params, probe)
        return {"penultimate_correlation": torch.stack([torch.corrcoef(f.double().T) for f in features])}

    def run_state(self, params, r):
        """A state dict torchvision's resnet18 (with this stem) loads: parameters and running stats."""
        return {**super().run_state(params, r), **{k: v[r].detach().cpu().clone() for k, v in self.stats.items()}}


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
    head (shared/science.md §3), which drive the rank of W_Q W_Kᵀ down under weight decay.
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
        return in_chunks(self._forward, params, x)

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
        (`.layer{l}.head{h}`)."""
        qk = [params[f"layers.{l}.query"] @ params[f"layers.{l}.key"] for l in range(self.cfg.layers)]   # (R, H, d, d)
        per_head = {f".layer{l}.head{h}": m[:, h] for l, m in enumerate(qk) for h in range(m.shape[1])}
        return {"": torch.stack(qk, dim=1), **per_head}
