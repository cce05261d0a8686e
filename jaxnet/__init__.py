"""jaxnet: pure, jit-compiled training for people who learned deep learning in PyTorch.

The public API at a glance; each name lives in a small module of its own.
"""

__version__ = "0.1.0"
