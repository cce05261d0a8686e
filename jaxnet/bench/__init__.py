"""``jaxnet bench``: the same training in PyTorch and jaxnet, measured side by side."""
