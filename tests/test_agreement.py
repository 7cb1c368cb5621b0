"""t2v's pipeline against the reference diffusers pipelines: same bundle, seed, scheduler, steps ->
same frames (max abs difference ≤ 1e-3, fp32)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from layouts import (build_modelscope, build_wan21, build_wan21_i2v, build_wan22_a14b, build_wan22_i2v_a14b,
                     build_wan22_ti2v, noise_image)

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


@pytest.mark.parametrize("sampler", [None, "ddpm", "unipc"])
def test_latte_agrees_with_diffusers_lattepipeline(latte_dir, sampler):
    """LattePipeline zeroes a batch of prompts' embeddings past each prompt's length (its mask_feature); t2v does
    that for every batch (LattePipeline trims a lone prompt instead), so both get t2v's embeddings here."""
    bundle = t2v.load(latte_dir)
    call = dict(CALL_UNET, num_frames=bundle.denoiser.config.video_length)
    seed = call.pop("seed")
    ours = t2v.TextToVideoPipeline(bundle)(output_type="pt", sampler=sampler, seed=seed, **call).frames
    ref = reference(latte_dir, bundle)
    if sampler is not None:
        ref.scheduler = make_scheduler(dict(ref.scheduler.config), bundle.family.samplers, sampler, False)
    embeds = bundle.family.encode_prompt(bundle, [call.pop("prompt"), call.pop("negative_prompt")],
                                         bundle.config.max_sequence_length)
    theirs = ref(prompt_embeds=embeds[:1], negative_prompt=None, negative_prompt_embeds=embeds[1:],
                 video_length=call.pop("num_frames"),
                 generator=torch.Generator().manual_seed(seed), output_type="pt", **call).frames
    assert ours.shape == theirs.shape == (1, 5, 3, 32, 32)
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


@pytest.fixture(scope="module")
def a14b_dir(tmp_path_factory):
    return build_wan22_a14b(tmp_path_factory.mktemp("Wan2.2-T2V-A14B-tiny"))


def expert_calls(bundle) -> list[int]:
    """Forward calls of each expert, counted by hooks from now on."""
    calls = [0, 0]
    for k, model in enumerate(bundle.experts):
        model.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    return calls


@pytest.mark.parametrize("sampler", [None, "flow-match-euler", "dpm-solver++"])
def test_wan22_a14b_layout_hands_the_low_noise_steps_to_its_second_expert_as_diffusers(a14b_dir, sampler):
    """Wan2.2-T2V-A14B: `transformer` above boundary_ratio x 1000, `transformer_2` below, each with its own
    guidance scale, as diffusers' WanPipeline samples them."""
    bundle = t2v.load(a14b_dir)
    assert bundle.boundary_ratio == 0.875 and type(bundle.denoiser_2).__name__ == "WanTransformer3DModel"
    call = dict(CALL_WAN, num_inference_steps=6, guidance_scale_2=2.5)
    calls = expert_calls(bundle)
    ours = t2v.TextToVideoPipeline(bundle)(output_type="pt", sampler=sampler, **call).frames
    assert calls[0] > 0 and calls[1] > 0  # both experts took steps
    _, theirs = run_both(a14b_dir, sampler=sampler, **call)
    assert ours.std() > 0.01
    assert (ours - theirs).abs().max().item() <= TOL
    # The second expert's guidance scale is its own: another one, another video.
    other = t2v.TextToVideoPipeline(bundle)(output_type="pt", sampler=sampler, **dict(call, guidance_scale_2=20.0))
    assert (ours - other.frames).abs().max().item() > 0.01


@pytest.mark.parametrize("sampler", [None, "flow-match-euler", "dpm-solver++"])
def test_a_mixture_sampled_in_two_calls_one_per_expert_makes_the_one_calls_video(a14b_dir, sampler):
    """The high-noise expert's call hands its state over (pickled, as Ray carries it to another replica); the
    low-noise expert's call goes on from it: the same video, multistep solvers' history and an image included."""
    import pickle

    from t2v.errors import InputError

    pipe = t2v.TextToVideoPipeline(t2v.load(a14b_dir))
    call = dict(CALL_WAN, num_inference_steps=6, guidance_scale_2=2.5, sampler=sampler, image=noise_image(1))
    whole = pipe(output_type="pt", **call).frames
    calls = expert_calls(pipe.bundle)
    first = pipe(output_type="latent", expert=0, **call)
    assert calls[0] > 0 and calls[1] == 0
    handover = pickle.loads(pickle.dumps(first.handover))
    second = pipe(output_type="pt", expert=1, handover=handover, **call).frames
    assert calls[1] > 0 and sum(calls) == 6  # every step once, by its expert (one forward for both guidance halves)
    assert (whole - second).abs().max().item() <= 1e-5
    with pytest.raises(InputError) as e:
        pipe(output_type="pt", expert=1, **call)
    assert e.value.field == "handover"


def test_a_wan22_a14b_bundle_saves_both_experts_and_its_boundary(a14b_dir, tmp_path):
    t2v.load(a14b_dir).save(str(tmp_path / "copy"))
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == 0.875
    ours, theirs = run_both(tmp_path / "copy", **dict(CALL_WAN, num_inference_steps=5))
    assert (ours - theirs).abs().max().item() <= TOL


def test_training_from_a_mixture_of_experts_is_refused(a14b_dir, tmp_path):
    from t2v.train import TrainConfig
    from t2v.train.loop import build_bundle

    with pytest.raises(ValueError, match="mixture of experts"):
        build_bundle(TrainConfig(stage="denoiser", family="wan", init=str(a14b_dir), out=str(tmp_path / "o")))


@pytest.mark.parametrize("edit, found", [
    (dict(boundary_ratio=None), r"transformer_2: WanTransformer3DModel, boundary_ratio: None"),
    (dict(transformer_2=[None, None]), r"transformer_2: None, boundary_ratio: 0.875"),
    (dict(boundary_ratio=1.5), r"boundary_ratio: 1.5 is not between 0 and 1"),
])
def test_half_a_mixture_of_experts_is_refused_naming_what_it_found(a14b_dir, tmp_path, edit, found):
    """One expert without the step where the other takes over, or a boundary without a second expert, would
    sample another video without a word."""
    import shutil

    path = tmp_path / "edited"
    shutil.copytree(a14b_dir, path)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, **edit}))
    with pytest.raises(BundleError, match=found):
        t2v.load(path)


def test_guidance_scale_2_is_checked_against_the_model_and_guidance_scale(a14b_dir, wan_pipe):
    from t2v.errors import InputError

    pipe = t2v.TextToVideoPipeline(t2v.load(a14b_dir))
    for bad in (dict(guidance_scale=4.0, guidance_scale_2=1.0), dict(guidance_scale=1.0, guidance_scale_2=3.0),
                dict(guidance_scale_2=-1.0)):
        with pytest.raises(InputError) as e:
            pipe("a red ball", num_inference_steps=1, **bad)
        assert e.value.field == "guidance_scale_2"
    with pytest.raises(InputError) as e:  # a model of one expert has no second guidance scale
        wan_pipe("a red ball", num_inference_steps=1, guidance_scale_2=3.0)
    assert e.value.field == "guidance_scale_2"


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    return build_wan22_ti2v(tmp_path_factory.mktemp("Wan2.2-TI2V-5B-tiny"))


@pytest.mark.parametrize("sampler", [None, "flow-match-euler", "dpm-solver++"])
def test_wan22_ti2v_layout_agrees_with_diffusers_from_text_and_from_an_image(ti2v_dir, sampler):
    """Wan2.2-TI2V-5B: text alone as WanPipeline; a first frame as WanImageToVideoPipeline with
    expand_timesteps (the image's latent frame held clean, its tokens at t = 0)."""
    bundle = t2v.load(ti2v_dir)
    assert bundle.expand_timesteps and bundle.vae.config.z_dim == 48 and bundle.family.name == "wan"
    call = dict(CALL_WAN, height=64, width=64)
    ours, theirs = run_both(ti2v_dir, sampler=sampler, **call)
    assert ours.shape == theirs.shape == (1, 9, 3, 64, 64)
    assert ours.std() > 0.01 and (ours - theirs).abs().max().item() <= TOL
    image = noise_image(1, (64, 64))
    seed = call.pop("seed")
    from_image = t2v.TextToVideoPipeline(bundle)(output_type="pt", sampler=sampler, image=image, seed=seed, **call)
    ref = diffusers.WanImageToVideoPipeline.from_pretrained(ti2v_dir)
    if sampler is not None:
        ref.scheduler = make_scheduler(dict(ref.scheduler.config), bundle.family.samplers, sampler, True)
    theirs = ref(image=image, generator=torch.Generator().manual_seed(seed), output_type="pt",
                 max_sequence_length=bundle.config.max_sequence_length, **call).frames
    assert (from_image.frames - theirs).abs().max().item() <= TOL
    assert (from_image.frames - ours).abs().max().item() > 0.01  # the image conditions the video


def test_a_ti2v_model_takes_no_last_frame_and_no_image_across_long_video_windows(ti2v_dir):
    from t2v.errors import InputError
    from t2v.long_video import LongVideoPipeline

    pipe = t2v.TextToVideoPipeline(t2v.load(ti2v_dir))
    image = noise_image(1, (64, 64))
    with pytest.raises(InputError) as e:
        pipe("a red ball", height=64, width=64, num_frames=9, image=image, last_image=image)
    assert e.value.field == "last_image"
    with pytest.raises(InputError) as e:
        LongVideoPipeline(pipe)("a red ball", num_frames=17, window_frames=9, height=64, width=64, image=image,
                                num_inference_steps=1)
    assert e.value.field == "image"


@pytest.mark.parametrize("sampler", [None, "flow-match-euler", "dpm-solver++"])
def test_wan22_i2v_a14b_layout_agrees_with_diffusers_wanimagetovideopipeline(tmp_path_factory, sampler):
    """Wan2.2-I2V-A14B: two experts switched at 0.9, no image encoder; the image in the input channels only."""
    path = tmp_path_factory.mktemp("i2v-a14b") / "Wan2.2-I2V-A14B-tiny"
    build_wan22_i2v_a14b(path)
    bundle = t2v.load(path)
    assert bundle.family.name == "wan-i2v" and bundle.boundary_ratio == 0.9 and bundle.image_encoder is None
    calls = expert_calls(bundle)
    call = dict(CALL_WAN, num_inference_steps=6, guidance_scale_2=3.0)
    ours = t2v.TextToVideoPipeline(bundle)(output_type="pt", sampler=sampler, image=noise_image(1), **call).frames
    assert calls[0] > 0 and calls[1] > 0
    _, theirs = run_both(path, sampler=sampler, image=noise_image(1), **call)
    assert ours.std() > 0.01 and (ours - theirs).abs().max().item() <= TOL
    other, _ = run_both(path, sampler=sampler, image=noise_image(2), **call)
    assert (ours - other).abs().max().item() > 0.01  # the image conditions the video


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
