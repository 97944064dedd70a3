"""Packed networks (torch): one module per model option, and the base interface (nets.base)."""
