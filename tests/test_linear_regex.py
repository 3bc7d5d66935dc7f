"""The regexes read from files: the same answers as Python's re, in linear time."""

import re
import time

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from lorax_lite.linear_regex import MAX_STATES, compile_pattern, pattern_error

PATTERNS = [
    r"q_proj", r".*\.q_proj", r"model\.layers\.(0|1|2)\.mlp", r"layers.1[0-9].self_attn.(q|k)_proj",
    r"[^.]+\.x", r"a{2,3}b", r"a{,2}", r"x{a}", r"(?:ab)*c?", r"^a.b$", r"\Aab\Z", r"[\w.]+",
    r"\d+\.\D", r"(?P<n>ab)+", r"a|b|", r"[]a]", r"[a\-z]", r"a??b", r"(a*)*b", r"{", r"\s\S",
]  # fmt: skip
TEXTS = [
    "q_proj",
    "model.q_proj",
    "model.layers.1.mlp",
    "layers.12.self_attn.k_proj",
    "ab.x",
    "aab",
    "aaab",
    "",
    "a",
    "x{a}",
    "ababc",
    "c",
    "a b",
    "ab",
    "a_b.c",
    "12.x",
    "]",
    "-",
    "{",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fullmatch_agrees_with_re(pattern):
    compiled = compile_pattern(pattern)
    assert [compiled.fullmatch(t) for t in TEXTS] == [bool(re.fullmatch(pattern, t)) for t in TEXTS]


ATOMS = st.sampled_from(["a", "b", ".", "[ab]", "[^a]", r"\.", r"\w", "(a|b)", "(ab|)", "^", "$"])
QUANTIFIERS = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,2}", "{,1}", "*?"])


@st.composite
def patterns(draw):
    parts = draw(st.lists(st.tuples(ATOMS, QUANTIFIERS), min_size=1, max_size=5))
    body = "".join(a + (q if a not in "^$" else "") for a, q in parts)
    return f"({body})" + draw(st.sampled_from(["", "*", "|b"]))


@pytest.mark.parametrize("pattern", ["($^)", "$^", "(a|$)^", "^$", "(^)*$"])
def test_anchors_at_both_ends_of_the_empty_text(pattern):
    assert compile_pattern(pattern).fullmatch("") == bool(re.fullmatch(pattern, ""))


@settings(max_examples=300, deadline=None, derandomize=True)  # the same 300 in every CI run
@given(patterns(), st.lists(st.text("ab.", max_size=6), min_size=1, max_size=8))
def test_fullmatch_agrees_with_re_on_generated_patterns(pattern, texts):
    compiled = compile_pattern(pattern)
    assert [compiled.fullmatch(t) for t in texts] == [bool(re.fullmatch(pattern, t)) for t in texts]


def test_a_catastrophic_pattern_fails_fast():
    text = "model.layers.0.self_attn.q_proj" * 8
    start = time.perf_counter()
    assert not compile_pattern(r"(.*\.)?(([a-z_.0-9]+)+x)").fullmatch(text)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("(?=a)", "the group '(?=a' is not supported at position 1"),
        ("(?i)a", "the group '(?i)' is not supported"),
        (r"(a)\1", r"the escape \1 is not supported at position 4"),
        (r"\bq", r"the escape \b is not supported"),
        ("a*+", "a possessive quantifier is not supported at position 2"),
        ("a**", "multiple repeat"),
        ("*a", "nothing to repeat at position 0"),
        ("(a", "missing ), unterminated subpattern"),
        ("a)", "unbalanced parenthesis at position 1"),
        ("[a", "unterminated character set"),
        ("a{3,2}", "min repeat greater than max repeat"),
        ("(a{100}){100}", f"more than {MAX_STATES} states"),
    ],
)
def test_refused_patterns_name_the_construct(pattern, message):
    assert message in pattern_error(pattern)
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_pattern(pattern)
