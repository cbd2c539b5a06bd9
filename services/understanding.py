"""What an understanding (chat) stream reports at its end, beside its text deltas.

The planner stage yields text deltas and then one ``UnderstandDone``; ``services.flows``
hands it to the ingress, which answers OpenAI's ``usage`` and ``finish_reason`` from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UnderstandDone:
    """Token counts and why the answer ended ("stop": end of text or a stop string; "length":
    the token bound)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
