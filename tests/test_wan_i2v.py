"""The wan-i2v family (Wan2.1's WanImageToVideoPipeline checkpoints, with an image branch) beyond its agreement
with diffusers (test_agreement.py): what it refuses, its saved layout, batching and windows, the CLI and the job
API."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from layouts import build_wan21_i2v, noise_image
from test_image_to_video import png

import t2v
from t2v.errors import BundleError, InputError
from t2v.long_video import LongVideoPipeline
from t2v.sampling import as_predictor, predict_batch, predict_guided

PROMPT = "a red ball bouncing on a black background"
SMALL = dict(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=4.0, seed=5)


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return build_wan21_i2v(tmp_path_factory.mktemp("Wan2.1-I2V-tiny"))


@pytest.fixture(scope="module")
def flf_dir(tmp_path_factory):
    return build_wan21_i2v(tmp_path_factory.mktemp("Wan2.1-FLF2V-tiny"), first_last=True)


@pytest.fixture(scope="module")
def i2v_pipe(i2v_dir):
    return t2v.TextToVideoPipeline.from_pretrained(i2v_dir)


def test_calls_the_model_cannot_start_from_are_refused_naming_the_field(i2v_pipe, flf_dir, wan_pipe):
    cases = [
        (i2v_pipe, dict(), "image", "image-to-video model"),
        (i2v_pipe, dict(image=noise_image(1), last_image=noise_image(2)), "last_image", "reads one image"),
        (i2v_pipe, dict(last_image=noise_image(2)), "last_image", "without a first frame"),
        (i2v_pipe, dict(image=noise_image(1, (64, 32))), "image", "aspect"),
        (t2v.TextToVideoPipeline.from_pretrained(flf_dir), dict(image=noise_image(1)), "last_image",
         "first-last-frame model"),
        (wan_pipe, dict(image=noise_image(1), last_image=noise_image(2)), "last_image", "no image branch"),
    ]
    for pipe, images, field, words in cases:
        with pytest.raises(InputError, match=words) as e:
            pipe(PROMPT, **SMALL, **images)
        assert e.value.field == field


def test_layouts_it_cannot_sample_are_refused_before_any_weight_is_read(i2v_dir, tmp_path):
    def variant(name, **index_changes):
        path = tmp_path / name
        shutil.copytree(i2v_dir, path)
        index = json.loads((path / "model_index.json").read_text())
        index.update(index_changes)
        (path / "model_index.json").write_text(json.dumps(index))
        return path

    with pytest.raises(BundleError, match="Wan2.2"):
        t2v.load(variant("ti2v", expand_timesteps=True))
    with pytest.raises(BundleError, match="Wan2.2"):
        t2v.load(variant("a14b", boundary_ratio=0.9))
    with pytest.raises(BundleError, match="no image_encoder"):
        t2v.load(variant("no-clip", image_encoder=[None, None]))


def test_a_loaded_bundle_saves_in_the_wanimagetovideopipeline_layout(i2v_pipe, tmp_path):
    import diffusers

    i2v_pipe.bundle.save(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["image_encoder"][1] == "CLIPVisionModel"
    theirs = diffusers.WanImageToVideoPipeline.from_pretrained(tmp_path / "saved")
    assert type(theirs.image_encoder).__name__ == "CLIPVisionModel"
    again = t2v.TextToVideoPipeline.from_pretrained(tmp_path / "saved")
    kw = dict(SMALL, image=noise_image(1), output_type="latent")
    assert torch.equal(again(PROMPT, **kw).frames, i2v_pipe(PROMPT, **kw).frames)


def test_steps_of_jobs_with_different_images_batch_to_what_each_predicts_alone(i2v_pipe):
    bundle = i2v_pipe.bundle
    first_steps = []

    def record(requests):  # each job's first-step request (x, t, context, guidance), then its own prediction
        first_steps.append(requests[0])
        return [predict_guided(bundle, *r) for r in requests]

    for seed in (1, 2):
        i2v_pipe(PROMPT, **dict(SMALL, num_inference_steps=1), image=noise_image(seed), predictor=as_predictor(record))
    a, b = first_steps
    assert a[0].shape[1] == 36 and not torch.equal(a[2], b[2])  # 16 + 4 + 16 channels; their own image tokens
    together = predict_batch(bundle, [a, b])
    for request, pred in zip((a, b), together):
        assert (pred - predict_guided(bundle, *request)).abs().max() < 1e-5


def test_a_long_video_is_conditioned_on_its_image_in_every_window(i2v_pipe):
    kw = dict(num_frames=25, window_frames=9, height=32, width=32, num_inference_steps=2, seed=3,
              output_type="latent")
    out = LongVideoPipeline(i2v_pipe)(PROMPT, image=noise_image(1), **kw)
    other = LongVideoPipeline(i2v_pipe)(PROMPT, image=noise_image(2), **kw)
    assert len(out.windows) > 1 and out.frames.shape[2] == 7
    # The image reaches the last window too (each window holds latent frame 0, the image's).
    assert (out.frames[:, :, -1] - other.frames[:, :, -1]).abs().max() > 1e-3


def test_the_cli_takes_a_first_and_a_last_frame(tmp_path, flf_dir):
    from t2v.production.prompting import optimize_parts
    from t2v.video import encode_video, read_video
    from test_cli import run

    first, last = tmp_path / "first.png", tmp_path / "last.png"
    noise_image(1).save(first)
    noise_image(2).save(last)
    # A GIF: unlike PyAV's H.264 path, its encoder gives the same file for the same frames every time (see
    # test_runtime.test_the_cli_takes_the_options), so the CLI's frames can be matched exactly.
    out = tmp_path / "v.gif"
    r = run("generate", PROMPT, "--model", flf_dir, "--image", first, "--last-image", last, "--frames", 9,
            "--width", 32, "--height", 32, "--steps", 2, "--seed", 5, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    got = read_video(out).astype(float)
    assert got.shape == (9, 32, 32, 3)
    # The video is the in-process pipeline's with these two images (through the same encoder), and not the
    # one with either image swapped for another: both frames condition it.
    pipe = t2v.TextToVideoPipeline.from_pretrained(flf_dir)
    prompt, negative, _ = optimize_parts(pipe.bundle, PROMPT, None)  # what the CLI does by default

    def video(image, last_image):
        frames = pipe(prompt, negative_prompt=negative or None, num_frames=9, height=32, width=32, num_inference_steps=2, seed=5, image=image,
                      last_image=last_image).frames[0]
        return read_video(encode_video(frames, pipe.bundle.config.fps, ".gif")).astype(float)

    assert np.array_equal(got, video(noise_image(1), noise_image(2)))
    assert np.abs(got - video(noise_image(3), noise_image(2))).max() > 5
    assert np.abs(got - video(noise_image(1), noise_image(3))).max() > 5
    bad = run("generate", PROMPT, "--model", flf_dir, "--image", first, "--frames", 9, "--width", 32,
              "--height", 32, "-o", out)
    assert bad.returncode != 0 and "last_image" in bad.stderr and "first-last-frame" in bad.stderr


def test_image_jobs_through_the_openai_client(tmp_path, flf_dir, generator):
    import httpx
    import openai

    from t2v.serve.api import Settings, create_app
    from t2v.serve.stages import LocalGenerator
    from t2v.video import read_video
    from test_serve_api import Server

    bundle = t2v.load(flf_dir)
    server = Server(create_app(LocalGenerator(bundle), Settings(store=str(tmp_path / "store"), poll_after_ms=50)))
    t2v_server = Server(create_app(generator, Settings(store=str(tmp_path / "store2"), poll_after_ms=50)))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        first, last = png(noise_image(1)), png(noise_image(2))
        extra = {"seed": 4, "num_inference_steps": 2,
                 "last_frame_reference": {"image_url": "data:image/png;base64," + base64.b64encode(last).decode()}}
        # 1. A first frame as a file part and a last frame as a data URL, in the same multipart form.
        video = c.videos.create_and_poll(prompt=PROMPT, size="32x32", seconds="0.5",
                                         input_reference=("first.png", first, "image/png"), extra_body=extra,
                                         poll_interval_ms=100)
        assert video.status == "completed", video.error
        params = video.model_extra["t2v"]["params"]
        assert len(params["image_sha256"]) == len(params["last_image_sha256"]) == 64
        served = read_video(c.videos.download_content(video.id).read())
        pipe = t2v.TextToVideoPipeline(bundle)
        alone = pipe(params["prompt"], negative_prompt=params["negative_prompt"], num_frames=params["num_frames"],
                     height=32, width=32, num_inference_steps=2, guidance_scale=params["guidance_scale"], seed=4,
                     image=noise_image(1), last_image=noise_image(2)).frames[0]
        # The same video: its thumbnail (the middle frame, a lossless PNG) is the in-process frame exactly, and the
        # mp4 has every frame (mp4 files are compared by their frames' shape only: libx264's output for the same
        # frames is not always the same file in a process that has decoded video, tests/test_video.py).
        thumbnail = c.videos.download_content(video.id, variant="thumbnail").read()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumbnail)).convert("RGB")), alone[len(alone) // 2])
        assert served.shape == alone.shape
        # 2. What the model cannot start from: a 400 naming the field, nothing queued.
        before = len(c.videos.list().data)
        with pytest.raises(openai.BadRequestError) as e:
            c.videos.create(prompt=PROMPT, size="32x32")
        error = e.value.response.json()["error"]
        assert error["param"] == "input_reference" and "image-to-video" in error["message"], error
        with pytest.raises(openai.BadRequestError) as e:
            c.videos.create(prompt=PROMPT, size="32x32", input_reference=("first.png", first, "image/png"))
        assert e.value.response.json()["error"]["param"] == "last_frame_reference"
        assert len(c.videos.list().data) == before
        # 3. A model without an image branch takes no last frame.
        r = httpx.post(t2v_server.url + "/v1/videos", json={"prompt": PROMPT, "size": "32x32", **extra})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "last_frame_reference", error
    finally:
        server.stop()
        t2v_server.stop()


def test_each_serve_stage_holds_only_the_weights_it_runs(flf_dir, i2v_pipe):
    """The Serve graph's stages load what they run (t2v.serve.deployments): the TextEncoder checks requests with
    the image encoder and transformer as shapes; a parallel layout's extra rank predicts with the transformer alone."""
    from t2v.bundle import is_shapes_only
    from t2v.serve.stages import validate

    encoder_stage = t2v.load(flf_dir, weights=("text_encoder",))
    assert is_shapes_only(encoder_stage.image_encoder) and is_shapes_only(encoder_stage.denoiser)
    request = {"prompt": PROMPT, "size": "32x32", "input_reference": png(noise_image(1))}
    with pytest.raises(InputError) as e:
        validate(encoder_stage, request)
    assert e.value.field == "last_frame_reference"
    params = validate(encoder_stage, {**request, "last_frame_reference": png(noise_image(2))})
    assert params["image"] and params["last_image"]

    rank = t2v.load(i2v_pipe.bundle.source, weights=("denoiser",))
    assert is_shapes_only(rank.image_encoder) and is_shapes_only(rank.vae)
    seen = []
    i2v_pipe(PROMPT, **dict(SMALL, num_inference_steps=1), image=noise_image(1),
             predictor=as_predictor(lambda rs: seen.extend(rs) or [predict_guided(i2v_pipe.bundle, *r) for r in rs]))
    assert torch.equal(predict_guided(rank, *seen[0]), predict_guided(i2v_pipe.bundle, *seen[0]))


@pytest.mark.slow
def test_image_jobs_through_the_serve_graph(tmp_path, i2v_dir):
    """`serve run` with a wan-i2v model and per-step batching: the TextEncoder replica (no image encoder weights)
    refuses a job without a first frame; two jobs with different images share forwards in the Denoiser and make
    the videos each makes alone."""
    import openai
    from test_serve_graph import serve_app

    from t2v.video import read_video

    with serve_app(tmp_path, i2v_dir, denoiser_replicas=1, step_batching={"max_batch_size": 4, "wait_s": 0.05},
                   settings={"concurrency": 2, "cache_ttl_s": 0}) as (serve, _):
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=2)
        with pytest.raises(openai.BadRequestError) as e:
            c.videos.create(prompt=PROMPT, size="32x32")
        assert e.value.response.json()["error"]["param"] == "input_reference"
        assert c.videos.list().data == []

        def create(seed):
            return c.videos.create(prompt=PROMPT, size="32x32", seconds="0.5",
                                   input_reference=(f"{seed}.png", png(noise_image(seed)), "image/png"),
                                   extra_body={"seed": 3, "num_inference_steps": 6, "optimize_prompt": False})

        def finish(job):
            done = c.videos.poll(job.id, poll_interval_ms=100)
            assert done.status == "completed", done.error
            return done, read_video(c.videos.download_content(job.id).read()).astype(float)

        alone = [finish(create(seed)) for seed in (1, 2)]
        together = [finish(j) for j in [create(seed) for seed in (1, 2)]]
        assert max(v.model_extra["t2v"]["timings"]["step_batch_max"] for v, _ in together) == 2
        for (_, video), (_, video_together) in zip(alone, together):
            assert np.abs(video - video_together).mean() < 0.5  # batched forwards: float noise, through x264
        assert np.abs(alone[0][1] - alone[1][1]).mean() > 2  # each its own image's video
