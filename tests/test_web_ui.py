"""The web UI in real headless Chromium (Debian's chromium, driven by Playwright): type a prompt, click
Generate, and wait until the page's video element plays the video the API returned."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import t2v
from t2v.serve.api import Settings, create_app
from t2v.serve.stages import LocalGenerator

from conftest import needs_program
from playwright import sync_api as playwright
from test_serve_api import Server

CHROMIUM = shutil.which("chromium")


@needs_program("chromium")
@pytest.mark.parametrize("auth", [False, True])
def test_generate_from_the_page_and_watch_it_play(wan_dir, tmp_path, auth):
    """Without keys, and with API keys on: the key is typed into the page (or comes in a link's #fragment),
    goes in the Authorization header of every request, video and thumbnails included, and in no URL."""
    key = "t2v-ui-key-0123456789abcdef"
    settings = Settings(store=str(tmp_path / "store"), api_keys={key: 0} if auth else {})
    srv = Server(create_app(LocalGenerator(t2v.load(wan_dir)), settings))
    sent = []  # (url, authorization header) of every request the page made
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page()
            page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
            page.goto(srv.url + "/" + (f"#key={key}" if auth else ""))
            page.wait_for_function("document.getElementById('size').options.length > 0")
            assert key not in page.url  # the fragment is taken off the address bar
            assert page.input_value("#size") == "32x32"  # the served model's default size
            page.fill("#prompt", "a red ball bouncing on a black background")
            page.fill("#steps", "2")
            page.fill("#seed", "4")
            first = tmp_path / "first.png"  # a first frame, sent as the form's input_reference file
            Image.fromarray(np.full((32, 32, 3), (200, 30, 30), np.uint8)).save(first)
            page.set_input_files("#first_frame", str(first))
            page.click("#generate")
            page.wait_for_function(
                "(() => { const v = document.getElementById('player');"
                " return v.dataset.videoId && v.readyState >= 2 && !v.paused && v.currentTime > 0; })()",
                timeout=60_000)
            assert page.eval_on_selector("#progress", "p => p.value") == 100
            video_id = page.eval_on_selector("#player", "v => v.dataset.videoId")
            job = page.request.get(f"{srv.url}/v1/videos/{video_id}",
                                   headers={"Authorization": f"Bearer {key}"} if auth else {}).json()
            assert job["status"] == "completed" and job["prompt"] == "a red ball bouncing on a black background"
            assert job["t2v"]["params"]["seed"] == 4 and job["t2v"]["params"]["num_inference_steps"] == 2
            assert len(job["t2v"]["params"]["image_sha256"]) == 64  # it started from the chosen image
            page.wait_for_function("document.querySelectorAll('#gallery img[src^=\"blob:\"]').length == 1")
            # A last frame goes as last_frame_reference; this model has no image branch, and the page shows the 400.
            page.set_input_files("#last_frame", str(first))
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.startsWith('last_frame_reference')")
            assert "no image branch" in page.text_content("#error")
            browser.close()
    finally:
        srv.stop()
    api_calls = [(url, header) for url, header in sent if "/v1/" in url]
    assert any(url.endswith(f"/v1/videos/{video_id}/content") for url, _ in api_calls)
    assert any("variant=thumbnail" in url for url, _ in api_calls)
    assert all(key not in url for url, _ in sent)
    if auth:
        assert all(header == f"Bearer {key}" for _, header in api_calls), api_calls
