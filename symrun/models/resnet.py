"""model=resnet18: torchvision's ResNet-18 with the CIFAR stem on data=cifar10, each run a pack of
its own. Permutation mirrors of each residual block's inner channels → identical and dead channels."""

from __future__ import annotations

from dataclasses import dataclass

from symrun.config import ModelConfig
from symrun.models.registry import ModelSpec


@dataclass
class ResNetConfig(ModelConfig):
    """torchvision's ResNet-18 with the CIFAR stem (3×3 conv, stride 1, no max-pool), trained one
    run per pack. Permutation symmetry of each residual block's inner channels → identical and
    dead channels; needs `pip install 'symrun[vision]'`."""

    name: str = "resnet18"


SPEC = ModelSpec("resnet18", ResNetConfig, "symrun.models.nets.resnet:ResNet18",
                 primary=("dead_fraction", "independent_fraction"), packs=False, run_figures=True)
