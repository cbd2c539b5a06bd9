"""The model-family registry and the ingress's model routing (no Ray, no engines).

A family registered here, from a test, is served by the same routing and job code the ingress
runs; nothing in services/ names it.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import grpc
import pytest

from protos import common_pb2, dit_pb2, generation_pb2
from services import media_formats
from services.config import RequestLimits
from services.errors import classify
from services.families import TASKS, ModelFamily, families, get_family, register_family, unregister_family
from services.jobs import ImageJob, InvalidArgument
from services.model_routing import ModelNotFound, ModelRouter, requested_model
from services.presets import PRESETS
from services.stage_messages import denoise_job

BUILT: list[str] = []  # tasks the test family built jobs for


def _dummy_family() -> ModelFamily:
    """An image family of its own: the MammothModa2 builders under another name and defaults."""
    base = get_family("mammoth2")

    def build_job(msg, defaults, limits, task):
        BUILT.append(task)
        return base.build_job(msg, defaults, limits, task)

    family = dataclasses.replace(base, name="dummy-test", description="a family registered by a test",
                                 tasks=("text_to_image", "understand"), build_job=build_job,
                                 defaults={**base.defaults, "width": 64, "height": 64, "steps": 3})
    return family


@pytest.fixture
def dummy():
    BUILT.clear()
    family = register_family(_dummy_family())
    yield family
    unregister_family(family.name)


def _index(family: str, preset: str, **defaults):
    return SimpleNamespace(family=family, preset=preset, defaults={**get_family(family).defaults, **defaults}
                           if family in families() else defaults)


def test_builtin_families_declare_their_tasks_and_engines():
    assert {"mammoth2", "mammoth25"} <= set(families())
    image, video = get_family("mammoth2"), get_family("mammoth25")
    assert image.output == "image" and video.output == "video"
    assert set(image.tasks) | set(video.tasks) == set(TASKS)
    assert video.parallel_dit and not image.parallel_dit
    from vae_worker.engine import ImageVAE, VideoVAE

    assert image.engine_class("vae") is ImageVAE and video.engine_class("vae") is VideoVAE
    for preset in PRESETS.values():  # every preset names a registered family and gets its tasks
        assert preset.tasks == get_family(preset.family).tasks


def test_register_lookup_and_refusals(dummy):
    assert get_family("dummy-test") is dummy and "dummy-test" in families()
    with pytest.raises(ValueError, match="already registered"):
        register_family(dataclasses.replace(dummy, description="another"))
    with pytest.raises(ValueError, match="unknown tasks"):
        register_family(dataclasses.replace(dummy, name="bad", tasks=("text_to_sound",)))
    with pytest.raises(LookupError, match="unknown model family 'nope'"):
        get_family("nope")
    with pytest.raises(LookupError, match="no planner engine"):
        dataclasses.replace(dummy, engines={}).engine_class("planner")


def test_a_registered_family_is_routed_to_and_builds_its_jobs(dummy):
    """Two image models of one family, a test family and a video model side by side."""
    router = ModelRouter.from_indexes({
        "image": _index("mammoth2", "tiny-mammoth2"),
        "image-b": _index("mammoth2", "tiny-mammoth2", width=128, height=128),
        "mine": _index("dummy-test", "dummy"),
        "video": _index("mammoth25", "tiny-mammoth25"),
    }, stages={"image": "S-image", "image-b": "S-image-b", "mine": "S-mine", "video": "S-video"})
    assert router.route("text_to_image").name == "image"  # first model serving the task
    assert router.route("understand").name == "image"
    assert router.route("text_to_video").name == "video"
    served = router.route("text_to_image", "image-b")
    assert (served.name, served.stages, served.family.name) == ("image-b", "S-image-b", "mammoth2")
    mine = router.route("text_to_image", "mine")
    assert mine.stages == "S-mine" and mine.family is dummy
    job = mine.family.build_job(generation_pb2.GenerateImageRequest(prompt="a cat"), mine.defaults,
                                RequestLimits(), "text_to_image")
    assert isinstance(job, ImageJob) and (job.width, job.height, job.steps) == (64, 64, 3)
    assert BUILT == ["text_to_image"]
    with pytest.raises(InvalidArgument, match="does not serve image_edit") as err:
        router.route("image_edit", "mine")
    assert err.value.field == "model" and not isinstance(err.value, ModelNotFound)
    with pytest.raises(InvalidArgument, match="'image-b' does not serve text_to_video"):
        router.route("text_to_video", "image-b")


def test_unknown_model_is_not_found_naming_it():
    router = ModelRouter.from_indexes({"image": _index("mammoth2", "tiny-mammoth2")})
    with pytest.raises(ModelNotFound, match="'nope' does not exist; served: image") as err:
        router.route("text_to_image", "nope")
    assert err.value.field == "model" and err.value.http_status == 404 and err.value.code == "model_not_found"
    assert classify(err.value).grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="no model for text_to_video") as err:
        router.route("text_to_video")
    assert err.value.field == "model"


def test_default_models_override_the_first_model():
    indexes = {"image": _index("mammoth2", "tiny-mammoth2"), "image-b": _index("mammoth2", "tiny-mammoth2"),
               "video": _index("mammoth25", "tiny-mammoth25")}
    router = ModelRouter.from_indexes(indexes, {"text_to_image": "image-b", "understand": "video"})
    assert router.route("text_to_image").name == "image-b" and router.route("image_edit").name == "image"
    assert router.route("understand").name == "video"
    with pytest.raises(ValueError, match="does not serve text_to_video"):
        ModelRouter.from_indexes(indexes, {"text_to_video": "image"})
    entry = router.models["image-b"].describe()
    assert entry["id"] == "image-b" and entry["family"] == "mammoth2" and "text_to_image" in entry["tasks"]


def test_requested_model_reads_the_request_field():
    assert requested_model(SimpleNamespace(model="")) is None and requested_model(SimpleNamespace()) is None
    assert requested_model(SimpleNamespace(model="image-b")) == "image-b"
    if "model" in generation_pb2.UnderstandRequest.DESCRIPTOR.fields_by_name:  # the gRPC field
        assert requested_model(generation_pb2.EditVideoRequest(model="clip")) == "clip"
        assert requested_model(generation_pb2.UnderstandRequest()) is None
    with pytest.raises(InvalidArgument, match="must be a string"):
        requested_model(SimpleNamespace(model=7))


def test_the_dit_job_follows_the_family(dummy):
    request = dit_pb2.DenoiseRequest(latent_height=8, latent_width=8, latent_frames=3, steps=2)
    with pytest.raises(InvalidArgument, match="latent_frames"):  # image families: one latent frame
        denoise_job(request, "dummy-test", dict(dummy.defaults))
    video = denoise_job(request, "mammoth25", dict(get_family("mammoth25").defaults))
    assert video.latent_frames == 3
    request.latent_frames = 1
    assert isinstance(denoise_job(request, dummy, dict(dummy.defaults)), ImageJob)


def test_one_format_table_matches_the_proto_enums():
    for enum, kind in ((common_pb2.ImageFormat, "image"), (common_pb2.VideoFormat, "video")):
        names = media_formats.format_names(kind)
        assert set(names) == set(enum.values())  # every enum value, UNSPECIFIED too, has a format
        assert all(enum.Name(number).lower().endswith(name) for number, name in names.items() if number)
    assert set(media_formats.RESIZE_POLICIES) == set(common_pb2.ResizePolicy.values())
    assert media_formats.MIME["gif"] == "image/gif" and media_formats.IMAGE_FORMAT_IDS["webp"] == 3
