"""Command handlers, one module per schema file. Importing this package registers them all."""

from . import control, job

__all__ = ["control", "job"]
