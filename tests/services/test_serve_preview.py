"""MammothModa2-Preview end to end through real Ray Serve on CPU, gRPC and HTTP.

One Serve deployment for the module with two Preview models: ``preview`` (the
``tiny-mammoth2-preview`` preset, the default for every image task) and ``converted`` (a
directory ``mammoth convert --from mammothmoda2-preview`` wrote from an official-layout
checkpoint), each with its own Qwen2.5-VL planner on vLLM, DiT and VAE applications: two models
of one family side by side, so this module also checks that a request's ``model`` picks its own
model's stages.
"""

from __future__ import annotations

import base64
import io

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from protos import common_pb2, generation_pb2, generation_pb2_grpc
from services.client import MammothClient
from services.config import ServeConfig
from tests.ports import free_port as _free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from services.convert import convert
    from services.deploy import serve_down, serve_up
    from tests.convert.official_layout import write_official_mammothmoda2_preview

    src = tmp_path_factory.mktemp("official-preview")
    write_official_mammothmoda2_preview(src)
    converted = convert(src, tmp_path_factory.mktemp("converted") / "model", "mammothmoda2-preview")
    cache = tmp_path_factory.mktemp("models")
    cfg = ServeConfig.loads(f"""
models:
  preview: {{preset: tiny-mammoth2-preview, cache_dir: {cache}}}
  converted: {{path: {converted.root}}}
ingress: {{grpc_port: {_free_port()}, http_port: {_free_port()}, host: 127.0.0.1,
          limits: {{max_width: 256, max_height: 256, max_steps: 20}}}}
planner: {{ray_actor_options: {{num_cpus: 0.1}}}}
dit: {{engine: {{batch_wait_timeout_s: 0.2}}, ray_actor_options: {{num_cpus: 0.1}}}}
vae: {{ray_actor_options: {{num_cpus: 0.1}}}}
""")  # the stage replicas well within a 2-CPU machine's Ray resources
    serve_up(cfg)
    try:
        yield cfg
    finally:
        serve_down()


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.ingress.grpc_port}") as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=f"http://127.0.0.1:{served.ingress.http_port}", timeout=300) as client:
        yield client


def _client(cfg: ServeConfig, use_http: bool) -> MammothClient:
    return MammothClient(f"127.0.0.1:{cfg.ingress.grpc_port}", f"http://127.0.0.1:{cfg.ingress.http_port}",
                         use_http=use_http)


def _png(width: int = 84, height: int = 56) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("use_http", [False, True], ids=["grpc", "http"])
def test_preview_text_to_image_edit_and_understanding(served, use_http):
    client = _client(served, use_http)
    steps: list[int] = []
    image = client.generate_image("a red bicycle", seed=7, steps=2, width=64, height=64,
                                  progress=lambda phase, s, _t: steps.append(s) if phase == "denoise" else None)
    assert image.mime_type == "image/png" and _size(image.data) == (64, 64) and steps == [1, 2]
    edited = client.edit_image([_png(96, 64)], "make it blue", seed=3, steps=2)
    assert _size(edited.data) == (96, 64)  # the reference's size
    answer = list(client.ask("What is in this picture?", [("image", _png())], max_tokens=6, seed=1))
    assert len(answer) >= 2 and "".join(answer)


def test_same_seed_same_image_across_transports(served):
    a = _client(served, False).generate_image("a lighthouse", seed=11, steps=2, width=64, height=64)
    b = _client(served, True).generate_image("a lighthouse", seed=11, steps=2, width=64, height=64)
    assert a.data == b.data


def test_the_converted_official_checkpoint_serves_every_image_task(stub, http):
    request = generation_pb2.GenerateImageRequest(prompt="a green kite", width=64, height=64, steps=2, seed=5,
                                                  model="converted")
    result = list(stub.GenerateImage(request, timeout=300))[-1].result
    assert result.model == "converted" and _size(result.media.data) == (64, 64)
    # the official t2i_generation_config.json's sampling defaults (top_k 2048) drive the plan
    edit = generation_pb2.EditImageRequest(instruction="make it red", steps=2, seed=5, model="converted",
                                           reference_images=[common_pb2.Media(data=_png(96, 64), mime_type="image/png")])
    assert _size(list(stub.EditImage(edit, timeout=300))[-1].result.media.data) == (96, 64)

    body = {"prompt": "a green kite", "size": "64x64", "steps": 2, "seed": 5, "model": "converted"}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "converted"
    assert _size(base64.b64decode(response.json()["data"][0]["b64_json"])) == (64, 64)
    chat = http.post("/v1/chat/completions", json={"model": "converted", "max_tokens": 3, "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png()).decode()}},
            {"type": "text", "text": "describe"}]}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]

    listed = {m["id"]: m["family"] for m in http.get("/v1/models").json()["data"]}
    assert listed == {"preview": "mammoth2-preview", "converted": "mammoth2-preview"}


# ---------------------------------------------------------------------------- model routing


def _dit_batches() -> dict[str, int]:
    """Batches each model's DiT replica has run (its own application)."""
    return {model: serve.get_deployment_handle("DiT", app_name=f"{model}-dit").stats.remote().result()["batches_run"]
            for model in ("preview", "converted")}


def _image(stub, **fields) -> generation_pb2.GenerationResult:
    request = generation_pb2.GenerateImageRequest(prompt="a red square", width=64, height=64, steps=2, seed=3,
                                                  **fields)
    return list(stub.GenerateImage(request, timeout=300))[-1].result


def test_the_request_model_picks_its_own_stages_over_grpc_and_http(stub, http):
    before = _dit_batches()
    assert _image(stub, model="converted").model == "converted"
    after = _dit_batches()
    assert after == {"preview": before["preview"], "converted": before["converted"] + 1}
    assert _image(stub).model == "preview"  # no model: the first model serving text_to_image
    assert _dit_batches()["preview"] == after["preview"] + 1
    body = {"prompt": "a red square", "size": "64x64", "steps": 2, "seed": 3, "model": "converted"}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200 and response.json()["model"] == "converted", response.text
    assert _dit_batches()["converted"] == after["converted"] + 1


def test_unknown_or_unfit_models_are_refused_naming_model(stub, http):
    with pytest.raises(grpc.RpcError) as err:
        _image(stub, model="nope")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("model:")
    assert "'nope'" in err.value.details()
    response = http.post("/v1/images/generations", json={"prompt": "x", "model": "nope"})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'nope'" in error["message"]
    for model in ("converted", ""):  # an image model cannot make videos; no video model is served
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateVideo(generation_pb2.GenerateVideoRequest(prompt="x", model=model), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("model:")
