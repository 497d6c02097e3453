"""Finding the mixture, not only ranking a list (RegMix, arXiv 2407.01492; olmix; data mixing laws, arXiv 2403.16952).

A swarm of small proxies trained on random mixtures of the sources (Dirichlet draws around a prior), a
surrogate fitted from mixture weights to the proxies' score, and mixtures proposed from the surrogate:

- :mod:`rbridge.mixtures.weights`: mixtures as {source: weight}, always keyed by source name (never by
  column position), checked and normalised; the mixtures CSV (`candidate` + one column per source).
- :mod:`rbridge.mixtures.swarm`: the Dirichlet swarm (prior, strengths, minimum weight, repetition caps, seed).
- :mod:`rbridge.mixtures.surrogates`: the surrogate families (``linear``, ``log_linear``, ``lightgbm``) and
  ``auto``, chosen by k-fold cross-validated Spearman correlation on the fitted data only.
- :mod:`rbridge.mixtures.propose`: RegMix's rule (the mean of the best-predicted of many sampled mixtures)
  and an optimum held near the prior (olmix), both within the caps.
- :mod:`rbridge.mixtures.data`: the (mixture, score) table of a stage from a store.
"""
