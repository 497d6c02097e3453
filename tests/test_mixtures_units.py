"""rbridge.mixtures without a store: the swarm, the surrogates' choice, the proposals."""

from __future__ import annotations

import numpy as np
import pytest

from rbridge.errors import InputError
from rbridge.mixtures.propose import propose
from rbridge.mixtures.surrogates import choose
from rbridge.mixtures.swarm import check_caps, swarm
from rbridge.mixtures.weights import as_matrix, kl, normalise, source_order

PRIOR = {"web": 0.6, "code": 0.25, "math": 0.1, "books": 0.05}


def test_the_swarm_is_seeded_keyed_by_name_and_within_its_settings():
    a = swarm(PRIOR, 40, seed=3, min_weight=0.02, caps={"math": 0.3})
    b = swarm(dict(reversed(list(PRIOR.items()))), 40, seed=3, min_weight=0.02, caps={"math": 0.3})
    assert a == b  # the prior's key order changes nothing
    assert a != swarm(PRIOR, 40, seed=4, min_weight=0.02, caps={"math": 0.3})
    for m in a:
        assert abs(sum(m.values()) - 1) < 1e-9 and all(w >= 0.02 for w in m.values())
        assert m.get("math", 0.0) <= 0.3 + 1e-12
    x = as_matrix(a, source_order(a))
    assert len({tuple(np.round(r, 6)) for r in x}) == 40
    # sparse draws (small strengths) and draws near the prior (large ones) both appear
    div = kl(x, np.array([PRIOR[s] for s in source_order(a)]))
    assert div.min() < 0.1 and div.max() > 0.5


@pytest.mark.parametrize("kw,field", [({"size": 0}, "search.swarm"), ({"caps": {s: 0.2 for s in PRIOR}},
                                                                        "search.max_repeats")])
def test_impossible_swarms_are_refused_naming_the_field(kw, field):
    with pytest.raises(InputError) as e:
        swarm(PRIOR, kw.get("size", 10), seed=0, caps=kw.get("caps"))
    assert e.value.field == field


def test_weights_are_checked_and_normalised_exactly_whatever_their_order():
    assert normalise({"b": 0.3, "a": 0.701}) == normalise({"a": 0.701, "b": 0.3})
    with pytest.raises(InputError, match="sum to 1.5000"):
        normalise({"a": 1.0, "b": 0.5})
    with pytest.raises(InputError, match=">= 0"):
        normalise({"a": 1.2, "b": -0.2})


def test_auto_chooses_by_cross_validation_on_the_data_given():
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(4), size=60)
    t = np.array([1.5, -2.0, 0.5, 0.0])
    linear = 3.0 + x @ t + rng.normal(0, 0.01, 60)
    lawful = 2.0 + np.exp(0.5 + 2.5 * x @ t) + rng.normal(0, 0.01, 60)
    assert choose(x, linear, "auto")[0].family in ("linear", "log_linear")
    model, cvs = choose(x, lawful, "auto")
    assert model.family in ("log_linear", "lightgbm")
    by = {c.family: c.spearman for c in cvs}
    assert by["log_linear"] > by["linear"] and by["log_linear"] > 0.95
    with pytest.raises(InputError, match="at least 6"):
        choose(x[:4], linear[:4])


def test_proposals_are_mixtures_within_their_caps_and_better_than_the_swarm():
    sources = sorted(PRIOR)
    prior = np.array([PRIOR[s] for s in sources])
    x = as_matrix(swarm(PRIOR, 48, seed=1), sources)
    y = 2.0 + (x[:, sources.index("math")] - 0.35) ** 2 * 10 + x[:, sources.index("books")]  # best: math 0.35
    model = choose(x, y, "log_linear")[0]
    cap = check_caps(sources, {"math": 0.3}, 0.0)
    props = propose(model, sources, prior, cap, n=3, seed=0, samples=4000, fitted=x)
    assert [p.name for p in props] == ["proposed-1", "proposed-2", "proposed-3"]
    for p in props:
        assert abs(sum(p.weights.values()) - 1) < 1e-4 and all(v >= 0 for v in p.weights.values())
        assert p.weights.get("math", 0.0) <= 0.3 + 1e-6
        assert p.predicted <= float(np.median(model.predict(x)))
    assert props[0].rule == "regmix" and all(p.rule.startswith("near_prior") for p in props[1:])
