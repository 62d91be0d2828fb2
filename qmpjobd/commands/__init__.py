"""Command handlers, one module per schema file (block-core.json's in two: nodes and jobs).

Thin: each handler hands its checked arguments to the layer that does the work. MODULES are the
daemon's own; the dispatcher is built from these and any the command line adds (--handlers).
"""

from . import block, block_jobs, control, job, task, transaction

MODULES = (block, block_jobs, control, job, task, transaction)
