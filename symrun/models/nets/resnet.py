"""torchvision's ResNet-18 on images, as a PackedModel: parameters carry the leading run axis R.

It runs as packs of one (its spec: packs=False); its forward calls torchvision's module through
`torch.func.functional_call` with run r's slice of every parameter and of its own BatchNorm
running statistics. Evaluation (autograd off) goes through the batch in chunks, so a metric pass
over a whole training set fits in memory.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import functional_call

from symrun.config import ConfigError
from symrun.analysis.metrics import column, dead_groups, independent_fraction
from symrun.models.nets.base import PackedModel, Params, in_chunks, module_width, runs_of
from symrun.models.resnet import ResNetConfig
from symrun.training import memory
from symrun.analysis.symmetries import NeuronSet, Slot, Swap, gather


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
    threadsafe = False     # functional_call swaps the skeleton's tensors in place while it runs

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
        self.width = module_width(net, torch.empty(1, 3, side, side, device="meta"))

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

    def example_width(self):
        """Measured on the skeleton: every layer's output for one image."""
        return self.width

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
        return in_chunks(self._forward, params, x, self.example_width())

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
                for chunk in probe.split(memory.eval_items(self.example_width())):
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
        ≤ sparsity_atol or ≤ sparsity_rtol · the layer's largest (docs/theory.md §4's group
        criterion applied to the activation side, Σₓ|h_j(x)| = 0 included); and
        independent_fraction.b — groups of identical channels (parameter vectors within
        homogeneity_threshold, transitive, dead excluded) / channels. Unsuffixed: over all
        blocks' channels. dead_fraction.penultimate: the same for the pooled features."""
        rms, _ = self.probe(params, probe)
        out, dead_all, groups, width = {}, [], 0.0, 0
        for ns in self.channel_sets():
            dead = dead_groups(rms[ns.name].unsqueeze(-1), cfg.sparsity_atol, cfg.sparsity_rtol)    # (R, C)
            frac = independent_fraction(gather(ns, params), cfg.homogeneity_threshold, dead)       # (R,)
            out[column("dead_fraction", ns.name)] = dead.double().mean(-1)
            out[column("independent_fraction", ns.name)] = frac
            dead_all.append(dead)
            groups, width = groups + frac.double() * dead.shape[-1], width + dead.shape[-1]
        out["dead_fraction"] = torch.cat(dead_all, dim=-1).double().mean(-1)
        out["independent_fraction"] = groups / width
        pen = dead_groups(rms["penultimate"].unsqueeze(-1), cfg.sparsity_atol, cfg.sparsity_rtol)
        out[column("dead_fraction", "penultimate")] = pen.double().mean(-1)
        return out

    def run_arrays(self, params, probe):
        """penultimate_correlation: Pearson correlation of the 512 pooled features over the probe
        images, (R, 512, 512), NaN for a feature that is constant there (e.g. dead)."""
        _, features = self.probe(params, probe)
        return {"penultimate_correlation": torch.stack([torch.corrcoef(f.double().T) for f in features])}

    def run_state(self, params, r):
        """A state dict torchvision's resnet18 (with this stem) loads: parameters and running stats."""
        return {**super().run_state(params, r), **{k: v[r].detach().cpu().clone() for k, v in self.stats.items()}}

