"""Neuron Atlas: distributed dataset search and neuron atlases for convolutional networks."""

__version__ = "0.1.0"
