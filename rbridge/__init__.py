"""rbridge: choose pre-training data for reasoning models with tiny proxies.

The rBridge method (arXiv 2509.21013) scores small proxy models by their
negative log-likelihood on a frontier model's reasoning traces, each token
weighted by the frontier model's confidence.
"""

__version__ = "0.1.0"
