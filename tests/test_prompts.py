"""Prompt emphasis and windows against AUTOMATIC1111's published behaviour.

The parse cases are the examples in the docstring of A1111's `prompt_parser.parse_prompt_attention` (its published
specification). The window reference below is written from A1111's description of long prompts ("split into chunks
of 75 tokens; if a comma is within the last 20 tokens of a full chunk, the text after it moves to the next chunk;
BREAK starts a new chunk") as plain index arithmetic, independently of mlx_sd's implementation.
"""

import pytest

from mlx_sd.prompts import Fragment, apply_style, parse_emphasis, split_windows, window_ids, window_weights
from oracles import a1111_windows

A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("", [("", 1.0)]),
    ("[[faded]]", [("faded", 1 / 1.1 / 1.1)]),
    ("(a:1.5) [b:2]", [("a", 1.5), (" ", 1.0), ("b:2", 1 / 1.1)]),  # [..:w] is not a weight in A1111
    ("x\\y", [("xy", 1.0)]),  # a lone backslash is dropped
    ("ratio 3:4", [("ratio 3:4", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_EXAMPLES)
def test_emphasis_matches_a1111_examples(prompt, expected):
    got = [(f.text, f.weight) for f in parse_emphasis(prompt)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_break_splits_fragments():
    frags = parse_emphasis("a cat BREAK (a dog)")
    assert [(f.text, f.is_break) for f in frags] == [("a cat", False), ("BREAK", True), ("", False), ("a dog", False)]
    assert frags[-1].weight == pytest.approx(1.1)


# --- windows -------------------------------------------------------------------------------------------------

COMMA = 267  # a made-up id for ","


def fake_encode(text: str) -> list[int]:
    """One token per word; "," is its own token (as CLIP's BPE makes it)."""
    ids = []
    for word in text.replace(",", " , ").split():
        ids.append(COMMA if word == "," else 1000 + (sum(map(ord, word)) % 40000))
    return ids


def flatten(prompt):
    tokens, breaks = [], []
    for frag in parse_emphasis(prompt):
        if frag.is_break:
            breaks.append(len(tokens))
            continue
        tokens += [(t, frag.weight) for t in fake_encode(frag.text)]
    return tokens, breaks


LONG = ", ".join(f"word{i} (thing{i}:1.2) stuff{i}" for i in range(40))
WINDOW_CASES = {
    "short": "a photo of a cat",
    "empty": "",
    "long-with-commas": LONG,
    "long-no-commas": " ".join(f"w{i}" for i in range(200)),
    "exactly-75": " ".join(f"w{i}" for i in range(75)),
    "break": "first part BREAK second (part:0.8)",
    "break-first-and-twice": "BREAK a BREAK BREAK b",
    "comma-at-edge": " ".join(f"w{i}" for i in range(74)) + " , tail words here",
}


@pytest.mark.parametrize("name", WINDOW_CASES)
def test_windows_match_reference(name):
    prompt = WINDOW_CASES[name]
    windows = split_windows(parse_emphasis(prompt), fake_encode, COMMA)
    expected = a1111_windows(*flatten(prompt), COMMA)
    assert [list(zip(w.tokens, w.weights)) for w in windows] == expected
    assert all(len(w.tokens) <= 75 for w in windows)
    # Nothing is lost: every token of the prompt appears, in order.
    assert [t for w in windows for t in w.tokens] == [t for t, _ in flatten(prompt)[0]]


def test_window_ids_and_weights():
    windows = split_windows([Fragment("a b", 1.3)], fake_encode, COMMA)
    ids = window_ids(windows[0], bos=49406, eos=49407, pad=0)
    assert len(ids) == 77 and ids[0] == 49406 and ids[3] == 49407 and set(ids[4:]) == {0}
    weights = window_weights(windows[0])
    assert weights[:4] == [1.0, 1.3, 1.3, 1.0] and len(weights) == 77


def test_prompt_styles_merge_as_a1111():
    """A1111's `merge_prompts`: "{prompt}" is replaced; otherwise the style follows the prompt after a comma."""
    assert apply_style("photo of {prompt}, 35mm", "a dog") == "photo of a dog, 35mm"
    assert apply_style("oil painting", "a dog ") == "a dog, oil painting"
    assert apply_style("oil painting", "") == "oil painting" and apply_style("", "a dog") == "a dog"
