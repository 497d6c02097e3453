"""Letter weights, token weights and MinMax, with expected values worked out by hand."""

import math

import numpy as np
import pytest

from rbridge.scoring.weights import (letter_weights, minmax, minmax_benchmark, normalize,
                                     token_weights, trace_token_weights)

ln = math.log


def test_letter_weights_inherit_token_probability():
    w = letter_weights(["ab", "cde", "f"], [ln(0.5), ln(0.25), 0.0])
    np.testing.assert_allclose(w, [0.5, 0.5, 0.25, 0.25, 0.25, 1.0], rtol=0, atol=1e-15)


def test_empty_frontier_token_weighs_no_character():
    w = letter_weights(["a", "", "b"], [ln(0.5), ln(0.1), ln(0.2)])
    np.testing.assert_allclose(w, [0.5, 0.2], atol=1e-15)


# Three traces whose frontier and proxy tokenizations disagree.

def test_trace_a_proxy_boundaries_cut_frontier_tokens():
    # "abcdef": frontier ab|cde|f (p = .5, .25, 1); letters .5 .5 .25 .25 .25 1
    texts, lps = ["ab", "cde", "f"], [ln(0.5), ln(0.25), 0.0]
    # proxy abc|def: (.5+.5+.25)/3 = 5/12, (.25+.25+1)/3 = 1/2
    w = trace_token_weights(texts, lps, [(0, 3), (3, 6)])
    np.testing.assert_allclose(w, [5 / 12, 0.5], atol=1e-15)
    np.testing.assert_allclose(minmax(w), [0.0, 1.0], atol=1e-15)
    # proxy a|bcd|ef: .5, (.5+.25+.25)/3 = 1/3, (.25+1)/2 = .625
    w = trace_token_weights(texts, lps, [(0, 1), (1, 4), (4, 6)])
    np.testing.assert_allclose(w, [0.5, 1 / 3, 0.625], atol=1e-15)
    # MinMax: (.5 - 1/3) / (.625 - 1/3) = (1/6) / (7/24) = 4/7
    np.testing.assert_allclose(minmax(w), [4 / 7, 0.0, 1.0], atol=1e-15)


def test_trace_b_numbers_split_differently():
    # "x = 12": frontier x| =| 1|2 (p = 1, .8, .4, .2); proxy "x "|"= "|"12"... as offsets
    texts, lps = ["x", " =", " 1", "2"], [0.0, ln(0.8), ln(0.4), ln(0.2)]
    w = trace_token_weights(texts, lps, [(0, 2), (2, 4), (4, 6)])
    # letters 1 .8 .8 .4 .4 .2 -> (1+.8)/2, (.8+.4)/2, (.4+.2)/2
    np.testing.assert_allclose(w, [0.9, 0.6, 0.3], atol=1e-15)
    np.testing.assert_allclose(minmax(w), [1.0, 0.5, 0.0], atol=1e-12)


def test_trace_c_equal_weights_all_one():
    w = trace_token_weights(["ab", "c"], [ln(0.3), ln(0.3)], [(0, 1), (1, 3)])
    np.testing.assert_allclose(w, [0.3, 0.3], atol=1e-15)
    np.testing.assert_array_equal(minmax(w), [1.0, 1.0])
    np.testing.assert_array_equal(minmax(np.array([0.7])), [1.0])


def test_multibyte_character_shared_by_split_tokens():
    # "é😀": frontier é (p .5), 😀 (p .1). A byte-level proxy splits 😀 in two
    # tokens that both report the span (1, 2): both take its weight.
    texts, lps = ["é", "😀"], [ln(0.5), ln(0.1)]
    np.testing.assert_allclose(trace_token_weights(texts, lps, [(0, 1), (1, 2), (1, 2)]),
                               [0.5, 0.1, 0.1], atol=1e-15)
    # a token holding é plus the first bytes of 😀 reports (0, 2): (.5 + .1) / 2
    np.testing.assert_allclose(trace_token_weights(texts, lps, [(0, 2), (1, 2)]),
                               [0.3, 0.1], atol=1e-15)


def test_zero_width_tokens_take_the_next_character():
    letters = np.array([0.5, 0.25, 0.125])
    # (0,0) -> char 0; (2,2) -> char 2; (3,3) at the end -> the last char
    np.testing.assert_allclose(token_weights(letters, [(0, 0), (0, 3), (2, 2), (3, 3)]),
                               [0.5, 0.875 / 3, 0.125, 0.125], atol=1e-15)


def test_offsets_outside_text_rejected():
    with pytest.raises(ValueError):
        token_weights(np.array([0.5, 0.5]), [(0, 3)])
    with pytest.raises(ValueError):
        token_weights(np.array([]), [])


def test_benchmark_wide_minmax():
    b, c = np.array([0.9, 0.6, 0.3]), np.array([0.3, 0.3])
    nb, nc = minmax_benchmark([b, c])
    np.testing.assert_allclose(nb, [1.0, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(nc, [0.0, 0.0], atol=1e-12)
    # per trace, c is all-equal -> ones
    assert normalize([b, c], "trace")[1].tolist() == [1.0, 1.0]
    assert normalize([b, c], "none")[0] is not b
    np.testing.assert_array_equal(normalize([b, c], "none")[0], b)
    # benchmark of identical weights -> all ones
    assert [x.tolist() for x in minmax_benchmark([c, c])] == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError):
        normalize([b], "global")


def test_equal_letters_give_exactly_equal_token_weights():
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004 in floating point; a plain sum / n
    # would give 0.10000000000000002 and MinMax would then return 0 and 1.
    letters = letter_weights(["abc", "d"], [ln(0.1), ln(0.1)])
    w = token_weights(letters, [(0, 3), (1, 4), (3, 4)])
    assert len(set(w.tolist())) == 1
    np.testing.assert_array_equal(minmax(w), [1.0, 1.0, 1.0])


def test_lazy_package_exports():
    import rbridge.scoring as s
    assert s.minmax is minmax and callable(s.load_traces)
    with pytest.raises(AttributeError):
        s.nope
