"""Scripts that are not scenarios: the PyTorch peer benchmark, the off-site corruption check."""
