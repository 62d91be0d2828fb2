"""Command handlers, one module per schema file. Importing this package registers them all."""

from . import block, control, job, transaction

__all__ = ["block", "control", "job", "transaction"]
