"""t2v's pipeline against the reference diffusers pipelines: same bundle, seed, scheduler, steps ->
same frames (max abs difference ≤ 1e-3, fp32)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from layouts import build_modelscope, build_wan21, build_wan21_i2v, build_wan22_a14b, noise_image

import t2v
from t2v.errors import BundleError
from t2v.sampling import make_scheduler

TOL = 1e-3


def reference(path, bundle, **kwargs):
    """The diffusers pipeline class named in the bundle, from_pretrained on the same folder."""
    cls = getattr(diffusers, bundle.family.pipeline_class)
    extra = {}
    if bundle.uses_packaged_text_encoder:  # the bundle's text_encoder is null: pass MiniLM, as t2v does
        extra = dict(text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer)
    return cls.from_pretrained(path, **extra)


def run_both(path, sampler=None, **call):
    bundle = t2v.load(path)
    ours = t2v.TextToVideoPipeline(bundle)(output_type="pt", sampler=sampler, seed=call.pop("seed"), **call)
    ref = reference(path, bundle)
    if sampler is not None:
        fam = bundle.family
        ref.scheduler = make_scheduler(dict(ref.scheduler.config), fam.samplers, sampler, fam.flow)
    kwargs = dict(call)
    if bundle.family.name in ("wan", "wan-i2v"):
        kwargs["max_sequence_length"] = bundle.config.max_sequence_length
    theirs = ref(generator=torch.Generator().manual_seed(ours.seed), output_type="pt", **kwargs).frames
    return ours.frames, theirs


CALL_WAN = dict(prompt="a red ball bouncing on a black background", negative_prompt="blurry, static",
                num_frames=9, height=32, width=32, num_inference_steps=4, guidance_scale=4.0, seed=7)
CALL_UNET = dict(CALL_WAN, num_frames=4)


@pytest.mark.parametrize("sampler", [None, "unipc", "dpm-solver++", "flow-match-heun"])
def test_wan_agrees_with_diffusers_wanpipeline(wan_dir, sampler):
    ours, theirs = run_both(wan_dir, sampler=sampler, **CALL_WAN)
    assert ours.shape == theirs.shape == (1, 9, 3, 32, 32)
    assert ours.std() > 0.01  # not a constant video that would agree trivially
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("sampler", [None, "dpm-solver++", "euler", "unipc", "ddpm"])
def test_unet3d_agrees_with_diffusers_texttovideosdpipeline(unet3d_dir, sampler):
    ours, theirs = run_both(unet3d_dir, sampler=sampler, **CALL_UNET)
    assert ours.shape == theirs.shape == (1, 4, 3, 32, 32)
    assert ours.std() > 0.01
    assert (ours - theirs).abs().max().item() <= TOL


def test_wan21_layout_with_umt5_loads_and_agrees(tmp_path):
    path = build_wan21(tmp_path / "Wan2.1-T2V-tiny")
    bundle = t2v.load(path)
    assert type(bundle.text_encoder).__name__ == "UMT5EncoderModel"
    assert type(bundle.scheduler).__name__ == "UniPCMultistepScheduler"
    assert not bundle.uses_packaged_text_encoder
    ours, theirs = run_both(path, **dict(CALL_WAN, prompt="a red ball on the left"))
    assert (ours - theirs).abs().max().item() <= TOL


def test_a_wan22_a14b_layout_is_refused_naming_its_second_expert(tmp_path):
    """Loaded as Wan2.1, its low-noise expert would be ignored and the video silently another one."""
    path = build_wan22_a14b(tmp_path / "Wan2.2-T2V-A14B-tiny")
    assert json.loads((path / "model_index.json").read_text())["transformer_2"][1] == "WanTransformer3DModel"
    with pytest.raises(BundleError, match=r"transformer_2: WanTransformer3DModel, boundary_ratio: 0.875"):
        t2v.load(path)


def test_modelscope_layout_with_clip_loads_and_agrees(tmp_path):
    path = build_modelscope(tmp_path / "text-to-video-ms-tiny")
    bundle = t2v.load(path)
    assert type(bundle.text_encoder).__name__ == "CLIPTextModel"
    assert bundle.config.max_sequence_length == 77
    ours, theirs = run_both(path, **CALL_UNET)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return build_wan21_i2v(tmp_path_factory.mktemp("Wan2.1-I2V-tiny"))


@pytest.mark.parametrize("sampler", [None, "flow-match-euler", "flow-match-heun", "dpm-solver++"])
def test_wan21_i2v_layout_loads_and_agrees_with_diffusers_wanimagetovideopipeline(i2v_dir, sampler):
    bundle = t2v.load(i2v_dir)
    assert bundle.family.name == "wan-i2v"
    assert type(bundle.image_encoder).__name__ == "CLIPVisionModel"
    ours, theirs = run_both(i2v_dir, sampler=sampler, image=noise_image(1), **CALL_WAN)
    assert ours.shape == theirs.shape == (1, 9, 3, 32, 32)
    assert ours.std() > 0.01
    assert (ours - theirs).abs().max().item() <= TOL
    # The image conditions the video: another image, another video.
    other, _ = run_both(i2v_dir, sampler=sampler, image=noise_image(2), **CALL_WAN)
    assert (ours - other).abs().max().item() > 0.01


def test_wan21_flf2v_layout_agrees_with_diffusers_from_a_first_and_a_last_frame(tmp_path):
    path = build_wan21_i2v(tmp_path / "Wan2.1-FLF2V-tiny", first_last=True)
    assert t2v.load(path).denoiser.config.pos_embed_seq_len == 34
    ours, theirs = run_both(path, image=noise_image(1), last_image=noise_image(3), **CALL_WAN)
    assert ours.std() > 0.01
    assert (ours - theirs).abs().max().item() <= TOL
    other, _ = run_both(path, image=noise_image(1), last_image=noise_image(4), **CALL_WAN)
    assert (ours - other).abs().max().item() > 0.01  # the last frame conditions it too
