"""Two image models of one family served side by side, chosen by the request's ``model``.

The package's pipeline serves two tiny MammothModa2 models (``image`` and ``image-b``, one cache
directory) beside the video model: each has its own planner / DiT / VAE applications, and a
request naming ``image-b`` must run on image-b's stages, over gRPC and HTTP alike.
"""

from __future__ import annotations

import grpc
import pytest
from ray import serve

from protos import generation_pb2, generation_pb2_grpc
from tests.served.pipeline import channel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(served):
    with channel(served) as ch:
        yield generation_pb2_grpc.GenerationStub(ch)


def _dit_batches() -> dict[str, int]:
    """Batches each model's DiT replica has run (its own application)."""
    return {model: serve.get_deployment_handle("DiT", app_name=f"{model}-dit").stats.remote().result()["batches_run"]
            for model in ("image", "image-b")}


def _image(stub, **fields) -> generation_pb2.GenerationResult:
    request = generation_pb2.GenerateImageRequest(prompt="a red square", width=64, height=64, steps=2, seed=3,
                                                  **fields)
    events = list(stub.GenerateImage(request, timeout=300))
    return events[-1].result


def test_the_request_model_picks_the_served_model_over_grpc_and_http(stub, http):
    before = _dit_batches()
    result = _image(stub, model="image-b")
    assert result.model == "image-b" and result.media.data
    after = _dit_batches()
    assert after["image-b"] == before["image-b"] + 1 and after["image"] == before["image"]

    default = _image(stub)  # no model: the first model serving text_to_image
    assert default.model == "image" and _dit_batches()["image"] == after["image"] + 1

    body = {"prompt": "a red square", "size": "64x64", "steps": 2, "seed": 3, "model": "image-b"}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "image-b" and _dit_batches()["image-b"] == after["image-b"] + 1

    chat = http.post("/v1/chat/completions", json={"model": "image-b", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text

    listed = http.get("/v1/models").json()["data"]
    assert [(m["id"], m["family"]) for m in listed] == [("image", "mammoth2"), ("image-b", "mammoth2"),
                                                        ("video", "mammoth25")]


def test_unknown_or_unfit_models_are_refused_naming_model(stub, http):
    with pytest.raises(grpc.RpcError) as err:
        _image(stub, model="nope")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in err.value.details()
    assert err.value.details().startswith("model:")

    response = http.post("/v1/images/generations", json={"prompt": "x", "model": "nope"})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'nope'" in error["message"]

    with pytest.raises(grpc.RpcError) as err:  # an image model cannot make videos
        list(stub.GenerateVideo(generation_pb2.GenerateVideoRequest(prompt="x", model="image-b"), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("model:")
