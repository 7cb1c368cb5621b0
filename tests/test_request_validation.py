"""Request bodies are checked against their route's model (t2v.serve.requests) and the served model's limits
before anything is planned or queued: one regression test per defect an attacker's tests found, and a
property-based fuzz of every body route (no 5xx, the error names a param, nothing queued, memory bounded)."""

from __future__ import annotations

import json
import math
import re
import time
import tracemalloc

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from t2v.errors import InputError
from t2v.families import WAN
from t2v.long_video import limits
from t2v.params import MAX_FPS, MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS
from t2v.production.planner import plan_video
from t2v.production.postprocess import MAX_SMOOTH
from t2v.production.programs import CLIP_SECONDS, KINDS, MAX_CLIPS, MAX_TEXT_CHARS, SPEC_KEYS
from t2v.serve.api import Settings, create_app
from t2v.serve.requests import CLI_ONLY_SPEC_KEYS, MAX_NAME_CHARS, MAX_SECONDS, SPECS
from t2v.serve.stages import validate
from t2v.serve.store import MAX_PRIORITY

from test_serve_api import Server

MEMORY_BOUND = 32 * 2**20  # per request, Python allocations (tracemalloc): the 1e9-seconds plan took 17 GB
BASE_VIDEO = {"prompt": "a red ball", "size": "32x32", "num_inference_steps": 1}
BASE_PROGRAM = {"kind": "news", "num_inference_steps": 1,
                "spec": {"headline": "H", "ticker": "T", "items": [{"prompt": "a star", "caption": "Live"}]}}


@pytest.fixture(scope="module")
def api(generator, tmp_path_factory):
    app = create_app(generator, Settings(store=str(tmp_path_factory.mktemp("requests") / "store")))
    srv = Server(app)
    srv.service = app.state.service
    yield srv
    srv.stop()


def post(api, path: str, body, form: bool = False) -> httpx.Response:
    if form:
        return httpx.post(api.url + path, data=body)
    # Our own encoding: NaN and lone surrogates go through as JSON writes them (httpx's json= refuses both).
    return httpx.post(api.url + path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def assert_rejected(api, r: httpx.Response, params, statuses=(400,)) -> None:
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] in params, (error, params)
    service = api.service
    assert len(service.queue) == 0 and not service.running and service.store.all() == []  # nothing queued


# --- one regression test per defect -----------------------------------------------------------------------

def test_a_billion_seconds_is_refused_at_once_and_nothing_is_queued(api):
    t0 = time.perf_counter()
    r = post(api, "/v1/videos", {"prompt": "a red ball", "seconds": 1e9})
    assert time.perf_counter() - t0 < 5  # it used to plan 3e8 shots (17 GB) before any length check
    assert_rejected(api, r, {"seconds"})
    assert str(int(MAX_SECONDS)) in r.json()["error"]["message"]


def test_the_generator_checks_the_length_before_planning(generator):
    """Behind the edge too (the TextEncoder replica runs this): the request's bounds, then the model's limit,
    both before the planner."""
    lim = limits(generator.bundle)
    tracemalloc.start()
    try:
        for seconds, says in ((1e9, str(int(MAX_SECONDS))), (1e300, str(int(MAX_SECONDS))),
                              (MAX_SECONDS, f"at most {lim.max_frames} frames")):
            with pytest.raises(InputError) as e:
                validate(generator.bundle, {"prompt": "a red ball", "seconds": seconds})
            assert e.value.field == "seconds" and says in str(e.value)
        assert tracemalloc.get_traced_memory()[1] < MEMORY_BOUND
    finally:
        tracemalloc.stop()


def test_the_planner_stays_inside_the_models_shots():
    t0 = time.perf_counter()
    assert len(plan_video("a ball", 10**9, 8.0, max_shots=32).shots) == 32
    assert time.perf_counter() - t0 < 1
    with pytest.raises(InputError, match="at most 3"):
        plan_video("a, then b, then c, then d", 100, 8.0, max_shots=3)


@pytest.mark.parametrize("body, param, says", [
    ({"prompt": "x", "smooth": 1_000_000_001}, "smooth", str(MAX_SMOOTH)),  # was a MemoryError in the job
    ({"prompt": "x", "smooth": 4}, "smooth", "odd"),
    ({"prompt": "x", "sampler": ["x"]}, "sampler", "string"),  # these three were plain-text 500s
    ({"prompt": "x", "negative_prompt": [1]}, "negative_prompt", "string"),
    ({"prompt": "x", "seconds": "inf"}, "seconds", "number"),
    ({"prompt": "x", "seconds": float("nan")}, "seconds", "finite"),
    ({"prompt": "x" * 60_000}, "prompt", str(MAX_PROMPT_CHARS)),  # was accepted, shortened and stored
    ({"prompt": "x", "fps": 0}, "fps", "greater than 0"),  # was reported against keyframe_fps
    ({"prompt": "x", "seconds": 100}, "seconds", "frames"),  # within MAX_SECONDS, beyond the tiny model
    ({"prompt": "\ud800"}, "prompt", "string"),
    ({"prompt": ", then .", "optimize_prompt": "false"}, "prompt", "empty"),  # found by the fuzz: an IndexError
])
def test_bad_fields_are_400s_naming_the_field_and_the_limit(api, body, param, says):
    r = post(api, "/v1/videos", body)
    assert_rejected(api, r, {param})
    assert says in r.json()["error"]["message"]


def test_form_values_are_numbers_only_when_they_are_decimal_text(api):
    assert_rejected(api, post(api, "/v1/videos", {"prompt": "x", "seconds": "1e999"}, form=True), {"seconds"})
    assert_rejected(api, post(api, "/v1/videos", {"prompt": "x", "seed": "0x10"}, form=True), {"seed"})
    assert_rejected(api, post(api, "/v1/videos", {"prompt": "x", "color_match": "maybe"}, form=True),
                    {"color_match"})


def test_programme_specs_are_bounded(api):
    def spec(**changes):
        return {**BASE_PROGRAM, "spec": {**BASE_PROGRAM["spec"], **changes}}

    for body, param in [(spec(items=[{"prompt": "a star"}] * (MAX_CLIPS + 1)), "items"),
                        (spec(items=[{"prompt": "a star", "seconds": 60}]), "items[0].seconds"),
                        (spec(items=[{"prompt": "a star", "caption": "x" * (MAX_TEXT_CHARS + 1)}]), "items[0].caption"),
                        (spec(headline=["H"]), "headline"),
                        (spec(colour="red"), "colour"),
                        ({**BASE_PROGRAM, "seed": -1}, "seed")]:
        assert_rejected(api, post(api, "/v1/programs", body), {param})


def test_deep_nesting_and_bad_query_parameters_are_400s_not_500s_or_422s(api):
    deep = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # 40 kB: inside the body limit
    assert_rejected(api, httpx.post(api.url + "/v1/videos", content=deep,
                                    headers={"content-type": "application/json"}), {"body"})
    r = httpx.get(api.url + "/v1/videos", params={"limit": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_the_spec_models_are_the_programmes_specs():
    assert set(SPECS) == set(KINDS)
    for kind in KINDS:
        assert set(SPECS[kind].model_fields) == set(SPEC_KEYS[kind]) - CLI_ONLY_SPEC_KEYS.get(kind, set())


def test_an_ad_logo_path_is_refused_over_the_api(api):
    """The server would open that path: any image on its disk could be composited into a video."""
    ad = {"kind": "ad", "num_inference_steps": 1,
          "spec": {"brand": "ACME", "call_to_action": "Buy", "clips": [{"prompt": "a star"}],
                   "logo": "/tmp/store/content/video_0123.png"}}
    assert_rejected(api, post(api, "/v1/programs", ad), {"logo"})


# --- the fuzz ------------------------------------------------------------------------------------------------

WHITESPACE = " \t\n\r\u00a0\u2003\u3000"
ODD = st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S", "Zs", "Cc", "Cf"))  # marks, RTL, ZWJ, NUL


def nested(depth_max: int = 400):
    return st.builds(lambda d, leaf: json.loads("[" * d + json.dumps(leaf) + "]" * d),
                     st.integers(1, depth_max), st.one_of(st.integers(), st.text(max_size=5)))


WRONG = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
                  nested())
NOT_DECIMAL = st.one_of(st.sampled_from(["inf", "-inf", "nan", "Infinity", "1e999", "-1e999", "0x10", "1_000",
                                         "١٢", "1,5", "ten", " ", "1e", "--1", "[1]", "true", "9" * 5000]),
                        st.text(ODD, min_size=1, max_size=8).filter(lambda s: not any(c in "0123456789" for c in s)))


def bad_number(lo, hi, *, open_lo=False, integral=False, model_bad=()):
    """Values a numeric field must refuse (and, for a form, their text): below, above, not whole, not finite,
    not a number; model_bad: in the field's range but not the tiny model's."""
    gap = st.floats(min_value=1e-6, max_value=1e300)
    numbers = [gap.map(lambda d: lo - d), gap.map(lambda d: hi + d), st.integers(max_value=math.ceil(lo) - 1),
               st.integers(min_value=math.floor(hi) + 1, max_value=10**400)]
    if open_lo:
        numbers.append(st.sampled_from([lo, -0.0 * lo]))
    if integral:
        numbers.append(st.integers(-10**6, 10**6).map(lambda i: i + 0.5))
    if model_bad:
        numbers.append(st.sampled_from(model_bad))
    numbers = st.one_of(*numbers)
    json_only = st.one_of(st.booleans(), st.sampled_from([float("nan"), float("inf"), float("-inf")]), WRONG)
    return {"json": st.one_of(numbers, json_only, NOT_DECIMAL), "form": st.one_of(numbers.map(str), NOT_DECIMAL)}


def bad_text(max_len, *, required=False, allowed=None):
    """Values a text field must refuse: wrong types, too long (odd unicode), lone surrogates; blank if required;
    not one of `allowed`."""
    too_long = st.builds(lambda s, n: (s * n)[:n], st.text(ODD, min_size=1, max_size=12),
                         st.sampled_from([max_len + 1, max_len + 37, 10_000, 60_000]))
    texts = [too_long]
    if required:
        texts.append(st.text(st.sampled_from(WHITESPACE), min_size=1, max_size=10))
    if allowed is not None:
        texts.append(st.text(ODD, min_size=1, max_size=12).filter(lambda s: s not in allowed))
    text = st.one_of(*texts)
    surrogate = st.builds(lambda a, b: a + "\ud800" + b, st.text(max_size=5), st.text(max_size=5))
    return {"json": st.one_of(text, surrogate, st.integers(), st.floats(), st.booleans(), WRONG), "form": text}


def bad_size():
    shape = re.compile(r"\s*\d+\s*[xX]\s*\d+\s*", re.ASCII)
    texts = st.one_of(st.text(ODD, min_size=1, max_size=12).filter(lambda s: not shape.fullmatch(s)),
                      st.sampled_from(["33x32", "32x8", "0x0", "99999x32", "2048x32", "123456x1", "32x32x32"]))
    return {"json": st.one_of(texts, st.integers(), st.floats(), WRONG), "form": texts}


def bad_flag():
    words = st.text(ODD, min_size=1, max_size=6).filter(lambda s: s.strip().lower() not in
                                            ("1", "true", "yes", "on", "0", "false", "no", "off"))
    return {"json": st.one_of(words, st.integers(min_value=2), st.integers(max_value=-1), st.floats(), WRONG),
            "form": words}


# field -> its bad values (JSON and form) and the params an error about it may name
VIDEO_BAD = {
    "prompt": (bad_text(MAX_PROMPT_CHARS, required=True), {"prompt"}),
    "negative_prompt": (bad_text(MAX_PROMPT_CHARS), {"negative_prompt"}),
    "seconds": (bad_number(0, MAX_SECONDS, open_lo=True, model_bad=(17, 100, MAX_SECONDS)), {"seconds"}),
    "size": (bad_size(), {"size", "width", "height"}),
    "fps": (bad_number(0, MAX_FPS, open_lo=True), {"fps"}),
    "seed": (bad_number(0, MAX_SEED, integral=True), {"seed"}),
    "num_inference_steps": (bad_number(1, MAX_STEPS, integral=True), {"num_inference_steps"}),
    "guidance_scale": (bad_number(0, MAX_GUIDANCE), {"guidance_scale"}),
    "sampler": (bad_text(MAX_NAME_CHARS, allowed=set(WAN.samplers)), {"sampler"}),
    "priority": (bad_number(0, MAX_PRIORITY, integral=True), {"priority"}),
    "model": (bad_text(MAX_NAME_CHARS, allowed={"t2v-default"}), {"model"}),
    "optimize_prompt": (bad_flag(), {"optimize_prompt"}),
    "keyframe_fps": (bad_number(0, MAX_FPS, open_lo=True, model_bad=(3, 5, 16, 100)), {"keyframe_fps"}),
    "interpolate": (bad_text(10, allowed={"linear", "flow"}), {"interpolate"}),
    "motion_blur": (bad_number(0, 1), {"motion_blur"}),
    "smooth": (bad_number(1, MAX_SMOOTH, integral=True, model_bad=(2, 4, 30)), {"smooth"}),
    "color_match": (bad_flag(), {"color_match"}),
}
UNKNOWN = st.dictionaries(st.text(ODD, min_size=1, max_size=8).filter(lambda k: k not in VIDEO_BAD),
                          st.one_of(st.none(), st.integers(), st.text(ODD, max_size=20), WRONG), max_size=2)
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def within_memory(send):
    """send()'s response, asserting its Python allocations (server thread included) peak under MEMORY_BOUND."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    r = send()
    assert tracemalloc.get_traced_memory()[1] - before < MEMORY_BOUND
    return r


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


@FUZZ
@given(data=st.data(), form=st.booleans())
def test_fuzz_create_video(api, traced, data, form):
    names = data.draw(st.lists(st.sampled_from(sorted(VIDEO_BAD)), min_size=1, max_size=3, unique=True))
    body = dict(BASE_VIDEO)
    params = set()
    for name in names:
        bad, named = VIDEO_BAD[name]
        body[name] = data.draw(bad["form" if form else "json"], label=name)
        params |= named
    if "prompt" not in names and data.draw(st.booleans(), label="odd prompt"):
        # Valid odd text reaches the optimizer and tokenizer when the bad field is the model's to refuse.
        words = st.one_of(st.builds(str.__add__, st.characters(categories=("L",)), st.text(ODD, max_size=200)),
                          st.sampled_from(["then", ", then .", "a then b"]))
        body["prompt"] = data.draw(words, label="prompt")
        params.add("prompt")  # it may be too many tokens for the tiny model
    if "optimize_prompt" not in names:  # the prompt as written reaches the planner
        body["optimize_prompt"] = data.draw(st.sampled_from([True, False, "false"]), label="optimize_prompt")
    if not form:
        body.update(data.draw(UNKNOWN, label="unknown fields"))  # ignored, whatever they hold
    if form:
        body = {k: str(v) for k, v in body.items()}
    r = within_memory(lambda: post(api, "/v1/videos", body, form=form))
    assert_rejected(api, r, params | {"body"}, (400, 413))  # 413 "body": odd text escaped past the size limit


def spec_with(key, value):
    return {**BASE_PROGRAM, "spec": {**BASE_PROGRAM["spec"], key: value}}


def item_with(key, value):
    return spec_with("items", [{**BASE_PROGRAM["spec"]["items"][0], key: value}])


PROGRAM_BAD = {  # name -> (strategy of whole bad bodies, params its error may name)
    "kind": (bad_text(10, allowed=set(KINDS))["json"].map(lambda v: {**BASE_PROGRAM, "kind": v}), {"kind"}),
    "spec": (st.one_of(st.text(max_size=5), st.integers(), WRONG.filter(lambda v: not isinstance(v, dict))).map(
        lambda v: {**BASE_PROGRAM, "spec": v}), {"spec"}),
    "headline": (bad_text(MAX_TEXT_CHARS)["json"].map(lambda v: spec_with("headline", v)), {"headline"}),
    "missing": (st.sampled_from(["headline", "items", "ticker"]).map(
        lambda k: {**BASE_PROGRAM, "spec": {x: v for x, v in BASE_PROGRAM["spec"].items() if x != k}}),
        {"headline", "items", "ticker"}),
    "unknown": (st.text(ODD, min_size=1, max_size=8).filter(lambda k: k not in SPEC_KEYS["news"]).map(
        lambda k: spec_with(k, 1)), None),  # the unknown key itself
    "items": (st.one_of(st.just([]), st.just([{"prompt": "a"}] * (MAX_CLIPS + 1)), st.lists(WRONG, min_size=1, max_size=2),
                        st.text(max_size=3)).map(lambda v: spec_with("items", v)), {"items", "items[0]", "items[0].prompt"}),
    "item_prompt": (bad_text(MAX_PROMPT_CHARS, required=True)["json"].map(lambda v: item_with("prompt", v)),
                    {"items[0].prompt"}),
    "item_seconds": (bad_number(*CLIP_SECONDS)["json"].map(lambda v: item_with("seconds", v)), {"items[0].seconds"}),
    "item_caption": (bad_text(MAX_TEXT_CHARS)["json"].map(lambda v: item_with("caption", v)), {"items[0].caption"}),
    "seed": (bad_number(0, MAX_SEED, integral=True)["json"].map(lambda v: {**BASE_PROGRAM, "seed": v}), {"seed"}),
    "guidance_scale": (bad_number(0, MAX_GUIDANCE)["json"].map(lambda v: {**BASE_PROGRAM, "guidance_scale": v}),
                       {"guidance_scale"}),
    "priority": (bad_number(0, MAX_PRIORITY, integral=True)["json"].map(lambda v: {**BASE_PROGRAM, "priority": v}),
                 {"priority"}),
}


@FUZZ
@given(data=st.data())
def test_fuzz_create_program(api, traced, data):
    name = data.draw(st.sampled_from(sorted(PROGRAM_BAD)), label="bad field")
    strategy, params = PROGRAM_BAD[name]
    body = data.draw(strategy, label="body")
    if params is None:
        params = set(body["spec"]) - set(SPEC_KEYS["news"])
    r = within_memory(lambda: post(api, "/v1/programs", body))
    assert_rejected(api, r, params | {"body"}, (400, 413))
