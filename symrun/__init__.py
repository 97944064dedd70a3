"""symrun: how symmetries of the loss shape what a network learns — experiments as packed sweeps."""

__version__ = "0.1.0"
