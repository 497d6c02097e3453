"""A spec's ``search:``: the swarm drawn as candidates of the plan (``swarm-000``, ...), beside the listed ones.

The swarm depends on the sources' training token counts (the ``tokens`` prior, the repetition caps), so it
is drawn once the data is prepared, from the spec's seed: the same spec and data give the same swarm on
every machine and every resume, and the plan stores each candidate's weights (``candidates.mix``) with the
spec text that holds the sampler's settings.
"""

from __future__ import annotations

from rbridge.errors import InputError
from rbridge.mixtures.swarm import swarm
from rbridge.spec import CandidateSpec, Spec


def token_counts(spec: Spec, data) -> dict[str, int]:
    return {s: int(data.shards[s].n_train_tokens) for s in spec.searched_sources()}


def search_prior(spec: Spec, data) -> dict[str, float]:
    """The prior over the searched sources (normalised)."""
    srcs = spec.searched_sources()
    prior = spec.search.prior
    if prior == "uniform":
        w = {s: 1.0 for s in srcs}
    elif prior == "tokens":
        w = {s: float(n) for s, n in token_counts(spec, data).items()}
    else:
        w = {s: float(prior.get(s, 0.0)) for s in srcs}
    total = sum(w.values())
    if total <= 0:
        raise InputError("the prior gives every searched source weight 0", field="search.prior")
    return {s: v / total for s, v in w.items()}


def search_caps(spec: Spec, data) -> dict[str, float]:
    """{source: the largest weight keeping its training tokens from repeating more than ``max_repeats`` times
    at the largest proxy stage}; {} without ``max_repeats``."""
    if spec.search.max_repeats is None:
        return {}
    largest = max(st.training.tokens for st in spec.resolved_stages() if not st.is_target)
    return {s: min(1.0, spec.search.max_repeats * n / largest) for s, n in token_counts(spec, data).items()}


def swarm_candidates(spec: Spec, data) -> list[CandidateSpec]:
    if spec.search is None:
        return []
    sr = spec.search
    mixes = swarm(search_prior(spec, data), sr.swarm, seed=spec.seed if sr.seed is None else sr.seed,
                  strengths=sr.strengths, min_weight=sr.min_weight, caps=search_caps(spec, data))
    out = []
    for name, mix in zip(spec.swarm_names(), mixes):
        total = sum(mix.values())
        out.append(CandidateSpec(name=name, mix={k: v / total for k, v in mix.items()}))
    return out


def all_candidates(spec: Spec, data) -> list[CandidateSpec]:
    """The listed candidates, then the swarm's."""
    return [*spec.candidates, *swarm_candidates(spec, data)]
