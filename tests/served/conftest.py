"""One served pipeline for the whole package (``pipeline.py`` says what it serves)."""

from __future__ import annotations

import httpx
import pytest

from .pipeline import HEADERS, pipeline_config


@pytest.fixture(scope="package")
def served(tmp_path_factory):
    from services.deploy import serve_down, serve_up

    cfg = pipeline_config(str(tmp_path_factory.mktemp("models")))
    serve_up(cfg)
    try:
        yield cfg
    finally:
        serve_down()


@pytest.fixture(scope="package")
def http(served):
    """An HTTP client of the ingress that sends the key."""
    with httpx.Client(base_url=f"http://127.0.0.1:{served.ingress.http_port}", timeout=300,
                      headers=HEADERS) as client:
        yield client
