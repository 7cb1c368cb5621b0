"""Bad input: one clear error naming the field and the allowed values, before any work."""

from __future__ import annotations

import pytest

import t2v
from t2v.errors import BundleError, InputError


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(prompt=""), "prompt", "characters"),
    (dict(prompt="   "), "prompt", "characters"),
    (dict(prompt="x" * 2001), "prompt", "2000"),
    (dict(prompt="red " * 40), "prompt", "32 tokens"),
    (dict(prompt=["a", 3]), "prompt", None),
    (dict(num_frames=10), "num_frames", "1 + a multiple of 4"),
    (dict(num_frames=0), "num_frames", "1..161"),
    (dict(num_frames=1000), "num_frames", "1..161"),
    (dict(height=40), "height", "multiple of 16"),
    (dict(width=8), "width", "16..1280"),
    (dict(width=2048), "width", "16..1280"),
    (dict(num_inference_steps=0), "num_inference_steps", "1..1000"),
    (dict(num_inference_steps=1001), "num_inference_steps", "1..1000"),
    (dict(num_inference_steps=2.5), "num_inference_steps", None),
    (dict(guidance_scale=-1.0), "guidance_scale", "≥ 0.0"),
    (dict(guidance_scale=float("nan")), "guidance_scale", None),
    (dict(sampler="lms"), "sampler", "flow-match-euler"),
    (dict(fps=0), "fps", "> 0.0"),
    (dict(seed=-1), "seed", None),
    (dict(output_type="pil"), "output_type", "np, pt, latent"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt", "one per prompt"),
])
def test_wan_rejects_with_field_and_limit(wan_pipe, kwargs, field, allowed):
    kwargs = {"prompt": "a red ball", **kwargs}
    with pytest.raises(InputError) as err:
        wan_pipe(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:")
    if allowed:
        assert allowed in str(err.value)


def test_unet3d_limits_follow_its_architecture(unet3d_pipe):
    unet3d_pipe("a red ball", num_frames=5, num_inference_steps=1)  # any frame count is fine per-frame
    with pytest.raises(InputError, match="multiple of 4"):
        unet3d_pipe("a red ball", height=34)
    with pytest.raises(InputError, match="sampler.*flow-match-euler"):
        unet3d_pipe("a red ball", sampler="flow-match-euler")


def test_latte_makes_clips_of_its_temporal_position_table_only(latte_dir):
    """LatteTransformer3DModel adds a fixed table of video_length temporal positions: any other frame count is
    refused by name, before any work, instead of failing inside the model."""
    pipe = t2v.TextToVideoPipeline.from_pretrained(latte_dir)
    n = pipe.bundle.denoiser.config.video_length
    assert pipe("a red ball", num_inference_steps=1).frames.shape[1] == n
    for frames in (n - 1, n + 4):
        with pytest.raises(InputError) as err:
            pipe("a red ball", num_frames=frames, num_inference_steps=1)
        assert err.value.field == "num_frames" and f"{n}..{n}" in str(err.value)
    with pytest.raises(InputError, match="multiple of 4"):  # 2x VAE x 2x2 patches
        pipe("a red ball", height=34)


def test_unknown_precision(wan_dir):
    with pytest.raises(InputError, match="precision.*fp32, bf16, fp16, int8"):
        t2v.load(wan_dir, precision="fp8")


def test_missing_path_and_non_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        t2v.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no such bundle"):
        t2v.load(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError):
        t2v.load(tmp_path / "file")
    bad = tmp_path / "other"
    bad.mkdir()
    (bad / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": [null, null]}')
    with pytest.raises(BundleError, match="not a t2v family"):
        t2v.load(bad)


def test_errors_survive_pickling():
    """Ray sends a replica's error to the Ingress by pickle; it must arrive as the same error."""
    import pickle

    from t2v.errors import BundleError, InputError

    e = pickle.loads(pickle.dumps(InputError("seed", "is negative", "≥ 0")))
    assert isinstance(e, InputError) and (e.field, e.allowed, str(e)) == ("seed", "≥ 0", "seed: is negative (allowed: ≥ 0)")
    b = pickle.loads(pickle.dumps(BundleError("s3://x", "missing")))
    assert b.field == "model" and str(b) == "model: s3://x: missing"
