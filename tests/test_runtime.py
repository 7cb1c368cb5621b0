"""Runtime options (t2v.runtime) and the real-size presets: each option is diffusers' own mechanism, and each is
checked for what it promises (the same frames, or frames within a stated distance, fewer forwards, less held)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import t2v
from t2v.bundle import is_shapes_only, load
from t2v.errors import InputError
from t2v.families import WAN
from t2v.runtime import RuntimeOptions, apply

from conftest import build_tiny


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * np.log10(1 / max(mse, 1e-12))


def frames(options: dict | None = None, prompt="a red ball", steps=10, size=64, **kw) -> tuple[torch.Tensor, t2v.Bundle]:
    """The tiny wan model's video (pt frames in [0, 1]) with the options on; the same weights every call."""
    torch.manual_seed(0)
    bundle = apply(build_tiny(WAN), RuntimeOptions.parse(**(options or {})))
    out = t2v.TextToVideoPipeline(bundle)(prompt, seed=3, num_inference_steps=steps, height=size, width=size,
                                          output_type="pt", **kw)
    return out.frames.float(), bundle


def count_forwards(bundle) -> list[int]:
    """Counts the forwards of the transformer's last block's feed-forward (a skipped step never reaches it; the
    cache's hook stands in for the block's own forward)."""
    calls = [0]
    bundle.denoiser.blocks[-1].ffn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --- presets ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, layers, heads, ffn, billions", [("wan2.1-1.3b", 30, 12, 8960, 1.419),
                                                                  ("wan2.1-14b", 40, 40, 13824, 14.288)])
def test_real_size_presets_have_the_released_shapes(preset, layers, heads, ffn, billions):
    c = WAN.build(preset, text_encoder=True, device="meta")
    cfg = c["transformer"].config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.ffn_dim, cfg.text_dim) == \
        (layers, heads, 128, ffn, 4096)
    assert sum(p.numel() for p in c["transformer"].parameters()) / 1e9 == pytest.approx(billions, abs=0.001)
    vae = c["vae"].config
    assert (vae.base_dim, vae.z_dim, list(vae.dim_mult), vae.num_res_blocks) == (96, 16, [1, 2, 4, 4], 2)
    enc = c["text_encoder"].config  # UMT5-XXL's encoder
    assert (enc.d_model, enc.num_layers, enc.num_heads, enc.d_ff, enc.vocab_size) == (4096, 24, 64, 10240, 256384)
    assert type(c["scheduler"]).__name__ == "UniPCMultistepScheduler" and c["scheduler"].config.use_flow_sigmas
    assert all(p.is_meta for p in c["transformer"].parameters())  # shapes only: nothing allocated


def test_wan22_presets_have_the_released_shapes():
    """T2V-A14B: two experts of Wan2.1-14B's shape switched at 0.875; TI2V-5B: one 5B transformer on the Wan2.2
    VAE's 48 channels at 16x spatial compression."""
    moe = WAN.build("wan2.2-t2v-a14b", device="meta")
    assert moe["boundary_ratio"] == 0.875
    for key in ("transformer", "transformer_2"):
        cfg = moe[key].config
        assert (cfg.num_layers, cfg.num_attention_heads, cfg.ffn_dim, cfg.in_channels) == (40, 40, 13824, 16)
        assert sum(p.numel() for p in moe[key].parameters()) / 1e9 == pytest.approx(14.288, abs=0.001)
    ti2v = WAN.build("wan2.2-ti2v-5b", device="meta")
    cfg, vae = ti2v["transformer"].config, ti2v["vae"].config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.ffn_dim, cfg.in_channels, cfg.out_channels) == \
        (30, 24, 14336, 48, 48)
    assert sum(p.numel() for p in ti2v["transformer"].parameters()) / 1e9 == pytest.approx(5.000, abs=0.001)
    assert (vae.z_dim, vae.base_dim, vae.decoder_base_dim, vae.patch_size, vae.is_residual,
            vae.scale_factor_spatial) == (48, 160, 256, 2, True, 16)
    assert "transformer_2" not in ti2v
    from t2v.families.wan_i2v import WAN_I2V

    i2v = WAN_I2V.build("wan2.2-i2v-a14b", device="meta")
    assert i2v["boundary_ratio"] == 0.9 and "image_encoder" not in i2v
    for key in ("transformer", "transformer_2"):
        assert (i2v[key].config.in_channels, i2v[key].config.image_dim, i2v[key].config.num_layers) == (36, None, 40)


def test_info_prints_a_presets_parameters_and_bf16_memory():
    out = subprocess.run([sys.executable, "-m", "t2v", "info", "--preset", "wan2.1-14b"], capture_output=True,
                         text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "WanTransformer3DModel" in l)
    assert "14.288 B parameters" in line and "26.6" in line and "GiB in bf16" in line
    assert "UMT5EncoderModel" in out and "5.681 B" in out
    out = subprocess.run([sys.executable, "-m", "t2v", "info", "--preset", "wan2.2-t2v-a14b"], capture_output=True,
                         text=True, check=True).stdout
    experts = [l for l in out.splitlines() if "WanTransformer3DModel" in l]
    assert len(experts) == 2 and all("14.288 B parameters" in l for l in experts)
    assert "boundary_ratio 0.875" in out


# --- options ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [({"memory": "vae_tilng"}, "memory"), ({"memory": "vae_slicing:3"}, "memory"),
                                           ({"cache": "teacache"}, "cache"), ({"cache": "first_block:x"}, "cache"),
                                           ({"memroy": ["vae_tiling"]}, "runtime")])
def test_unknown_options_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(InputError) as e:
        RuntimeOptions.parse(**kwargs)
    assert e.value.field == field


def test_group_offload_and_vae_slicing_change_no_frame():
    base, _ = frames()
    for memory in ("group_offload", "vae_slicing"):
        assert torch.equal(frames({"memory": memory})[0], base), memory


def test_expert_offload_keeps_one_expert_resident_swaps_at_the_switch_and_changes_no_frame(tmp_path):
    """A tiny Wan2.2-T2V-A14B with memory expert_offload: every forward runs the expert the runtime holds on the
    device (the other in host memory), which changes at the switch and back at the next video's first step, one
    move each; the frames are those without the option. (On this CPU the device is host memory too: what moves
    where is the runtime's record; the memory it saves is measured on a GPU.)"""
    from layouts import build_wan22_a14b

    folder = build_wan22_a14b(tmp_path / "a14b")
    call = dict(prompt="a red ball", num_frames=9, height=32, width=32, seed=2, num_inference_steps=6)
    plain = t2v.TextToVideoPipeline(load(folder))(**call).frames
    bundle = load(folder, runtime=RuntimeOptions.parse(memory="expert_offload"))
    runtime = bundle.runtime
    seen = []
    for k, expert in enumerate(bundle.experts):
        expert.register_forward_pre_hook(lambda module, args, k=k: seen.append((k, runtime.resident)))
    pipe = t2v.TextToVideoPipeline(bundle)
    for n in range(2):
        assert np.array_equal(pipe(**call).frames, plain)
        assert seen[0] == (0, 0) and seen[-1] == (1, 1) and all(k == resident for k, resident in seen)
        switches = sum(a[0] != b[0] for a, b in zip(seen, seen[1:]))
        assert switches == 1 and runtime.expert_swaps == 2 * n + 1  # in at the switch; out at the next start
        seen.clear()
    with pytest.raises(InputError) as e:
        load(folder, runtime=RuntimeOptions.parse(memory="expert_offload,group_offload"))
    assert e.value.field == "memory"
    with pytest.raises(InputError) as e:
        apply(build_tiny(WAN), RuntimeOptions.parse(memory="expert_offload"))
    assert "mixture" in str(e.value)


def test_tiled_decode_matches_untiled_within_the_stated_tolerance():
    """The embedded model (a trained per-frame AutoencoderKL) at 128x128 decoded in 64-pixel tiles with a quarter
    overlap: PSNR >= 25 dB against the untiled decode, mean difference below 5/100 (measured over seeds 1-3 at 4
    and 10 steps: 26.6-29.2 dB, 0.028-0.037; the model before this one 30.2-38.3 dB on the same VAE: how far
    tiles disagree depends on the latents)."""
    plain = t2v.TextToVideoPipeline(load())
    latents = plain("a red ball bouncing on a black background", seed=1, num_inference_steps=4, height=128,
                    width=128, output_type="latent").frames
    untiled = plain.decode_latents(latents, "pt")
    tiled_bundle = load(runtime=RuntimeOptions.parse(memory="vae_tiling:64"))
    assert tiled_bundle.vae.use_tiling and tiled_bundle.vae.tile_sample_min_size == 64
    tiled = t2v.TextToVideoPipeline(tiled_bundle).decode_latents(latents, "pt")
    assert psnr(tiled, untiled) >= 25 and (tiled - untiled).abs().mean() < 5e-2


def test_a_first_block_cache_at_threshold_zero_changes_nothing_and_above_it_skips_steps():
    base, _ = frames()
    same, bundle = frames({"cache": "first_block:0"})
    assert torch.equal(same, base)
    cached, bundle = frames({"cache": "first_block:0.5"})
    calls = count_forwards(bundle)
    again = t2v.TextToVideoPipeline(bundle)("a red ball", seed=3, num_inference_steps=10, height=64, width=64,
                                            output_type="pt").frames.float()
    assert torch.equal(again, cached)  # the cache starts afresh for every generation
    assert calls[0] < 10  # some steps skipped the blocks after the first
    assert 30 < psnr(cached, base) < 100


@pytest.mark.parametrize("cache", ["taylorseer:3", "pab"])
def test_other_caches_approximate_the_uncached_video(cache):
    base, _ = frames()
    cached, _ = frames({"cache": cache})
    assert not torch.equal(cached, base) and psnr(cached, base) > 30


def test_latte_runs_under_the_caches_its_layout_allows_and_refuses_first_block(latte_dir):
    """Latte reshapes its tokens between frame and time blocks, which the first-block cache cannot follow: refused
    by name before any work; the caches that wrap each block approximate the uncached video."""
    call = dict(seed=3, num_inference_steps=8, output_type="pt")
    base = t2v.TextToVideoPipeline.from_pretrained(latte_dir)("a red ball", **call).frames.float()
    with pytest.raises(InputError, match="cache: first_block.*taylorseer, pab"):
        t2v.TextToVideoPipeline.from_pretrained(latte_dir, cache="first_block:0.1")
    for cache in ("taylorseer:2", "pab"):
        cached = t2v.TextToVideoPipeline.from_pretrained(latte_dir, cache=cache)("a red ball", **call).frames.float()
        assert not torch.equal(cached, base) and psnr(cached, base) > 20  # cached steps, close to the video


def test_a_cache_composes_with_long_video_windows():
    """Each window of a long video is cached under its own context: at threshold 0 the long video is the
    uncached one exactly, and above it, a repeat of the same call gives the same video."""
    from t2v.long_video import LongVideoPipeline

    def long(options):
        torch.manual_seed(0)
        bundle = apply(build_tiny(WAN), RuntimeOptions.parse(**options))
        return LongVideoPipeline(t2v.TextToVideoPipeline(bundle))("a red ball", num_frames=25, seed=2,
                                                                   num_inference_steps=6, output_type="pt")

    base = long({}).frames
    assert torch.equal(long({"cache": "first_block:0"}).frames, base)
    a, b = long({"cache": "first_block:0.3"}).frames, long({"cache": "first_block:0.3"}).frames
    assert torch.equal(a, b) and psnr(a.float(), base.float()) > 25


def test_the_serve_denoiser_refuses_a_cache_with_step_batching_or_fan_out(wan_dir):
    from t2v.serve.deployments import Denoiser

    for extra in ({"step_batching": {"max_batch_size": 4}, "fan_out": False}, {"fan_out": True}):
        with pytest.raises(ValueError, match="runtime.cache needs step_batching: null, fan_out: false and no parallel layout"):
            Denoiser.func_or_class(str(wan_dir), runtime={"cache": "first_block"}, **extra)


def test_the_serve_denoiser_refuses_expert_offload_with_step_batching(wan_dir):
    from t2v.serve.deployments import Denoiser

    with pytest.raises(ValueError, match="expert_offload needs step_batching: null"):
        Denoiser.func_or_class(str(wan_dir), runtime={"memory": ["expert_offload"]}, fan_out=False,
                               step_batching={"max_batch_size": 4})


def test_a_stage_reads_only_the_weights_it_runs(wan_dir):
    from t2v.serve.stages import validate

    encoder = load(wan_dir, weights=("text_encoder",))
    assert is_shapes_only(encoder.denoiser) and is_shapes_only(encoder.vae)
    assert not is_shapes_only(encoder.text_encoder)
    assert validate(encoder, {"prompt": "a red ball", "size": "32x32"})["num_frames"] == 9  # limits from configs
    decoder = load(wan_dir, weights=("vae",))
    assert is_shapes_only(decoder.denoiser) and not is_shapes_only(decoder.vae)
    full = t2v.TextToVideoPipeline(load(wan_dir))
    latents = full("a red ball", seed=1, output_type="latent").frames
    assert torch.equal(t2v.TextToVideoPipeline(decoder).decode_latents(latents, "pt"),
                       full.decode_latents(latents, "pt"))


@pytest.mark.slow
def test_compiled_and_eager_frames_agree():
    eager, _ = frames(steps=4)
    compiled, bundle = frames({"compile": True}, steps=4)
    assert (compiled - eager).abs().max() < 1e-4
    assert bundle.runtime.compile_s > 0  # the warm-up, measured on the first forward


def test_the_cli_takes_the_options(tmp_path, wan_dir):
    from t2v.production.prompting import optimize_parts
    from t2v.video import encode_video, read_video

    # A GIF, not an mp4: PyAV's H.264 path does not give the same file for the same frames every time in one
    # process (after an rgb24 decode there), while the GIF path (a palette of the clip, no conversion) does, so
    # the CLI's file can be matched exactly with the in-process frames through the same encoder.
    out = tmp_path / "v.gif"
    memory, cache = "vae_slicing,vae_tiling:16", "first_block:0.1"  # 16-pixel tiles: 2x2 on the 32x32 video
    r = subprocess.run([sys.executable, "-m", "t2v", "generate", "a red ball", "--model", str(wan_dir), "-o", str(out),
                        "--memory", memory, "--cache", cache, "--steps", "4", "--seed", "1", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = read_video(out).astype(float)
    assert got.shape == (9, 32, 32, 3)

    def video(**options):  # the in-process pipeline's frames with these options, through the same encoder
        pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir, **options)
        calls = count_forwards(pipe.bundle)
        prompt, negative, _ = optimize_parts(pipe.bundle, "a red ball", None)  # what the CLI does by default
        frames = pipe(prompt, negative_prompt=negative or None, seed=1, num_inference_steps=4).frames[0]
        return read_video(encode_video(frames, 8.0, ".gif")).astype(float), calls[0]

    want, passes = video(memory=memory, cache=cache)
    assert passes < 4  # with this cache the blocks after the first ran on fewer than the 4 steps
    # The CLI's video is the one with both options on, and not the one without either: each took effect. (The
    # third, vae_slicing, decodes a batch one video at a time: a lone video's frames are the same with it or
    # without it, so no output can tell whether it was applied.)
    assert np.array_equal(got, want)
    for without in (dict(memory=memory), dict(cache=cache)):
        assert np.abs(got - video(**without)[0]).max() > 5, without
    bad = subprocess.run([sys.executable, "-m", "t2v", "generate", "x", "--model", str(wan_dir), "--cache", "nope",
                          "-o", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "cache" in bad.stderr and "first_block" in bad.stderr


# --- the real-size preset end to end, at a shape this CPU runs ---------------------------------------------

@pytest.fixture(scope="module")
def real_size_dir(tmp_path_factory):
    """The wan2.1-1.3b transformer and VAE at their released shapes (random weights, stored in bf16: 2.8 GB),
    with a one-layer encoder of UMT5's width (UMT5-XXL itself is 23 GB in fp32: more than this machine holds
    next to the rest) and the packaged MiniLM tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    from t2v.bundle import to_precision
    from t2v.text import load_default_text_encoder

    torch.manual_seed(0)
    components = WAN.build("wan2.1-1.3b")
    tokenizer, _ = load_default_text_encoder()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=tokenizer.vocab_size, d_model=4096, d_kv=64, d_ff=256,
                                          num_layers=1, num_heads=8, feed_forward_proj="gated-gelu"))
    bundle = t2v.from_components("wan", components, text_encoder=encoder, tokenizer=tokenizer, config=dict(
        num_frames=5, height=64, width=64, num_inference_steps=2, fps=16, max_sequence_length=32))
    path = tmp_path_factory.mktemp("real") / "wan2.1-1.3b"
    to_precision(bundle, "bf16").save(str(path))
    del bundle, components
    return path


@pytest.mark.slow
def test_the_real_size_preset_runs_through_the_pipeline_and_the_serve_graph(real_size_dir, tmp_path):
    import gc

    import openai

    from t2v.serve.process import serve_shipped_config
    from t2v.video import probe

    bundle = load(real_size_dir, runtime=RuntimeOptions.parse(memory="vae_tiling:32", cache="first_block:0.05"))
    assert sum(p.numel() for p in bundle.denoiser.parameters()) / 1e9 == pytest.approx(1.419, abs=0.001)
    out = t2v.TextToVideoPipeline(bundle)("a red ball", seed=1, output_type="np")
    assert out.frames.shape == (1, 5, 64, 64, 3)
    frames = out.frames[0]
    del bundle, out
    gc.collect()
    # The Serve graph: the TextEncoder and the Decoder read only their weights; the cached Denoiser the rest.
    serve = serve_shipped_config(tmp_path, str(real_size_dir), denoiser_replicas=1, args=dict(
        fan_out=False, runtime={"memory": ["vae_tiling:32"], "cache": "first_block:0.05"}),
        settings={"poll_after_ms": 500})
    try:
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)
        video = c.videos.create_and_poll(prompt="a red ball", size="64x64", seconds="0.25",
                                         extra_body={"seed": 1, "num_inference_steps": 2, "optimize_prompt": False},
                                         poll_interval_ms=1000, timeout=600)
        assert video.status == "completed", video.error
        info = probe(c.videos.download_content(video.id).read())
        assert (info.width, info.height, info.num_frames) == (64, 64, 5)
        # The graph's three stages, each with its own weights and the cache and tiles on, make the video this
        # process made: its thumbnail (the middle frame, a lossless PNG) is that frame, to a level of rounding.
        from io import BytesIO

        from PIL import Image

        middle = np.asarray(Image.open(BytesIO(c.videos.download_content(video.id, variant="thumbnail").read())))
        assert middle.shape == (64, 64, 3) and np.abs(middle.astype(int) - frames[2]).max() <= 1
        assert frames.std() > 1  # not one flat colour: the comparison has something to compare
    finally:
        serve.stop()
