"""Image-to-video for models without an image branch (the embedded default, Wan T2V, ModelScope): the image's
latents replace latent frame 0 at every step, noised to the step's level, and the rest is denoised around it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import t2v
from t2v.errors import InputError
from t2v.images import MAX_BYTES, MAX_PIXELS, check_aspect, read_image
from t2v.long_video import LongVideoPipeline
from t2v.sampling import noised, scheduler_for

PROMPT = "a red ball bouncing on a black background"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def picture(size=(32, 32), seed=0) -> np.ndarray:
    """A red disc on black: something a VAE keeps."""
    h, w = size[1], size[0]
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.uint8)
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2] = (220, 40, 30)
    return img


def psnr(a, b) -> float:
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).mean()
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def test_noised_is_the_schedulers_forward_process_at_the_current_step(wan_pipe):
    bundle = wan_pipe.bundle
    scheduler = scheduler_for(bundle, None, 10)
    x0, noise = torch.randn(1, 4, 1, 2, 2), torch.randn(1, 4, 1, 2, 2)
    latents = noise.clone()
    for i, t in enumerate(scheduler.timesteps[:4]):
        sigma = scheduler.sigmas[i]
        assert torch.allclose(noised(scheduler, x0, noise, t), (1 - sigma) * x0 + sigma * noise, atol=1e-6)
        latents = scheduler.step(torch.zeros_like(latents), t, latents, return_dict=False)[0]


@pytest.mark.parametrize("pipe_name", ["wan_pipe", "unet3d_pipe", "latte_pipe"])
def test_the_video_starts_from_the_image_and_moves_on_from_it(request, pipe_name):
    pipe = request.getfixturevalue(pipe_name)
    img = picture()
    kw = dict(seed=3, num_inference_steps=4, output_type="latent")
    latents = pipe(PROMPT, image=img, **kw).frames
    image_latents = pipe.encode_image(img, 32, 32)
    assert torch.equal(latents[:, :, :1], image_latents.to(latents.dtype))  # frame 0 is the image's, exactly
    alone = pipe(PROMPT, **kw).frames
    assert not torch.allclose(latents[:, :, 1:], alone[:, :, 1:], atol=1e-3)  # the rest followed from it
    frames = pipe.decode_latents(latents)[0]
    ceiling = pipe.decode_latents(image_latents)[0, 0]  # the VAE's own round trip of the image
    assert abs(psnr(frames[0], img) - psnr(ceiling, img)) < 0.5  # (a random tiny VAE's ceiling is low)


def test_a_long_video_starts_from_the_image_across_its_windows(wan_pipe):
    img = picture()
    out = LongVideoPipeline(wan_pipe)(PROMPT, num_frames=25, image=img, seed=2, num_inference_steps=3,
                                      output_type="latent")
    assert len(out.windows) > 1
    assert torch.equal(out.frames[:, :, :1], wan_pipe.encode_image(img, 32, 32).to(out.frames.dtype))


def test_bad_images_are_refused_naming_the_field_and_the_limit(wan_pipe):
    assert read_image(png(Image.fromarray(picture()))).size == (32, 32)
    cases = [
        (b"GIF89a not really", "not an image"),
        (b"\0" * (MAX_BYTES + 1), f"at most {MAX_BYTES} bytes"),
        (png(Image.new("1", (20000, 20000))), f"at most {MAX_PIXELS} pixels"),  # 20 kB that decodes to 400 MP
        (png(Image.new("1", (5000, 5000))), f"at most {MAX_PIXELS} pixels"),  # under PIL's limit, over ours
        (png(Image.fromarray(picture()))[:60], "does not decode"),  # a truncated file
    ]
    for data, words in cases:
        with pytest.raises(InputError, match=words) as e:
            read_image(data, field="input_reference")
        assert e.value.field == "input_reference"
    check_aspect((64, 36), 128, 72)  # 16:9 for 16:9
    with pytest.raises(InputError, match="aspect") as e:
        wan_pipe(PROMPT, image=picture((64, 32)), num_inference_steps=1)
    assert e.value.field == "image" and "within 2%" in str(e.value)


def test_the_cli_takes_an_image(tmp_path, wan_dir):
    from t2v.video import read_video
    from test_cli import run

    path = tmp_path / "first.png"
    Image.fromarray(picture()).save(path)
    out = tmp_path / "v.mp4"
    r = run("generate", PROMPT, "--model", wan_dir, "--image", path, "--steps", 3, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    frames = read_video(out)
    pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)
    ceiling = pipe.decode_latents(pipe.encode_image(picture(), 32, 32))[0, 0]
    assert psnr(frames[0], img := picture()) > psnr(ceiling, img) - 1.0  # x264 costs a little
    bad = run("generate", PROMPT, "--model", wan_dir, "--image", tmp_path / "missing.png", "-o", out)
    assert bad.returncode != 0 and "image: no such file" in bad.stderr


# --- through the job API (the official openai client) --------------------------------------------------------

def test_input_reference_through_the_openai_client(tmp_path, generator):
    import base64

    import httpx
    import openai

    from t2v.serve.api import Settings, create_app
    from t2v.video import read_video
    from test_serve_api import Server

    server = Server(create_app(generator, Settings(store=str(tmp_path / "store"), poll_after_ms=50)))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        img, body = picture(), png(Image.fromarray(picture()))
        extra = {"seed": 4, "num_inference_steps": 3}
        # 1. A file part, as the client sends a file; numbers in the same form, as text.
        video = c.videos.create_and_poll(prompt=PROMPT, size="32x32", input_reference=("first.png", body, "image/png"),
                                         extra_body=extra, poll_interval_ms=100)
        assert video.status == "completed", video.error
        params = video.model_extra["t2v"]["params"]
        assert "image" not in params and len(params["image_sha256"]) == 64  # the record shows a digest
        served = read_video(c.videos.download_content(video.id).read())[0].astype(float)
        pipe = t2v.TextToVideoPipeline(generator.bundle)
        ceiling = pipe.decode_latents(pipe.encode_image(img, 32, 32))[0, 0].astype(float)
        assert np.abs(served - ceiling).mean() < 4.0  # the VAE's image, up to x264
        # 2. OpenAI's reference object with a data URL, in JSON (this client sends only files): the same
        #    request, so the result cache answers with the same video.
        url = "data:image/png;base64," + base64.b64encode(body).decode()
        r = httpx.post(server.url + "/v1/videos", json={"prompt": PROMPT, "size": "32x32", **extra,
                                                        "input_reference": {"image_url": url}})
        assert r.status_code == 200 and r.json()["t2v"]["cached_from"] == video.id
        # 3. Bad references: a 400 naming the field, nothing queued.
        before = len(c.videos.list().data)
        wide = png(Image.fromarray(picture((64, 32))))
        for ref, words in ((("x.png", b"not an image", "image/png"), "not an image"),
                           (("wide.png", wide, "image/png"), "aspect")):
            with pytest.raises(openai.BadRequestError) as e:
                c.videos.create(prompt=PROMPT, size="32x32", input_reference=ref)
            error = e.value.response.json()["error"]
            assert error["param"] == "input_reference" and words in error["message"], error
        for ref, words in (({"image_url": "https://example.com/x.png"}, "fetches no URLs"),
                           ({"file_id": "file_123"}, "no Files API"), ({"image_url": "data:image/png;base64,@@"},
                                                                       "not valid base64")):
            r = httpx.post(server.url + "/v1/videos", json={"prompt": PROMPT, "size": "32x32", "input_reference": ref})
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "input_reference" and words in error["message"], error
        assert len(c.videos.list().data) == before
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()
