"""jaxnet: pure, jit-compiled training for people who learned deep learning in PyTorch."""
