"""Prompt syntax as AUTOMATIC1111 reads it: emphasis weights, BREAK, and 75-token windows for long prompts.

Emphasis: `(word)` multiplies the weight of `word` by 1.1, `[word]` divides it by 1.1, `(word:1.3)` sets a factor of
1.3; groups nest and multiply; an unclosed bracket applies to the end of the prompt; `\\(`, `\\)`, `\\[`, `\\]` and
`\\\\` are literal characters (a lone backslash is dropped). `BREAK` (upper case, as a word) ends the current
window, also inside brackets (where A1111 would read it as text).

Windows: the CLIP text towers read 77 positions, bos + 75 tokens + eos. A longer prompt is split into windows of 75
tokens, each encoded on its own and concatenated along the token axis, so nothing is ever truncated. When a window
fills up and a comma lies within the last `COMMA_BACKTRACK` tokens, the text after that comma moves to the next window
(A1111's "comma padding backtrack"), so phrases are not cut in half.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Factors for one level of ( ) and [ ] (A1111's defaults).
ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1
WINDOW_TOKENS = 75  # 77 CLIP positions minus bos and eos
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`

# One token of the emphasis grammar per match, in priority order.
_SYNTAX = re.compile(
    r"""
    \\[()\[\]\\]           # escaped bracket or backslash: a literal character
  | \\                     # a lone backslash: literal
  | \(                     # open round group
  | \[                     # open square group
  | :\s*([+-]?[.\d]+)\s*\) # ":1.3)" closes a round group with an explicit factor
  | \)                     # close round group
  | \]                     # close square group
  | [^\\()\[\]:]+          # plain text
  | :                      # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float
    is_break: bool = False


def parse_emphasis(prompt: str) -> list[Fragment]:
    """Split a prompt into runs of text with their emphasis weight; BREAK becomes a marker fragment.

    >>> [(f.text, round(f.weight, 4)) for f in parse_emphasis("a (red:1.3) [cat]")]
    [('a ', 1.0), ('red', 1.3), (' ', 1.0), ('cat', 0.9091)]
    """
    fragments: list[list] = []  # [text, weight, is_break], mutable while groups close
    open_round: list[int] = []  # index of the first fragment inside each open ( group
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        token, factor = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0, False])  # a lone backslash is dropped, as in A1111
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif factor is not None and open_round:
            scale_from(open_round.pop(), float(factor))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    fragments.append(["BREAK", 1.0, True])
                fragments.append([part, 1.0, False])
    # Unclosed groups apply to the end of the prompt.
    for start in open_round:
        scale_from(start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_FACTOR)

    merged: list[list] = []
    for fragment in fragments:
        if merged and not fragment[2] and not merged[-1][2] and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [Fragment(t, w, b) for t, w, b in merged] or [Fragment("", 1.0)]


@dataclass
class Window:
    """Up to 75 prompt tokens and one emphasis weight per token (bos/eos/padding are added per encoder)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def split_windows(
    fragments: Sequence[Fragment],
    encode: Callable[[str], list[int]],
    comma_id: int | None,
    window: int = WINDOW_TOKENS,
    backtrack: int = COMMA_BACKTRACK,
) -> list[Window]:
    """Tokenize weighted fragments into windows of at most `window` tokens (at least one window).

    Args:
        fragments: from `parse_emphasis`.
        encode: text -> token ids without bos/eos (the tokenizer's `encode`).
        comma_id: the id of "," as a word, for backtracking; None disables backtracking.
    """
    windows: list[Window] = []
    current = Window()
    last_comma = -1  # position in `current` of the last comma

    def close() -> None:
        nonlocal current, last_comma
        windows.append(current)
        current, last_comma = Window(), -1

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        for token in encode(fragment.text):
            if token == comma_id:
                last_comma = len(current.tokens)
            elif len(current.tokens) == window and last_comma != -1 and window - last_comma <= backtrack:
                # Move what follows the comma into the next window instead of splitting the phrase.
                moved = Window(current.tokens[last_comma + 1 :], current.weights[last_comma + 1 :])
                del current.tokens[last_comma + 1 :], current.weights[last_comma + 1 :]
                close()
                current = moved
            if len(current.tokens) == window:
                close()
            current.tokens.append(token)
            current.weights.append(fragment.weight)
    if current.tokens or not windows:
        close()
    return windows


def window_ids(window: Window, bos: int, eos: int, pad: int, length: int = WINDOW_TOKENS + 2) -> list[int]:
    """bos + tokens + eos, then `pad` up to `length` (SD1 pads with eos, OpenCLIP towers with 0)."""
    ids = [bos, *window.tokens, eos]
    return ids + [pad] * (length - len(ids))


def window_weights(window: Window, length: int = WINDOW_TOKENS + 2) -> list[float]:
    """Per-position weights matching `window_ids`: 1.0 for bos, eos and padding."""
    weights = [1.0, *window.weights]
    return weights + [1.0] * (length - len(weights))


def apply_style(style: str, prompt: str) -> str:
    """A1111's prompt style (`merge_prompts`): the style's text with "{prompt}" replaced by the prompt, or, without
    that placeholder, appended to the prompt after a comma (either may be empty)."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)
