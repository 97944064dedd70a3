"""symrun: how symmetries of the loss shape what a network learns — experiments as packed sweeps."""

from symrun.config import register_configs

__version__ = "0.1.0"

register_configs()
