"""The web UI in real headless Chromium (Debian's chromium, driven by Playwright): type a prompt, click
Generate, and wait until the page's video element plays the video the API returned."""

from __future__ import annotations

import shutil

import pytest

import t2v
from t2v.serve.api import Settings, create_app
from t2v.serve.stages import LocalGenerator

from conftest import needs_program
from playwright import sync_api as playwright
from test_serve_api import Server

CHROMIUM = shutil.which("chromium")


@needs_program("chromium")
def test_generate_from_the_page_and_watch_it_play(wan_dir, tmp_path):
    srv = Server(create_app(LocalGenerator(t2v.load(wan_dir)), Settings(store=str(tmp_path / "store"))))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('size').options.length > 0")
            assert page.input_value("#size") == "32x32"  # the served model's default size
            page.fill("#prompt", "a red ball bouncing on a black background")
            page.fill("#steps", "2")
            page.fill("#seed", "4")
            page.click("#generate")
            page.wait_for_function(
                "(() => { const v = document.getElementById('player');"
                " return v.currentSrc.includes('/v1/videos/') && v.readyState >= 2 && !v.paused"
                " && v.currentTime > 0; })()", timeout=60_000)
            src = page.eval_on_selector("#player", "v => v.currentSrc")
            assert page.eval_on_selector("#progress", "p => p.value") == 100
            video_id = src.split("/v1/videos/")[1].split("/")[0]
            job = page.request.get(f"{srv.url}/v1/videos/{video_id}").json()
            assert job["status"] == "completed" and job["prompt"] == "a red ball bouncing on a black background"
            assert job["t2v"]["params"]["seed"] == 4 and job["t2v"]["params"]["num_inference_steps"] == 2
            page.wait_for_function("document.querySelectorAll('#gallery img').length == 1")
            browser.close()
    finally:
        srv.stop()
