"""The web playground, driven in real headless Chromium through a real served pipeline.

Against the package's one served pipeline (tiny image + video models, API keys on): the browser
opens ``/``, is asked for the key, generates an image (live previews over SSE), edits it, makes
a video, asks about the image and shows an API error as the API returned it; a screenshot must
not be blank. The same served pipeline then answers for the Grafana dashboard: every series the
dashboard reads must be in Ray's real Prometheus export.

Chromium and chromedriver are Debian packages that ``make install-dev`` installs; without them
the browser test fails (set ``CI_NO_BROWSER=1`` to skip it instead).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from services.config import ServeConfig
from services.http_api import RequireKey
from services.playground import FILES, mount_playground, open_paths
from tests.served.pipeline import API_KEY

slow = pytest.mark.slow


# ------------------------------------------------------------------ the static shell, no server


def _refuse(headers) -> None:
    from services.errors import Unauthenticated

    if headers.get("authorization") != f"Bearer {API_KEY}":
        raise Unauthenticated("a valid API key is required")


def _shell_app(enabled: bool) -> TestClient:
    app = FastAPI()
    app.add_api_route("/v1/models", lambda: {"data": []}, methods=["GET"])
    mount_playground(app, enabled)
    return TestClient(RequireKey(app, _refuse, open_paths(enabled)))


def test_shell_is_served_without_a_key_and_the_api_still_needs_one():
    client = _shell_app(True)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for path in ("/playground/app.js", "/playground/style.css"):
        assert path.lstrip("/") in page.text and client.get(path).status_code == 200
    assert client.get("/playground/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert client.get("/playground/__init__.py").status_code == 401  # only the listed files are open


def test_playground_off_serves_nothing_at_root():
    client = _shell_app(False)
    assert client.get("/", headers={"authorization": f"Bearer {API_KEY}"}).status_code == 404
    assert open_paths(False) == frozenset()


def test_shipped_files_are_package_data():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["services.playground"]
    for name, _ in FILES.values():
        assert any(Path(name).match(p) for p in patterns), f"{name} is not in package-data"


def test_playground_defaults_on_for_the_cpu_default_and_off_for_production():
    from services.k8s.manifests import profile_config

    assert ServeConfig.default_cpu().ingress.playground is True
    assert ServeConfig.default_gpu().ingress.playground is False
    assert profile_config("cpu").ingress.playground is False
    assert profile_config("gpu").ingress.playground is False


# ------------------------------------------------------------------------------ served + browser


def _chromium() -> tuple[str, str]:
    """(browser binary, chromedriver) or a failure that says how to get them."""
    browser = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if p
                    and os.access(p, os.X_OK)), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser and driver:
        return browser, driver
    if os.environ.get("CI_NO_BROWSER"):
        pytest.skip("CI_NO_BROWSER is set and headless Chromium is not available")
    pytest.fail("headless Chromium, chromedriver or selenium is missing: run `make install-dev` (it installs "
                "Debian's chromium + chromium-driver and the dev extra), or set CI_NO_BROWSER=1 to skip")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary, driver_path = _chromium()  # before the server: no Chromium, no 3-minute start
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, css: str, timeout: float = 300):
    """The first element matching ``css``; an error the page shows meanwhile fails at once."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if found:
            return found[0]
        errors = driver.find_elements(By.CSS_SELECTOR, "#errors .error")
        if errors:
            pytest.fail(f"the page shows an error while waiting for {css}: {errors[0].text}")
        time.sleep(0.25)
    pytest.fail(f"nothing matched {css} within {timeout:.0f}s")


def _fill(driver, values: dict[str, str]) -> None:
    from selenium.webdriver.common.by import By

    for element_id, value in values.items():
        field = driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)


def _tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-tab="{name}"]').click()
    assert driver.find_element(By.CSS_SELECTOR, "body").get_attribute("data-tab") == name


def _run(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "run").click()


def _meta(item, field: str) -> str:
    from selenium.webdriver.common.by import By

    return item.find_element(By.CSS_SELECTOR, f'dd[data-field="{field}"]').text


def _timings(item) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    rows = item.find_elements(By.CSS_SELECTOR, "table.timings tr[data-stage]")
    return {row.get_attribute("data-stage"): row.find_element(By.TAG_NAME, "td").text for row in rows}


def _gallery_count(driver, kind: str) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, f'#gallery figure[data-kind="{kind}"]'))


@slow
def test_browser_drives_image_edit_video_ask_and_errors(browser, served, http, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    base = f"http://127.0.0.1:{served.ingress.http_port}"
    driver.get(f"{base}/")
    _wait(driver, 'body[data-ready="true"]', 30)

    # Auth is on: the page learns it from the API's 401 and asks for the key.
    key_row = driver.find_element(By.ID, "key-row")
    deadline = time.monotonic() + 30
    while not key_row.is_displayed() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert key_row.is_displayed() and "key" in driver.find_element(By.ID, "models").text.lower()
    _fill(driver, {"api-key": API_KEY})
    driver.find_element(By.ID, "key-save").click()
    _wait(driver, '#models[data-state="ok"]', 30)
    assert "mammoth2" in driver.find_element(By.ID, "models").text

    # Image: SSE progress with latent previews, then a gallery item with its metadata.
    _fill(driver, {"prompt": "a red bicycle", "size": "128x128", "steps": "3", "seed": "7", "guidance": "4"})
    _run(driver)
    item = _wait(driver, '#gallery figure[data-kind="image"]')
    img = item.find_element(By.CSS_SELECTOR, "img.media")
    src = img.get_attribute("src")
    assert src.startswith(("data:image/png;base64,", "blob:"))
    if src.startswith("data:"):
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (128, 128)
    assert driver.execute_script("return arguments[0].naturalWidth", img) == 128
    assert _meta(item, "seed") == "7" and _meta(item, "size") == "128x128" and _meta(item, "steps") == "3"
    timings = _timings(item)
    assert {"dit", "vae_decode", "total"} <= set(timings), timings
    assert all(re.fullmatch(r"\d+\.\d{3} s", t) for t in timings.values()), timings
    assert item.get_attribute("data-previews") == "3"  # one latent preview per denoise step, live

    # Edit: the gallery image becomes the edit source.
    item.find_element(By.CSS_SELECTOR, 'button[data-action="edit"]').click()
    assert driver.find_element(By.CSS_SELECTOR, "body").get_attribute("data-tab") == "edit"
    _fill(driver, {"prompt": "make it blue", "steps": "2", "seed": "8"})
    _run(driver)
    edited = _wait(driver, '#gallery figure[data-kind="edit"]')
    assert edited.find_element(By.CSS_SELECTOR, "img.media").get_attribute("src").startswith("data:image/")
    assert _meta(edited, "seed") == "8" and _meta(edited, "size") == "128x128"

    # Video: a job polled to completion, its content played from a blob.
    _tab(driver, "video")
    _fill(driver, {"prompt": "waves on a beach", "size": "64x64", "steps": "2", "seed": "5", "frames": "5"})
    _run(driver)
    clip = _wait(driver, '#gallery figure[data-kind="video"]')
    source = clip.find_element(By.CSS_SELECTOR, "video source")
    assert source.get_attribute("src").startswith("blob:") and source.get_attribute("type") == "video/mp4"
    assert _meta(clip, "seed") == "5" and _meta(clip, "frames") == "5" and _meta(clip, "size") == "64x64"
    assert {"dit", "total"} <= set(_timings(clip))

    # Video edit: the gallery video becomes the source.
    clip.find_element(By.CSS_SELECTOR, 'button[data-action="edit"]').click()
    _wait(driver, 'body[data-tab="video-edit"]', 10)
    assert "gallery video" in driver.find_element(By.ID, "video-source").text
    _fill(driver, {"prompt": "make it night", "steps": "2", "seed": "6"})
    _run(driver)
    night = _wait(driver, '#gallery figure[data-kind="video-edit"]')
    assert night.find_element(By.CSS_SELECTOR, "video source").get_attribute("src").startswith("blob:")
    assert _meta(night, "seed") == "6" and _meta(night, "frames") == "5"

    # Ask about the first image: the streamed answer lands in the gallery.
    driver.find_elements(By.CSS_SELECTOR, '#gallery figure[data-kind="image"] button[data-action="ask"]')[0].click()
    assert driver.find_element(By.CSS_SELECTOR, "body").get_attribute("data-tab") == "ask"
    _fill(driver, {"prompt": "What is in this picture?", "max-tokens": "8"})
    _run(driver)
    answer = _wait(driver, '#gallery figure[data-kind="answer"] blockquote.answer')
    assert answer.text.strip()

    # An error is shown as the API returns it (same message as a plain client gets).
    _tab(driver, "image")
    _fill(driver, {"prompt": "bad size", "size": "100x100", "steps": "2", "seed": "1"})
    expected = http.post("/v1/images/generations", json={"prompt": "bad size", "size": "100x100", "steps": 2,
                                                          "seed": 1, "guidance_scale": 4, "stream": True})
    assert expected.status_code == 422
    images_before = _gallery_count(driver, "image")
    _run(driver)
    error = _wait_error(driver)
    assert error.get_attribute("data-status") == "422"
    assert error.find_element(By.CSS_SELECTOR, ".message").text == expected.json()["error"]["message"]
    assert error.find_element(By.CSS_SELECTOR, ".type").text == expected.json()["error"]["type"]
    assert _gallery_count(driver, "image") == images_before

    # The screenshot shows a page, not a blank canvas.
    shot = tmp_path / "playground.png"
    assert driver.save_screenshot(str(shot))
    picture = Image.open(shot).convert("RGB")
    colours = picture.getcolors(maxcolors=1 << 20)
    assert picture.size[0] >= 800 and colours is not None and len(colours) > 200, "screenshot looks blank"
    assert max(count for count, _ in colours) < 0.9 * picture.size[0] * picture.size[1]
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, os.environ["PLAYGROUND_SCREENSHOT"])


def _wait_error(driver, timeout: float = 60):
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        errors = driver.find_elements(By.CSS_SELECTOR, "#errors .error")
        if errors:
            return errors[0]
        time.sleep(0.2)
    pytest.fail("the page showed no error")


# ------------------------------------------------------------------------ dashboard vs real export


def _metrics_text() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    assert nodes, "no live Ray node"
    texts = []
    for node in nodes:
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        texts.append(httpx.get(url, timeout=10).text)
    return "\n".join(texts)


def _series_names(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@slow
def test_dashboard_metrics_are_exported(served, http):
    from tests.k8s.dashboard import dashboard_metric_names

    image = http.post("/v1/images/generations", json={"prompt": "a kite", "size": "64x64", "steps": 2, "seed": 3})
    assert image.status_code == 200, image.text
    video = http.post("/v1/videos", json={"prompt": "rain", "size": "64x64", "steps": 2, "seed": 3, "frames": 5})
    assert video.status_code == 200, video.text
    deadline = time.monotonic() + 120
    while http.get(f"/v1/videos/{video.json()['id']}").json()["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert http.post("/v1/images/generations", json={"prompt": "x", "size": "100x100"}).status_code == 422

    wanted = dashboard_metric_names()
    missing = wanted
    deadline = time.monotonic() + 90  # Ray's agents push metrics every few seconds
    while missing and time.monotonic() < deadline:
        missing = wanted - _series_names(_metrics_text())
        if missing:
            time.sleep(3)
    exported = sorted(n for n in _series_names(_metrics_text()) if n.startswith(("ray_mammoth_", "ray_serve_")))
    assert not missing, f"series the dashboard reads that Ray does not export: {sorted(missing)}; exported: {exported}"
