"""The flows' retry policy: a dead stage is issued again once; the planner only before streaming.

The stages here are scripted so a replica death lands at an exact point of the flow; the served
suite (``test_served.py``) kills real replicas by PID.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ray.exceptions import ActorDiedError

from protos import generation_pb2
from services import flows
from services.config import RequestLimits
from services.handoff import DenoiseDone, DenoiseStepEvent, MediaOutput
from services.jobs import InvalidArgument, image_job, understand_job
from services.presets import get_preset

pytestmark = pytest.mark.reliability
IMAGE = get_preset("tiny-mammoth2").defaults


class ScriptedStages:
    """Counts calls; ``die`` maps a call name to the call numbers (1-based) that die."""

    model_name = "tiny"

    def __init__(self, die: dict[str, set[int]] | None = None, die_after_steps: int | None = None):
        self.die = die or {}
        self.die_after_steps = die_after_steps
        self.calls: dict[str, int] = {}

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] in self.die.get(name, ()):
            raise ActorDiedError()

    def plan_image(self, job, references):
        self.calls["plan"] = self.calls.get("plan", 0) + 1
        return ("conditions", self.calls["plan"])

    async def denoise(self, job, conditions, media):
        self._call("denoise")
        if "plan" in self.die and conditions[1] in self.die["plan"]:
            raise ActorDiedError()  # the DiT could not resolve a dead planner's result
        for step in range(1, job.steps + 1):
            if self.die_after_steps == step and self.calls["denoise"] == 1:
                raise ActorDiedError()
            yield DenoiseStepEvent(step, job.steps)
        yield DenoiseDone(latents=np.zeros((16, 2, 2), np.float32), shape=(16, 2, 2), steps=job.steps)

    async def decode(self, latents, job):
        self._call("decode")
        return MediaOutput(data=b"png", mime_type="image/png", width=job.width, height=job.height)

    def understand(self, job):
        return self._understand()

    async def _understand(self):
        self._call("understand")
        for word in ("a", "b"):
            if self.calls["understand"] in self.die.get("understand_after_first", ()) and word == "b":
                raise ActorDiedError()
            yield word


def _job(steps: int = 3):
    return image_job(generation_pb2.GenerateImageRequest(prompt="x", steps=steps, width=32, height=32, seed=1),
                     IMAGE, RequestLimits(), edit=False)


def _run(flow) -> list:
    async def collect():
        return [event async for event in flow]
    return asyncio.run(collect())


def test_a_dit_that_dies_mid_denoise_is_retried_once_on_the_same_conditions():
    stages = ScriptedStages(die_after_steps=2)
    events = _run(flows.text_to_image(stages, _job(), retries=1))
    result = events[-1]
    assert isinstance(result, flows.Result) and result.retries == 1
    assert stages.calls == {"plan": 1, "denoise": 2, "decode": 1}  # the plan was not issued again
    assert [e.step for e in events if isinstance(e, flows.Step)] == [1, 1, 2, 3]


def test_a_dead_planner_before_any_step_is_planned_again():
    stages = ScriptedStages(die={"plan": {1}})
    result = _run(flows.text_to_image(stages, _job(), retries=1))[-1]
    assert result.retries == 1 and stages.calls["plan"] == 2 and stages.calls["denoise"] == 2


def test_a_dead_vae_decode_is_issued_again_on_the_same_latents():
    stages = ScriptedStages(die={"decode": {1}})
    result = _run(flows.text_to_image(stages, _job(), retries=1))[-1]
    assert result.retries == 1 and stages.calls == {"plan": 1, "denoise": 1, "decode": 2}


def test_a_second_death_is_not_retried_and_surfaces_as_unavailable():
    stages = ScriptedStages(die={"denoise": {1}, "decode": {1}})
    with pytest.raises(ActorDiedError):
        _run(flows.text_to_image(stages, _job(), retries=1))
    stages = ScriptedStages(die={"denoise": {1}})
    with pytest.raises(ActorDiedError):
        _run(flows.text_to_image(stages, _job(), retries=0))


def test_client_errors_are_never_retried():
    class Bad(ScriptedStages):
        async def denoise(self, job, conditions, media):
            self._call("denoise")
            raise InvalidArgument("steps", "no")
            yield  # pragma: no cover

    stages = Bad()
    with pytest.raises(InvalidArgument):
        _run(flows.text_to_image(stages, _job(), retries=1))
    assert stages.calls["denoise"] == 1


def test_understand_is_retried_only_before_its_first_token():
    job = understand_job(generation_pb2.UnderstandRequest(messages=[generation_pb2.ChatMessage(
        role="user", content=[generation_pb2.ContentPart(text="hi")])]), RequestLimits())
    stages = ScriptedStages(die={"understand": {1}})
    assert _run(flows.understand(stages, job, retries=1)) == ["a", "b"] and stages.calls["understand"] == 2
    stages = ScriptedStages(die={"understand_after_first": {1}})
    with pytest.raises(ActorDiedError):  # "a" already reached the client: not issued again
        _run(flows.understand(stages, job, retries=1))
    assert stages.calls["understand"] == 1
