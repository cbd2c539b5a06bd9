"""MammothModa2.5 glyph text: what of a prompt the ByT5 glyph encoder reads.

Glyph checkpoints (``enable_byt5``) render the text the prompt quotes. As the official pipeline
does, the content of every quoted span -- ``"..."``, ``“...”``, ``'...'`` (not an apostrophe
inside a word), ``‘...’``, ``「...」``, ``『...』``, ``《...》`` -- becomes one line
``Text "<content>". `` of the ByT5 input (distinct spans once each, in order of appearance),
and the planner then sees the prompt with those spans emptied. A prompt without quotes has no
glyph text (the official encodes nothing for it). The negative prompt follows the same rule.
"""

from __future__ import annotations

import re

# Opening / closing quote of each pair; the ASCII single quote only as a quote, not an apostrophe.
_PAIRS = (('"', '"'), ("“", "”"), ("'", "'"), ("‘", "’"), ("「", "」"), ("『", "』"), ("《", "》"))


def _span(opening: str, closing: str) -> str:
    if opening == "'":  # not preceded by a word character; closed by ' not after a space, not before a word
        return r"(?<!\w)'(.*?)(?<!\s)'(?!\w)"
    return re.escape(opening) + "(.*?)" + re.escape(closing)


QUOTED = re.compile("|".join(_span(o, c) for o, c in _PAIRS))


def glyph_text(prompt: str) -> str | None:
    """The ByT5 input for ``prompt``: ``Text "a". Text "b". `` for its quoted spans, or None."""
    spans = [next((g for g in match.groups() if g is not None), "") for match in QUOTED.finditer(prompt)]
    if not spans:
        return None
    if len(spans) > 1:
        spans = list(dict.fromkeys(spans))
    return ". ".join(f'Text "{text}"' for text in spans) + ". "


def without_quoted_text(prompt: str) -> str:
    """``prompt`` with every quoted span emptied (its quote marks kept): what the planner encodes
    when the glyph encoder reads the quoted text instead."""
    return QUOTED.sub(lambda m: next(o + c for o, c in _PAIRS if m.group().startswith(o)), prompt)
