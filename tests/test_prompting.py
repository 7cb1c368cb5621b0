"""Prompt analysis (rules + MiniLM zero-shot) and the prompt optimizer."""

from __future__ import annotations

import httpx
import pytest

from t2v.errors import InputError
from t2v.production.prompting import analyze_text, fill_template, optimize_prompt, world_caption
from t2v.world.parse import parse_prompt

from conftest import fresh_python
from test_serve_api import Server

CASES = [  # prompt, entities, actions, setting, time of day, style, emotion, motion intensity
    ("a happy dog running on the beach at sunset, anime style", ["dog"], ["running"], "outdoor", "evening",
     "anime", "happy", "high"),
    ("a calm empty kitchen in the morning", [], [], "indoor", "morning", None, "calm", "low"),
    ("two cars chasing each other through the city at night, cinematic", ["car"], ["chasing"], "outdoor", "night",
     "cinematic", None, "high"),
    ("a small red ball bouncing slowly on a black background", ["red circle"], ["bounce"], "unknown",
     "unspecified", None, None, "low"),
    ("a sad lonely man sitting in a dark room", ["man"], ["sitting"], "indoor", "unspecified", None, "sad", "low"),
    ("a watercolor painting of flowers in a garden", ["flower"], [], "outdoor", "unspecified", "watercolor", None,
     "low"),
]


@pytest.mark.parametrize("prompt, entities, actions, setting, time, style, emotion, intensity", CASES)
def test_text_analysis_table(prompt, entities, actions, setting, time, style, emotion, intensity):
    a = analyze_text(prompt)
    assert a.entities == entities and a.actions == actions
    assert a.scene == {"setting": setting, "time_of_day": time}
    if style:
        assert a.style == style
    if emotion:
        assert a.emotion == emotion
    assert a.motion_intensity == intensity


def test_world_prompts_are_rewritten_into_training_phrasing():
    prompt = "a huge scarlet disc swelling rapidly above a tiny cobalt block twirling in pitch darkness"
    opt = optimize_prompt(prompt, world_model=True)
    assert opt.prompt == ("a large red circle growing quickly above a small blue square spinning "
                          "on a black background")
    assert parse_prompt(opt.prompt) == parse_prompt(prompt)  # same meaning, training words
    assert opt.negative_prompt == "" and "quality" not in opt.prompt  # nothing the model cannot read
    assert world_caption(parse_prompt("a red ball")) == "a red circle"


def test_optimizing_for_the_world_model_loads_no_text_encoder():
    """Style and emotion are read by MiniLM embeddings, which a world model's rewrite has no use for: it costs no
    encoder load (a tenth of a `t2v generate` at the embedded model's size)."""
    code = ("import sys\n"
            "from t2v.production.prompting import _encoder, optimize_prompt\n"
            "opt = optimize_prompt('a crimson sphere hopping over a dark backdrop', world_model=True)\n"
            "assert opt.prompt == 'a red circle bouncing on a black background', opt.prompt\n"
            "assert _encoder.cache_info().misses == 0 and 'transformers' not in sys.modules\n"
            "open_model = optimize_prompt('a watercolor painting of a sad clown', world_model=False)\n"
            "assert _encoder.cache_info().misses == 1 and open_model.analysis.emotion == 'sad'\n")
    run = fresh_python(code)
    assert run.returncode == 0, run.stderr


def test_open_models_get_tags_a_negative_prompt_and_parameters():
    opt = optimize_prompt("a dog running on the beach", world_model=False)
    assert opt.prompt.startswith("a dog running on the beach, ") and "high quality" in opt.prompt
    assert "fluid fast motion" in opt.prompt and "blurry" in opt.negative_prompt
    assert opt.parameters["num_inference_steps"] == 30 and opt.parameters["fps"] == 12
    calm = optimize_prompt("a quiet lake at dawn, still water", world_model=False)
    assert "steady camera" in calm.prompt and "shaky camera" in calm.negative_prompt


def test_templates():
    assert fill_template("product", product="a red bottle", place="on a table", style="minimal").startswith(
        "a red bottle rotating slowly on a table")
    with pytest.raises(InputError, match="needs"):
        fill_template("dialogue", speaker="a teacher")
    with pytest.raises(InputError, match="template"):
        fill_template("opera")


def test_api_optimizes_by_default_with_an_opt_out(generator, tmp_path):
    from t2v.serve.api import Settings, create_app

    srv = Server(create_app(generator, Settings(store=str(tmp_path / "s"))))
    try:
        body = {"prompt": "a dog", "size": "32x32", "num_inference_steps": 1}
        job = httpx.post(srv.url + "/v1/videos", json=body).json()
        params = job["t2v"]["params"]
        assert job["prompt"] == "a dog" and params["original_prompt"] == "a dog"
        assert params["prompt"].startswith("a dog, ") and params["negative_prompt"] and params["prompt_changes"]
        raw = httpx.post(srv.url + "/v1/videos", json={**body, "optimize_prompt": False}).json()
        assert raw["t2v"]["params"]["prompt"] == "a dog" and raw["t2v"]["params"]["prompt_changes"] == []
    finally:
        srv.stop()
