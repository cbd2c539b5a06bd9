"""MammothModa2.5 glyph text: the official extraction rule, and how it rides the jobs and messages."""

from __future__ import annotations

import pickle

import pytest

from protos import dit_pb2, generation_pb2
from services import stage_messages as messages
from services.config import RequestLimits
from services.glyph_text import glyph_text, without_quoted_text
from services.jobs import InvalidArgument, video_job
from services.presets import get_preset

VIDEO = get_preset("tiny-mammoth25").defaults
GLYPH = {**VIDEO, "glyph_text": True}  # what convert writes for an enable_byt5 checkpoint
LIMITS = RequestLimits(max_width=512, max_height=512, max_frames=17, max_steps=40)


@pytest.mark.parametrize(("prompt", "text"), [
    ('a shop sign that reads "OPEN"', 'Text "OPEN". '),
    ("a poster: “Café” and ‘Bar’", 'Text "Café". Text "Bar". '),
    ("「東京」 『駅』 《报》", 'Text "東京". Text "駅". Text "报". '),
    ("'hello world' on a wall", 'Text "hello world". '),
    ('"A", "B" and "A" again', 'Text "A". Text "B". '),  # distinct spans once, first-seen order
    ('an empty "" sign', 'Text "". '),
])
def test_quoted_spans_become_text_lines(prompt, text):
    assert glyph_text(prompt) == text


@pytest.mark.parametrize("prompt", ["a red bicycle", "it's the cat's toy", "", "an ' unbalanced quote"])
def test_no_quotes_no_glyph_text(prompt):
    """Apostrophes inside words are no quotes; the official encodes nothing then."""
    assert glyph_text(prompt) is None


def test_single_quotes_need_word_boundaries():
    # opening ' after a word char is an apostrophe; a closing ' after a space does not close
    assert glyph_text("don't say 'x ' or 'y'") == "Text \"x ' or 'y\". "
    assert glyph_text("the word 'sale'!") == 'Text "sale". '


def test_planner_text_keeps_the_quote_marks_but_not_their_content():
    assert without_quoted_text('a sign "OPEN" and “Café”, it\'s \'late\'') == "a sign \"\" and “”, it's ''"
    assert without_quoted_text("no quotes") == "no quotes"


def test_glyph_checkpoints_split_the_prompt_between_planner_and_dit():
    msg = generation_pb2.GenerateVideoRequest(prompt='a neon sign "OPEN 24H"', negative_prompt='"blurry" text',
                                              width=64, height=64, frames=5, steps=2)
    job = video_job(msg, GLYPH, LIMITS, edit=False)
    assert (job.glyph_text, job.negative_glyph_text) == ('Text "OPEN 24H". ', 'Text "blurry". ')
    assert job.planner_prompts() == ('a neon sign ""', '"" text')
    assert job.prompt == 'a neon sign "OPEN 24H"'  # the request itself is kept as asked
    request = messages.encode_prompt_request(job)
    assert (request.prompt, request.negative_prompt) == ('a neon sign ""', '"" text')


def test_other_checkpoints_get_no_glyph_text_and_the_whole_prompt():
    msg = generation_pb2.GenerateVideoRequest(prompt='a neon sign "OPEN"', width=64, height=64, frames=5, steps=2)
    job = video_job(msg, VIDEO, LIMITS, edit=False)
    assert job.glyph_text is None and job.negative_glyph_text is None
    assert messages.encode_prompt_request(job).prompt == 'a neon sign "OPEN"'
    assert messages.denoise_request(job).glyph_text == ""


def test_glyph_text_reaches_the_dit_job_through_the_message():
    msg = generation_pb2.GenerateVideoRequest(prompt='"SALE" banner', negative_prompt="", width=64, height=64,
                                              frames=5, steps=2, guidance=3.0)
    job = video_job(msg, GLYPH, LIMITS, edit=False)
    request = pickle.loads(pickle.dumps(messages.denoise_request(job)))
    assert (request.glyph_text, request.negative_glyph_text) == ('Text "SALE". ', "")
    again = messages.denoise_job(request, "mammoth25", GLYPH, LIMITS)
    assert again.glyph_text == 'Text "SALE". ' and again.negative_glyph_text is None


def test_a_direct_denoise_request_glyph_text_is_checked_naming_the_field():
    base = dict(latent_frames=2, latent_height=8, latent_width=8, steps=2)
    with pytest.raises(InvalidArgument, match="negative_glyph_text"):
        messages.denoise_job(dit_pb2.DenoiseRequest(negative_glyph_text="a\x00b", **base), "mammoth25", GLYPH, LIMITS)
    with pytest.raises(InvalidArgument, match="glyph_text"):
        messages.denoise_job(dit_pb2.DenoiseRequest(glyph_text="x" * (4 * LIMITS.max_prompt_chars + 1), **base),
                             "mammoth25", GLYPH, LIMITS)
