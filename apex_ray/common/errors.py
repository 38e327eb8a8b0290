"""Errors that a restart cannot fix."""
from __future__ import annotations


class InputError(ValueError):
    """A problem in what the run was given (a damaged shard or checkpoint, too few samples for
    the batch, latents of another shape than the backbone takes), not in the machine it ran on.

    Restarting the workers would fail the same way, so a run that raises one fails at once with
    this message instead of using up ``distributed.max_failures`` restarts.
    """
