"""``mammoth serve`` deploys models in waves where cores are few (``start_models_together``).

The grouping is checked on the rendered config; one slow test starts the real server with the
embedded two-model default on one model per wave: it serves the first model while the second
is still starting, a request sent then is answered, and the second model serves once its
``ready:`` line appears.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.client import MammothClient
from services.config import ServeConfig
from services.deploy import CPUS_PER_MODEL_START, start_waves, wave_models
from services.render import render_serve_config
from tests.k8s.procs import start_serve, terminate, tree, wait_for_line
from tests.ports import free_port

THREE_MODELS = "models: {image: {preset: tiny-mammoth2}, video: {preset: tiny-mammoth25}, extra: {preset: tiny-mammoth2}}"


def _waves(text: str, cpus: int) -> list[list[str]]:
    cfg = ServeConfig.loads(text)
    return [[app["name"] for app in wave] for wave in start_waves(cfg, render_serve_config(cfg)["applications"], cpus)]


def test_few_cores_start_one_model_at_a_time_with_the_ingress_first():
    waves = _waves(THREE_MODELS, cpus=2)
    assert waves == [["image-planner", "image-dit", "image-vae", "mammoth"],
                     ["video-planner", "video-dit", "video-vae"],
                     ["extra-planner", "extra-dit", "extra-vae"]]


def test_more_cores_start_more_models_together():
    assert len(_waves(THREE_MODELS, cpus=2 * CPUS_PER_MODEL_START)) == 2
    assert len(_waves(THREE_MODELS, cpus=3 * CPUS_PER_MODEL_START)) == 1


def test_configured_count_wins_over_the_cores():
    assert len(_waves(THREE_MODELS + "\nstart_models_together: 3", cpus=1)) == 1
    cfg = ServeConfig.loads(THREE_MODELS + "\nstart_models_together: 2")
    waves = start_waves(cfg, render_serve_config(cfg)["applications"], cpus=64)
    assert [wave_models(w) for w in waves] == [["image", "video"], ["extra"]]


@pytest.mark.slow
def test_serve_answers_the_first_model_while_the_next_starts(tmp_path):
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "mammoth.yaml"
    config.write_text(f"""
models:
  image: {{preset: tiny-mammoth2, cache_dir: {tmp_path / 'models'}}}
  video: {{preset: tiny-mammoth25, cache_dir: {tmp_path / 'models'}}}
ingress: {{grpc_port: {grpc_port}, http_port: {http_port}, host: 127.0.0.1, playground: false}}
start_models_together: 1
""")
    log = tmp_path / "serve.log"
    proc = start_serve(config, log)
    started = []
    client = MammothClient(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", timeout_s=600)
    try:
        serving = wait_for_line(log, "serving:", proc, 900)
        started = tree(proc.pid)
        assert "models image, starting video (" in serving, serving
        # sent while the video model is still starting (its wave includes a vLLM engine start):
        # it waits for the model rather than failing, and the image model answers meanwhile
        assert "ready: models video" not in log.read_text(errors="replace")
        with ThreadPoolExecutor(1) as pool:
            video = pool.submit(client.generate_video, "waves on a beach", seed=2, steps=2, frames=5,
                                width=64, height=64)
            image = client.generate_image("a lighthouse", seed=1, steps=2, width=64, height=64)
            assert (image.width, image.height) == (64, 64)
            assert video.result(timeout=600).frames == 5
        # the answer can come a moment before mammoth serve sees the wave RUNNING
        assert wait_for_line(log, "ready: models", proc, 120) == "ready: models video"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, log.read_text()[-4000:]
        assert "Traceback" not in log.read_text(errors="replace")
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        terminate(started + tree(proc.pid), grace_s=10)
