"""symrun's Hydra sweeper: a grid planned as packs, each pack one job of the configured launcher.

symrun's primary config selects it (`override hydra/sweeper: symrun`), so `symrun sweep` is a
Hydra multirun through it. Like Hydra's basic sweeper it takes the grid from the command line and
`hydra.sweeper.params` (the command line wins per key); unlike it, it hands the launcher one job
per *pack* — the runs that share shapes, trained as one batched model — and skips runs already
finished in the sweep folder. The work is symrun's (symrun.sweeping.launch, symrun.sweeping.sweep); this module is
the plugin Hydra discovers, with its config.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules before they are in
# sys.modules, where dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class SymrunSweeperConf:
    _target_: str = "hydra_plugins.symrun_sweeper.symrun_sweeper.SymrunSweeper"
    params: Dict[str, str] = field(default_factory=dict)
    """Grid axes, as for Hydra's basic sweeper (`seed: range(0,3)`); a preset sets them."""
    suite: Dict[str, List[str]] = field(default_factory=dict)
    """A suite: member preset → the overrides it runs with; one sweep per member, launched together."""
    dry_run: bool = False
    """Plan and show the runs, packs, steps and cost; write nothing (`symrun sweep … --plan`)."""


ConfigStore.instance().store(group="hydra/sweeper", name="symrun", node=SymrunSweeperConf, provider="symrun")


class SymrunSweeper(Sweeper):
    def __init__(self, params: Dict[str, str], suite: Dict[str, List[str]], dry_run: bool) -> None:
        super().__init__()
        self.dry_run = dry_run
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        # params and suite are read from the master config (self.config.hydra.sweeper): a suite's
        # members compose their own.
        from symrun.sweeping import launch
        from symrun.sweeping.composition import Composer

        assert self.hydra_context is not None and self.config is not None and self.launcher is not None
        return launch.run_sweep(Composer(self.hydra_context.config_loader, self.config), self.launcher,
                                list(arguments), dry_run=self.dry_run)
