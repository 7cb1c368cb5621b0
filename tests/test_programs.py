"""Application composers (education / ad / news): real espeak-ng voice, real PyAV files, text really drawn."""

from __future__ import annotations


import av
import httpx
import numpy as np
import pytest
import yaml

from t2v.errors import InputError
from t2v.production.programs import AUDIO_RATE, check_spec, compose_program, overlay_text, write_program

from conftest import needs_program
from test_cli import run
from test_serve_api import Server

needs_espeak = needs_program("espeak-ng")
FPS, SIZE = 8.0, (64, 64)


def clip_fn(prompt: str, seconds: float) -> np.ndarray:
    """A stand-in for generated clips with known content: a grey gradient (the composer's input)."""
    n = int(round(seconds * FPS))
    ramp = np.linspace(60, 160, SIZE[0], dtype=np.uint8)[None, None, :, None]
    return np.broadcast_to(ramp, (n, SIZE[1], SIZE[0], 3)).copy()


def streams(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(v))
        return frames, [s.type for s in c.streams], (c.duration or 0) / 1e6


EDU = {"title": "Why the sky is blue", "summary": "Light scatters.",
       "sections": [{"prompt": "a blue sky", "text": "Sunlight has every colour", "seconds": 2},
                    {"prompt": "a sunset", "text": "Red light travels further", "seconds": 1.5}]}


@needs_espeak
def test_education_program_has_voice_subtitles_and_cards(tmp_path):
    program = compose_program("education", EDU, clip_fn, fps=FPS, size=SIZE)
    assert len(program.frames) == 16 + 16 + 12 + 16  # title, two sections, summary
    assert len(program.audio) == pytest.approx(len(program.frames) / FPS * AUDIO_RATE, abs=AUDIO_RATE * 0.01)
    assert np.abs(program.audio).max() > 1000  # espeak-ng really spoke
    path = write_program(program, tmp_path / "lesson.mp4")
    frames, kinds, duration = streams(path)
    assert frames == len(program.frames) and sorted(kinds) == ["audio", "video"] and 7 < duration < 8.5
    vtt = path.with_suffix(".vtt").read_text()
    assert vtt.startswith("WEBVTT") and "00:00:02.000 --> 00:00:04.000\nSunlight has every colour" in vtt
    # The subtitle is burned into the section's frames: its bottom band differs from the plain clip there only.
    plain = clip_fn("", 2)
    section = program.frames[16:32]
    diff = np.abs(section.astype(int) - plain).sum(-1)
    assert diff[:, -10:].mean() > 20 and diff[:, :40].max() == 0
    assert (section[:, -10:] > 200).any()  # white letters on the dark band


def test_overlay_text_is_drawn_and_the_ticker_scrolls():
    frames = clip_fn("", 2)
    subtitled = overlay_text(frames, "HELLO")
    assert not np.array_equal(subtitled[:, -12:], frames[:, -12:])
    ticker = overlay_text(frames, "BREAKING NEWS TICKER", where="top", scroll=4.0)
    assert not np.array_equal(ticker[0, :12], ticker[5, :12])  # it moves


def test_ad_and_news_programs(tmp_path):
    from PIL import Image

    logo = tmp_path / "logo.png"
    Image.new("RGBA", (32, 32), (0, 255, 0, 255)).save(logo)
    ad = compose_program("ad", {"brand": "ACME", "call_to_action": "Buy now", "logo": str(logo),
                                "clips": [{"prompt": "a red ball", "seconds": 1}]}, clip_fn, fps=FPS, size=SIZE,
                         voice=False)
    assert (ad.frames[0, 2:8, 5:30] == [200, 30, 30]).all(axis=-1).any()  # the brand band at the top
    assert (ad.frames[0, 3:14, -14:-3] == [0, 255, 0]).all(axis=-1).sum() > 50  # the logo
    assert len(ad.frames) == 8 + 16 and ad.cues[-1][2] == "Buy now"  # clip + call-to-action card
    news = compose_program("news", {"headline": "Stars fall", "ticker": "markets up",
                                    "items": [{"prompt": "a star falling", "caption": "Live", "seconds": 1}]},
                           clip_fn, fps=FPS, size=SIZE, voice=False)
    assert len(news.frames) == 16 + 8 and [c[2] for c in news.cues] == ["Stars fall", "Live"]
    assert not np.array_equal(news.frames[17, :10], news.frames[20, :10])  # ticker scrolling


@pytest.mark.parametrize("kind, spec, field", [
    ("education", {"sections": [{"prompt": "x"}]}, "title"),
    ("ad", {"brand": "A", "call_to_action": "B", "clips": [{"prompt": "x"}], "colour": "red"}, "colour"),
    ("news", {"headline": "H", "ticker": "T", "items": []}, "items"),
    ("news", {"headline": "H", "ticker": "T", "items": [{"prompt": "x", "seconds": 60}]}, "item 0.seconds"),
    ("sermon", {}, "kind"),
])
def test_bad_specs_name_the_field(kind, spec, field):
    with pytest.raises(InputError) as e:
        check_spec(kind, spec)
    assert e.value.field == field


@needs_espeak
def test_compose_command_and_api(tmp_path, wan_dir, generator):
    spec = tmp_path / "lesson.yaml"
    spec.write_text(yaml.safe_dump(EDU))
    out = tmp_path / "lesson.mp4"
    r = run("compose", "education", spec, "-o", out, "--model", wan_dir, "--steps", 1)
    assert r.returncode == 0, r.stderr
    frames, kinds, _ = streams(out)
    assert sorted(kinds) == ["audio", "video"] and out.with_suffix(".vtt").exists()
    assert "voice-over" in r.stdout

    from t2v.serve.api import Settings, create_app

    srv = Server(create_app(generator, Settings(store=str(tmp_path / "s"))))
    try:
        job = httpx.post(srv.url + "/v1/programs", json={"kind": "news", "num_inference_steps": 1, "spec": {
            "headline": "Stars fall", "ticker": "markets up", "items": [{"prompt": "a star", "caption": "Live"}]}})
        assert job.status_code == 200, job.text
        v = srv.wait(job.json()["id"])
        assert v["status"] == "completed", v["error"]
        data = httpx.get(f"{srv.url}/v1/videos/{v['id']}/content").content
        (tmp_path / "news.mp4").write_bytes(data)
        assert sorted(streams(tmp_path / "news.mp4")[1]) == ["audio", "video"]
        bad = httpx.post(srv.url + "/v1/programs", json={"kind": "news", "spec": {"headline": "x"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "items"
    finally:
        srv.stop()
