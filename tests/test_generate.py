"""Shot planning, post-processing (pure functions) and composed videos through the CLI and the job API."""

from __future__ import annotations


import httpx
import numpy as np
import pytest

from t2v.production.generate import PostOptions, generate, keyframes
from t2v.errors import InputError
from t2v.production.planner import plan_video, split_then, window_prompts
from t2v.production.postprocess import (color_match_shots, interpolate, match_histogram, motion_blur, temporal_smooth)
from t2v.video import probe

from test_cli import run
from test_serve_api import Server


def test_plan_single_prompt_long_clip():
    plan = plan_video("a red ball bouncing on a black background", 81, 8.0)  # 10 s
    assert [s.kind for s in plan.shots] == ["establishing", "medium", "closing"]
    assert plan.shots[0].start_frame == 0 and plan.shots[-1].end_frame == 81
    assert all(a.end_frame == b.start_frame for a, b in zip(plan.shots, plan.shots[1:]))
    assert plan.shots[0].prompt.endswith("the camera zooms out") and plan.shots[1].camera is None
    assert plan.shots[2].prompt.endswith("the camera zooms in")
    assert [s.kind for s in plan_video("a ball", 17, 8.0).shots] == ["single"]
    # The user's own camera motion is kept, not overridden.
    assert all(s.prompt == "a ball, zooming in" for s in plan_video("a ball, zooming in", 81, 8.0).shots)
    assert "3 shot(s)" in plan.describe()
    # A video that fits the model's own clip is one shot (Wan's 81 frames at 16 fps), unless "then" splits it.
    assert [s.kind for s in plan_video("a fox running", 81, 16.0).shots] == ["establishing", "closing"]
    assert [s.kind for s in plan_video("a fox running", 81, 16.0, clip_frames=81).shots] == ["single"]
    assert len(plan_video("a fox running", 161, 16.0, clip_frames=81).shots) == 3
    assert len(plan_video("a fox runs, then it jumps", 81, 16.0, clip_frames=81).shots) == 2


def test_plan_then_parts_become_consecutive_shots():
    assert split_then("a red ball rolls left, then a blue star spins") == ["a red ball rolls left",
                                                                           "a blue star spins"]
    plan = plan_video("a red ball rolls left, then a blue star spins; then a green heart grows", 49, 8.0)
    assert [s.prompt for s in plan.shots] == ["a red ball rolls left", "a blue star spins", "a green heart grows"]
    assert window_prompts(plan, [(1, 5), (5, 9), (9, 13)], 4) == [s.prompt for s in plan.shots]
    with pytest.raises(InputError, match="prompt"):
        plan_video("  ", 17, 8.0)


def ramp_video(n=5, shift=4):
    """A bright square moving right by `shift` pixels per frame."""
    frames = np.zeros((n, 32, 48, 3), np.uint8)
    for i in range(n):
        frames[i, 10:20, 4 + shift * i:14 + shift * i] = 200
    return frames


def test_interpolation_linear_and_flow():
    frames = ramp_video()
    lin = interpolate(frames, 2, "linear")
    assert len(lin) == 9 and np.array_equal(lin[::2], frames)
    assert np.allclose(lin[1], (frames[0].astype(float) + frames[1]) / 2, atol=1)
    flow = interpolate(frames, 2, "flow")
    assert np.array_equal(flow[::2], frames)
    # Optical flow moves the square half way instead of ghosting two half-bright copies.
    mid = flow[1][..., 0].astype(float)
    cols = np.where(mid[15] > 100)[0]
    assert 5 <= cols.min() <= 7 and (mid > 60).sum() < (lin[1][..., 0] > 60).sum() + 40
    assert np.abs(mid[15, 6:16] - 200).mean() < 60
    with pytest.raises(InputError, match="interpolate"):
        interpolate(frames, 2, "cubic")


def test_blur_smooth_and_colour_match():
    frames = ramp_video()
    blurred = motion_blur(frames, 1.0)
    assert blurred.shape == frames.shape and 0 < blurred[2, 15, 10, 0] < 200  # trails of the neighbours
    assert np.array_equal(motion_blur(frames, 0.0), frames)
    flicker = np.full((9, 4, 4, 3), 100, np.uint8)
    flicker[::2] += 40
    smooth = temporal_smooth(flicker, 3)
    assert np.abs(np.diff(smooth.astype(int), axis=0)).max() < np.abs(np.diff(flicker.astype(int), axis=0)).max()
    with pytest.raises(InputError, match="smooth"):
        temporal_smooth(flicker, 2)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    darker = (ref // 2).astype(np.uint8)
    matched = match_histogram(darker, ref)
    assert abs(matched.mean() - ref.mean()) < 3
    video = np.concatenate([ref, darker])
    graded = color_match_shots(video, [(0, 4), (4, 8)])
    assert np.array_equal(graded[:4], ref) and abs(graded[4:].mean() - ref.mean()) < 3


def test_keyframes_and_compose_with_the_tiny_model(wan_pipe):
    assert keyframes(33, 8.0, 4.0, 4) == (17, 2) and keyframes(33, 8.0, 8.0, 4) == (33, 1)
    with pytest.raises(InputError, match="keyframe_fps"):
        keyframes(33, 8.0, 3.0, 4)
    prompt, kw = "a red ball, then a blue star", dict(num_frames=17, fps=8, seed=1)
    # The same keyframes (9 at 4 fps, same seed) post-processed three ways, one option added at a time.
    keys = generate(wan_pipe, prompt, num_frames=9, fps=4, seed=1).frames
    lin = generate(wan_pipe, prompt, post=PostOptions(keyframe_fps=4, interpolate="linear"), **kw).frames
    graded = generate(wan_pipe, prompt, post=PostOptions(keyframe_fps=4, interpolate="linear", color_match=True),
                      **kw).frames
    out = generate(wan_pipe, prompt, post=PostOptions(keyframe_fps=4, interpolate="linear", color_match=True,
                                                      smooth=3), **kw)
    assert out.frames.shape == (17, 32, 32, 3) and out.fps == 8
    assert [s.prompt for s in out.plan.shots] == ["a red ball", "a blue star"]
    assert [(s.start_frame, s.end_frame) for s in out.plan.shots] == [(0, 8), (8, 17)] and out.windows
    # Linear interpolation: the keyframes at even frames, each odd frame the midpoint of its neighbours (to the
    # rounding of uint8), on a video that does change from keyframe to keyframe.
    f = lin.astype(float)
    assert np.array_equal(lin[::2], keys) and np.abs(np.diff(f[::2], axis=0)).mean() > 5
    assert np.abs(f[1::2] - (f[:-1:2] + f[2::2]) / 2).max() <= 0.5
    # Colour match: the first shot (keyframes 0-3, frames 0-6) untouched; the second (keyframes 4-8), whose
    # colours differed, takes the first's per-channel distribution (quantiles within 2 levels).
    q = lambda frames: np.percentile(frames.reshape(-1, 3), [10, 50, 90], axis=0)  # noqa: E731
    assert np.array_equal(graded[:7], lin[:7])
    assert np.abs(q(keys[4:]) - q(keys[:4])).max() > 8
    assert np.abs(q(graded[::2][4:]) - q(graded[::2][:4])).max() <= 2
    assert np.abs(graded[::2][4:].reshape(-1, 3).mean(0) - graded[:8:2].reshape(-1, 3).mean(0)).max() < 1
    # Smoothing over 3 frames: each frame the mean of itself and its neighbours (the ends repeated), so less
    # change from frame to frame than before.
    g = graded.astype(float)
    padded = np.concatenate([g[:1], g, g[-1:]])
    assert np.abs(out.frames - (padded[:-2] + padded[1:-1] + padded[2:]) / 3).max() <= 0.5
    change = lambda frames: np.abs(np.diff(frames.astype(float), axis=0)).mean()  # noqa: E731
    assert change(out.frames) < 0.8 * change(graded)


def test_cli_plan_and_seconds(tmp_path, wan_dir):
    out = tmp_path / "long.mp4"
    r = run("generate", "a red ball, then a blue star", "--model", wan_dir, "-o", out, "--seconds", 3,
            "--plan", "--steps", 2, "--keyframe-fps", 4, "--interpolate", "linear", "--quiet", "--no-optimize")
    assert r.returncode == 0, r.stderr
    assert "2 shot(s)" in r.stdout and '"a blue star"' in r.stdout
    assert probe(out).num_frames == 25  # 3 s at 8 fps, the model's frame grid
    bad = run("generate", "x", "--model", wan_dir, "-o", tmp_path / "b.mp4", "--smooth", 2)
    assert bad.returncode == 2 and "smooth" in bad.stderr


def test_api_long_job_returns_its_plan(wan_dir, tmp_path):
    import t2v
    from t2v.serve.api import Settings, create_app
    from t2v.serve.stages import LocalGenerator

    srv = Server(create_app(LocalGenerator(t2v.load(wan_dir)), Settings(store=str(tmp_path / "s"))))
    try:
        body = {"prompt": "a red ball, then a blue star", "seconds": "3", "size": "32x32",
                "num_inference_steps": 2, "keyframe_fps": 4, "interpolate": "flow", "color_match": "true",
                "optimize_prompt": "false"}
        job = httpx.post(srv.url + "/v1/videos", json=body).json()
        assert [s["prompt"] for s in job["t2v"]["plan"]["shots"]] == ["a red ball", "a blue star"]
        assert job["t2v"]["params"]["post"]["keyframe_fps"] == 4 and job["seconds"] == "3"
        v = srv.wait(job["id"])
        assert v["status"] == "completed", v["error"]
        assert probe(httpx.get(f"{srv.url}/v1/videos/{job['id']}/content").content).num_frames == 25
        r = httpx.post(srv.url + "/v1/videos", json={**body, "seconds": "600"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seconds"
        r = httpx.post(srv.url + "/v1/videos", json={**body, "motion_blur": "2"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "motion_blur"
    finally:
        srv.stop()
