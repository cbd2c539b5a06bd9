"""The gRPC contracts: committed stubs up to date, tensor codec, service shapes, a live server."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import common_pb2, dit_pb2, dit_pb2_grpc, generation_pb2, planner_pb2, vae_pb2, vae_pb2_grpc
from protos.server_extras import SERVICE_NAMES, add_health_and_reflection, add_health_and_reflection_async
from protos.tensors import ndarray_from_proto, tensor_field, tensor_from_proto, tensor_to_proto

# ---------------------------------------------------------------- generated stubs


def test_committed_stubs_are_up_to_date():
    pytest.importorskip("grpc_tools")
    from protos.build import stale_stubs

    assert stale_stubs() == [], "run `python -m protos.build` and commit the stubs"


def test_check_detects_stale_missing_and_orphaned_stubs(tmp_path, monkeypatch):
    pytest.importorskip("grpc_tools")
    import shutil

    from protos import build

    copy = tmp_path / "protos"
    shutil.copytree(build.PROTO_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(build, "PROTO_DIR", copy)
    monkeypatch.setattr(build, "ROOT", tmp_path)
    assert build.stale_stubs() == []
    (copy / "vae_pb2.py").write_text((copy / "vae_pb2.py").read_text() + "# edited\n")
    (copy / "dit_pb2_grpc.py").unlink()
    (copy / "old_pb2.py").write_text("")
    assert build.stale_stubs() == ["dit_pb2_grpc.py (missing)", "vae_pb2.py (out of date)", "old_pb2.py (no .proto)"]
    assert build.main(["--check"]) == 1
    assert sorted(build.build()) == ["dit_pb2_grpc.py", "old_pb2.py", "vae_pb2.py"]
    assert build.stale_stubs() == [] and build.main(["--check"]) == 0


def test_stubs_import_from_the_installed_package(tmp_path):
    # The Ray Serve proxy imports the stubs by module path from wherever it runs.
    code = "import protos.generation_pb2_grpc as g, protos.planner_pb2 as p; print(g.__name__, p.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("protos.generation_pb2_grpc ")


# ---------------------------------------------------------------- services and messages

UNARY, SERVER_STREAM = (False, False), (False, True)
EXPECTED_METHODS = {
    (generation_pb2, "Generation"): {
        "GenerateImage": ("GenerateImageRequest", "GenerationEvent", SERVER_STREAM),
        "EditImage": ("EditImageRequest", "GenerationEvent", SERVER_STREAM),
        "GenerateVideo": ("GenerateVideoRequest", "GenerationEvent", SERVER_STREAM),
        "EditVideo": ("EditVideoRequest", "GenerationEvent", SERVER_STREAM),
        "Understand": ("UnderstandRequest", "UnderstandEvent", SERVER_STREAM),
    },
    (planner_pb2, "Planner"): {
        "PlanImage": ("PlanImageRequest", "PlanImageResponse", UNARY),
        "EncodePrompt": ("EncodePromptRequest", "EncodePromptResponse", UNARY),
        "Understand": ("UnderstandRequest", "UnderstandEvent", SERVER_STREAM),
    },
    (dit_pb2, "DiT"): {"Denoise": ("DenoiseRequest", "DenoiseEvent", SERVER_STREAM)},
    (vae_pb2, "VAE"): {
        "Decode": ("DecodeRequest", "DecodeResponse", UNARY),
        "Encode": ("EncodeRequest", "EncodeResponse", UNARY),
        "Preview": ("PreviewRequest", "Media", UNARY),
    },
}


@pytest.mark.parametrize("module,service", list(EXPECTED_METHODS), ids=lambda v: getattr(v, "__name__", v))
def test_service_methods_and_streaming_kinds(module, service):
    desc = module.DESCRIPTOR.services_by_name[service]
    assert desc.full_name == f"mammoth.v1.{service}"
    expected = EXPECTED_METHODS[(module, service)]
    assert set(desc.methods_by_name) == set(expected)
    for name, (request, response, streaming) in expected.items():
        method = desc.methods_by_name[name]
        assert method.input_type.full_name == f"mammoth.v1.{request}"
        assert method.output_type.full_name == f"mammoth.v1.{response}"
        assert (method.client_streaming, method.server_streaming) == streaming, name


def test_planner_understand_reuses_the_public_messages():
    method = planner_pb2.DESCRIPTOR.services_by_name["Planner"].methods_by_name["Understand"]
    assert method.input_type is generation_pb2.UnderstandRequest.DESCRIPTOR


def test_optional_fields_distinguish_unset_from_zero():
    req = generation_pb2.GenerateImageRequest(prompt="a cat")
    assert not req.HasField("width") and not req.HasField("seed") and not req.HasField("negative_prompt")
    req.seed = 0
    req.negative_prompt = ""
    assert req.HasField("seed") and req.HasField("negative_prompt")
    again = generation_pb2.GenerateImageRequest.FromString(req.SerializeToString())
    assert again.HasField("seed") and not again.HasField("steps")


def test_generation_event_is_a_oneof():
    event = generation_pb2.GenerationEvent(request_id="r1", denoise_step=generation_pb2.DenoiseStep(step=1, total=8))
    assert event.WhichOneof("event") == "denoise_step"
    assert not event.denoise_step.HasField("preview")
    event.result.width = 64  # setting another member clears the first
    assert event.WhichOneof("event") == "result"
    assert {f.name for f in generation_pb2.GenerationEvent.DESCRIPTOR.oneofs_by_name["event"].fields} == {
        "queued", "planning", "denoise_step", "decoding", "result"
    }


def test_enums_have_unspecified_defaults():
    assert common_pb2.ResizePolicy.Name(0) == "RESIZE_POLICY_UNSPECIFIED"
    assert set(common_pb2.ResizePolicy.keys()) >= {"RESIZE_POLICY_RESIZE", "RESIZE_POLICY_CENTER_CROP", "RESIZE_POLICY_PAD"}
    assert set(common_pb2.ImageFormat.keys()) >= {"IMAGE_FORMAT_PNG", "IMAGE_FORMAT_JPEG", "IMAGE_FORMAT_WEBP"}
    assert set(common_pb2.VideoFormat.keys()) >= {"VIDEO_FORMAT_MP4", "VIDEO_FORMAT_GIF"}


# ---------------------------------------------------------------- tensor codec

TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
SHAPES = [(2, 3, 5), (0, 4), (), (7,)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(0, 200, shape, generator=g).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_round_trip_through_the_wire(dtype, shape):
    x = _sample(dtype, shape)
    wire = common_pb2.Tensor.FromString(tensor_to_proto(x).SerializeToString())
    assert wire.dtype == str(dtype).removeprefix("torch.")
    assert list(wire.shape) == list(shape)
    y = tensor_from_proto(wire)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)
    z = ndarray_from_proto(wire)
    expected = x.float().numpy() if dtype == torch.bfloat16 else x.numpy()
    assert z.dtype == expected.dtype
    np.testing.assert_array_equal(z, expected)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32", "uint8", "bool"])
def test_numpy_round_trip(dtype):
    x = np.arange(12).reshape(3, 4).astype(dtype)
    y = ndarray_from_proto(tensor_to_proto(x))
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, x)


def test_non_contiguous_and_big_endian_inputs_are_serialized_by_value():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(tensor_from_proto(tensor_to_proto(x)), x)
    be = np.arange(6, dtype=">i4").reshape(2, 3)
    msg = tensor_to_proto(be)
    assert msg.dtype == "int32" and msg.data[:4] == b"\x00\x00\x00\x00" and msg.data[4:8] == b"\x01\x00\x00\x00"
    np.testing.assert_array_equal(ndarray_from_proto(msg), be)


def test_decoding_shares_the_message_bytes_unless_copy_is_asked():
    msg = tensor_to_proto(torch.arange(6, dtype=torch.float32))
    view = ndarray_from_proto(msg)
    assert not view.flags.writeable
    owned = ndarray_from_proto(msg, copy=True)
    owned[0] = 42.0  # writable and independent of the message
    assert ndarray_from_proto(msg)[0] == 0.0
    t = tensor_from_proto(msg, copy=True)
    t.add_(1)
    assert tensor_from_proto(msg)[0].item() == 0.0


def test_fill_an_existing_field_in_place_and_read_fields_by_name():
    req = dit_pb2.DenoiseRequest(request_id="r")
    tensor_to_proto(torch.ones(4, 8), out=req.text_condition)
    assert req.HasField("text_condition") and list(req.text_condition.shape) == [4, 8]
    assert torch.equal(tensor_field(req, "text_condition"), torch.ones(4, 8))
    assert tensor_field(req, "negative_condition") is None
    with pytest.raises(ValueError, match="^negative_condition: required$"):
        tensor_field(req, "negative_condition", required=True)
    req.image_condition.dtype = "float32"
    req.image_condition.shape.append(3)
    with pytest.raises(ValueError, match="^image_condition: 0 data bytes"):
        tensor_field(req, "image_condition")


@pytest.mark.parametrize(
    "msg,match",
    [
        (common_pb2.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "text_condition: unsupported dtype 'float64'"),
        (common_pb2.Tensor(dtype="", shape=[1], data=b"\0" * 4), "text_condition: tensor is missing"),
        (common_pb2.Tensor(dtype="float32", shape=[2, -1], data=b""), "text_condition: negative dimension"),
        (common_pb2.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 23), r"text_condition: 23 data bytes .* \(expected 24\)"),
        (common_pb2.Tensor(dtype="bfloat16", shape=[4], data=b"\0" * 4), "text_condition: 4 data bytes"),
        (common_pb2.Tensor(dtype="int64", shape=[0], data=b"\0"), "text_condition: 1 data bytes"),
        (common_pb2.Tensor(dtype="bool", shape=[2], data=b"\x01\x02"), "text_condition: bool tensor"),
    ],
    ids=["unknown-dtype", "empty-dtype", "negative-dim", "short", "bf16-short", "empty-with-data", "bool-value"],
)
def test_malformed_tensors_are_rejected_naming_the_field(msg, match):
    with pytest.raises(ValueError, match=match):
        tensor_from_proto(msg, name="text_condition")
    with pytest.raises(ValueError, match=match):
        ndarray_from_proto(msg, name="text_condition")


def test_unsupported_inputs_are_rejected():
    with pytest.raises(ValueError, match="unsupported torch dtype torch.float64"):
        tensor_to_proto(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unsupported numpy dtype"):
        tensor_to_proto(np.zeros(2, dtype=np.complex64))
    with pytest.raises(TypeError, match="expected a torch.Tensor or numpy.ndarray"):
        tensor_to_proto([1.0, 2.0])


# ---------------------------------------------------------------- a live server


class _DiT(dit_pb2_grpc.DiTServicer):
    """Echoes the text condition back as latents after two progress events."""

    def Denoise(self, request, context):
        text = tensor_from_proto(request.text_condition, name="text_condition")
        for step in (1, 2):
            yield dit_pb2.DenoiseEvent(request_id=request.request_id, step=dit_pb2.DenoiseProgress(step=step, total=2))
        event = dit_pb2.DenoiseEvent(request_id=request.request_id)
        tensor_to_proto(text * 2, out=event.result.latents)
        yield event


class _VAE(vae_pb2_grpc.VAEServicer):
    def Preview(self, request, context):
        try:
            latents = ndarray_from_proto(request.latents, name="latents")
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return common_pb2.Media(data=latents.tobytes()[:4], mime_type="image/png")


@pytest.fixture
def live_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    dit_pb2_grpc.add_DiTServicer_to_server(_DiT(), server)
    vae_pb2_grpc.add_VAEServicer_to_server(_VAE(), server)
    health = add_health_and_reflection(server, [SERVICE_NAMES["dit"], SERVICE_NAMES["vae"]])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, health
    finally:
        channel.close()
        server.stop(grace=None)


def test_live_server_streams_tensors_and_reports_health(live_server):
    channel, health = live_server
    dit = dit_pb2_grpc.DiTStub(channel)
    req = dit_pb2.DenoiseRequest(request_id="req-1", steps=2)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    tensor_to_proto(x, out=req.text_condition)
    events = list(dit.Denoise(req, timeout=30))
    assert [e.WhichOneof("event") for e in events] == ["step", "step", "result"]
    assert all(e.request_id == "req-1" for e in events)
    assert torch.equal(tensor_from_proto(events[-1].result.latents), x * 2)

    # a malformed tensor becomes INVALID_ARGUMENT naming the field
    bad = vae_pb2.PreviewRequest(latents=common_pb2.Tensor(dtype="float32", shape=[4], data=b"\0" * 3))
    with pytest.raises(grpc.RpcError) as err:
        vae_pb2_grpc.VAEStub(channel).Preview(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "latents:" in err.value.details()

    check = health_pb2_grpc.HealthStub(channel).Check
    assert check(health_pb2.HealthCheckRequest(service=""), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    assert check(health_pb2.HealthCheckRequest(service="mammoth.v1.DiT"), timeout=30).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    health.set("mammoth.v1.DiT", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert check(health_pb2.HealthCheckRequest(service="mammoth.v1.DiT"), timeout=30).status == (
        health_pb2.HealthCheckResponse.NOT_SERVING
    )
    with pytest.raises(grpc.RpcError) as err:
        check(health_pb2.HealthCheckRequest(service="mammoth.v1.Planner"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_live_server_lists_services_via_reflection(live_server):
    channel, _ = live_server
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="mammoth.v1.DiT"),
    ])
    listed, file_reply = list(stub.ServerReflectionInfo(requests, timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {"mammoth.v1.DiT", "mammoth.v1.VAE", "grpc.health.v1.Health"} <= names
    assert "mammoth.v1.Generation" not in names
    assert file_reply.file_descriptor_response.file_descriptor_proto  # clients can fetch the schema


def test_add_health_rejects_bad_service_names():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(ValueError, match="service_names"):
        add_health_and_reflection(server, ["/mammoth.v1.DiT/Denoise"])


def test_aio_server_health_and_reflection():
    import asyncio

    async def main():
        server = grpc.aio.server()
        with pytest.raises(TypeError, match="add_health_and_reflection_async"):
            add_health_and_reflection(server, ["mammoth.v1.DiT"])
        health = await add_health_and_reflection_async(server, [SERVICE_NAMES["generation"]])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                request = health_pb2.HealthCheckRequest(service="mammoth.v1.Generation")
                first = (await check(request, timeout=30)).status
                await health.set("mammoth.v1.Generation", health_pb2.HealthCheckResponse.NOT_SERVING)
                second = (await check(request, timeout=30)).status
        finally:
            await server.stop(None)
        return first, second

    assert asyncio.run(main()) == (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
