"""The `t2v` console script, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from conftest import fresh_python
from t2v.video import probe, read_video

T2V = shutil.which("t2v")


def run(*args, cwd=None):
    assert T2V, "the t2v console script is not installed (pip install -e .)"
    return subprocess.run([T2V, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_generate_writes_the_video_and_a_summary(tmp_path, wan_dir):
    out = tmp_path / "ball.mp4"
    r = run("generate", "a red ball bouncing", "--model", wan_dir, "-o", out, "--frames", 13, "--fps", 12,
            "--height", 48, "--width", 64, "--steps", 2, "--guidance", 3, "--seed", 5, "--sampler", "unipc",
            "--negative", "blurry")
    assert r.returncode == 0, r.stderr
    info = probe(out)
    assert (info.codec, info.num_frames, info.width, info.height, info.fps) == ("h264", 13, 64, 48, 12.0)
    assert str(out) in r.stdout and "13 frames" in r.stdout and "64x48" in r.stdout and "seed 5" in r.stdout
    assert "denoising" in r.stderr and "2/2" in r.stderr  # the progress bar
    # Same seed from the CLI -> same pixels.
    again = tmp_path / "again.mp4"
    r = run("generate", "a red ball bouncing", "--model", wan_dir, "-o", again, "--frames", 13, "--fps", 12,
            "--height", 48, "--width", 64, "--steps", 2, "--guidance", 3, "--seed", 5, "--sampler", "unipc",
            "--negative", "blurry", "--quiet", "--timings")
    # --timings: every part of the run in seconds, together within the total the summary gives.
    parts = {k: float(v) for k, v in (kv.split("=") for kv in r.stdout.split("timings: ")[1].split())}
    assert list(parts) == ["load", "text", "denoise", "decode", "post", "encode"]
    total = float(r.stdout.split(" s\n")[0].rsplit(", ", 1)[1])
    assert min(parts.values()) >= 0 and parts["load"] > 0 and parts["denoise"] > 0 and parts["encode"] > 0
    assert sum(parts.values()) <= total + 0.05
    # The generated frames are identical (tests/test_pipeline.py); x264 itself does not always encode them to
    # the same bytes from one process to the next (measured: up to ~10 levels on a few pixels).
    assert np.abs(read_video(out).astype(int) - read_video(again)).mean() < 1.0


@pytest.mark.parametrize("ext, codec", [(".webm", "vp9"), (".gif", "gif")])
def test_generate_other_formats(tmp_path, unet3d_dir, ext, codec):
    out = tmp_path / f"v{ext}"
    r = run("generate", "a blue square", "--model", unet3d_dir, "-o", out, "--quiet", "--precision", "int8")
    assert r.returncode == 0, r.stderr
    assert probe(out).codec == codec


@pytest.mark.parametrize("args, message", [
    (["", ], "prompt: is empty"),
    (["x", "--frames", "10"], "num_frames: 10 is not supported"),
    (["x", "--height", "50"], "height:"),
    (["x", "--steps", "0"], "num_inference_steps:"),
    (["x", "--guidance", "-2"], "guidance_scale:"),
    (["x", "--sampler", "lms"], "sampler: unknown sampler 'lms'"),
    (["x", "--precision", "fp8"], "precision: unknown precision 'fp8'"),
    (["x", "-o", "OUT.avi"], "output: unknown video format '.avi'"),
])
def test_bad_input_exits_2_with_the_field_and_leaves_no_file(tmp_path, wan_dir, args, message):
    target = tmp_path / "out.mp4"
    full = ["generate", *args, "--model", wan_dir]
    if "-o" not in args:
        full += ["-o", target]
    r = run(*full, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_model_exits_2(tmp_path):
    r = run("generate", "x", "--model", tmp_path / "none", "-o", tmp_path / "o.mp4")
    assert r.returncode == 2 and "model:" in r.stderr and "no such bundle" in r.stderr


def test_the_console_script_skips_the_last_garbage_collection_yet_runs_exit_handlers():
    """`t2v` (t2v.cli:run) exits with main()'s code after freezing the heap (the interpreter's final collection of
    torch's and diffusers' objects is 0.6 s of every command); what a process does at exit still runs."""
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts", name="t2v")] == ["t2v.cli:run"]
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 1000, flush=True))\n"
            "sys.argv = ['t2v', 'info', '--preset', 'unet3d:tiny']\n"
            "from t2v.cli import run\n"
            "run()\n")
    done = fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert "UNet3DConditionModel" in done.stdout and "frozen at exit: True" in done.stdout
    bad = fresh_python(code.replace("unet3d:tiny", "no-such-preset"))
    assert bad.returncode != 0 and "unknown preset" in bad.stderr


def test_info_lists_components_and_sizes(wan_dir, unet3d_dir):
    r = run("info", "--model", wan_dir)
    assert r.returncode == 0, r.stderr
    for text in ("family: wan (WanPipeline)", "WanTransformer3DModel", "AutoencoderKLWan", "BertModel",
                 "FlowMatchEulerDiscreteScheduler", "multiples of 16", "frames 1 + 4k", "unipc"):
        assert text in r.stdout
    r = run("info", "--model", unet3d_dir)
    assert "UNet3DConditionModel" in r.stdout and "AutoencoderKL " in r.stdout and "frames 1..64" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("prompt, background", [
    ("a red ball bouncing on a black background", "black"),
    ("a white square sliding to the right on a gray background", "gray"),
    pytest.param("a yellow star spinning under a blue sky over green grass", "sky", marks=pytest.mark.xfail(
        strict=True, reason="the embedded model draws this sky as the desert's (background: 70% / 73% of held-out "
                            "prompts through the prompt optimizer, docs/model-card.md#quality)")),
])
def test_the_embedded_default_model_shows_the_background_asked_for(tmp_path, prompt, background):
    """The README's main job: no --model, the shipped bundle, default settings (17 frames, 64x64, 8 fps)."""
    from t2v.bundle import DEFAULT_MODEL
    from t2v.world.analyze import analyze

    assert (DEFAULT_MODEL / "model_index.json").exists()
    sizes = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert sizes <= 20 * 2**20  # the budget for the shipped weights (they travel with every clone)
    out = tmp_path / f"{background}.mp4"
    result = run("generate", prompt, "-o", out, "--seed", 0, "--quiet")
    assert result.returncode == 0, result.stderr
    info = probe(out)
    assert (info.num_frames, info.width, info.height, round(info.fps)) == (17, 64, 64, 8)
    assert analyze(read_video(out))["background"] == background


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the target, not met yet: the embedded model shows exactly one red object "
                   "in 74 of these 85 frames (87%; the model before it 69%), with a second red, orange or yellow "
                   "blob in the rest (docs/model-card.md#quality)")
def test_the_readme_example_shows_one_red_ball_in_every_frame(tmp_path):
    """The README's first command as a new user runs it, seeds 0-4: in every frame the colour judge finds exactly
    one object, and it is red."""
    from t2v.world.analyze import objects_per_frame

    for seed in range(5):
        out = tmp_path / f"ball-{seed}.mp4"
        result = run("generate", "a red ball bouncing on a black background", "-o", out, "--seed", seed, "--quiet")
        assert result.returncode == 0, result.stderr
        per_frame = objects_per_frame(read_video(out))
        assert len(per_frame) == 17
        assert all(found == {"red": 1} for found in per_frame), (seed, per_frame)


def test_the_cli_treats_a_prompt_as_the_api_does(tmp_path, wan_dir):
    from t2v.bundle import load
    from t2v.serve.stages import validate

    prompt = "a red ball bouncing"
    api = validate(load(wan_dir), {"prompt": prompt})  # the job API's parameters for this prompt, by default
    assert api["prompt"] != prompt and api["prompt_changes"]
    r = run("generate", prompt, "--model", wan_dir, "-o", tmp_path / "a.mp4", "--steps", 1, "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"prompt: {api['prompt']!r}" in r.stderr
    kept = run("generate", prompt, "--model", wan_dir, "-o", tmp_path / "b.mp4", "--steps", 1, "--quiet",
               "--no-optimize")
    assert kept.returncode == 0 and "prompt:" not in kept.stderr
