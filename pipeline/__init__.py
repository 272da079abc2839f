"""Neuron Atlas: distributed dataset search and neuron atlases for convolutional networks."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`from pipeline import open_run` (the notebook API, pipeline.api) without importing it with the package."""
    if name == "open_run":
        from pipeline.api import open_run

        return open_run
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
