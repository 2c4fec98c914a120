"""Errors raised by the export tools."""


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: missing, corrupt, or not a supported model."""
