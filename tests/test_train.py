"""The plain training loop: both stages, both families, resume, EMA (no Ray)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import t2v
from t2v.data.shards import WorldSpec, write_world
from t2v.train import EMA, FolderCheckpoints, TrainConfig, shard_batches, train
from t2v.video import probe
from t2v.train.loop import build_bundle, data_columns, video_tensor
from t2v.sampling import frame_correlated_noise
from t2v.train.losses import flow_matching_pair, flow_x0, offset_noise, shifted_sigmas, temporal_difference_loss

TINY_BUNDLE = dict(num_frames=9, height=32, width=32, fps=8, num_inference_steps=4, max_sequence_length=64)


@pytest.fixture(scope="module")
def world32(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "world32")
    write_world(path, WorldSpec(clips=32, shards=2, width=32, height=32, num_frames=9), parallel=False)
    return path


def config(tmp_path, data, **kw):
    base = dict(family="wan", preset="tiny", data=data, out=str(tmp_path / "model"),
                checkpoint_dir=str(tmp_path / "ckpt"), steps=30, batch_size=4, lr=2e-3, warmup_steps=3,
                num_frames=9, size=32, checkpoint_every=10, log_every=5, bundle_config=TINY_BUNDLE)
    return TrainConfig(**{**base, **kw})


def run(cfg, losses=None, **kw):
    def record(step, metrics):
        if losses is not None:
            losses.append(metrics["loss"])

    return train(cfg, lambda start: shard_batches(cfg.data, cfg.batch_size, start, columns=data_columns(cfg),
                                                  num_frames=cfg.num_frames, width=cfg.size, height=cfg.size),
                 FolderCheckpoints(cfg.checkpoint_dir), on_step=record, **kw)


def test_flow_matching_algebra():
    x0, noise = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x_t, v = flow_matching_pair(x0, noise, sigma)
    assert torch.allclose(flow_x0(x_t, v, sigma), x0, atol=1e-6)
    assert torch.allclose(shifted_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    assert temporal_difference_loss(x0, x0) == 0 and temporal_difference_loss(x0 + torch.randn_like(x0), x0) > 0


def test_offset_noise_moves_whole_channels_by_the_offset():
    """noise_offset: each sample's channel gets one shared shift of std `offset`; the rest stays unit noise."""
    torch.manual_seed(0)
    like = torch.zeros(256, 4, 5, 8, 8)
    for offset, mean_std in ((0.0, 1 / 320 ** 0.5), (0.5, (0.25 + 1 / 320) ** 0.5)):
        noise = offset_noise(like, offset)
        means = noise.mean(dim=(2, 3, 4))
        assert abs(means.std().item() - mean_std) < 0.1 * mean_std
        assert abs((noise - means[..., None, None, None]).std().item() - 1.0) < 0.01


def test_frame_correlated_noise_shares_that_share_of_variance_between_frames():
    """frame_noise_correlation: two frames of a clip correlate by it; every pixel stays unit-variance."""
    torch.manual_seed(0)
    noise = torch.randn(64, 4, 5, 16, 16)
    assert frame_correlated_noise(noise, 0.0) is noise
    for correlation in (0.25, 0.5, 0.9):
        mixed = frame_correlated_noise(noise, correlation)
        assert abs(mixed.std().item() - 1.0) < 0.01
        for a, b in ((0, 1), (0, 4), (2, 3)):
            r = torch.corrcoef(torch.stack([mixed[:, :, a].flatten(), mixed[:, :, b].flatten()]))[0, 1].item()
            assert abs(r - correlation) < 0.03
        across_clips = torch.corrcoef(torch.stack([mixed[0].flatten(), mixed[1].flatten()]))[0, 1].item()
        assert abs(across_clips) < 0.05


def test_ema_tracks_weights():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.add_(1.0)
    for step in range(50):
        ema.update(m, step)
    target = torch.nn.Linear(2, 2)
    ema.copy_to(target)
    assert torch.allclose(target.weight, m.weight, atol=1e-4)


@pytest.mark.parametrize("family", ["wan", "unet3d", "latte"])
def test_denoiser_loss_falls_and_bundle_loads(tmp_path, world32, family):
    losses = []
    cfg = config(tmp_path, world32, family=family, steps=40, checkpoint_every=40,
                 **({"bundle_config": {**TINY_BUNDLE, "num_frames": 8}} if family == "unet3d" else {}))
    if family == "unet3d":
        cfg.num_frames = 8
    if family == "latte":  # its temporal positions: the clips' 9 frames
        cfg.overrides = {"transformer": {"video_length": 9}}
    run(cfg, losses)
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4])
    pipe = t2v.TextToVideoPipeline.from_pretrained(cfg.out)
    assert pipe.bundle.family.name == family
    assert pipe("a red ball", seed=0).frames.shape[1:4] == (cfg.num_frames, 32, 32)


def test_frame_noise_correlation_is_saved_with_the_bundle_and_kept_by_a_fine_tune(tmp_path, world32):
    """frame_noise_correlation lives in the bundle: set by bundle_config, kept by a run from that bundle."""
    first = config(tmp_path / "a", world32, family="unet3d", steps=2, checkpoint_every=2, num_frames=8,
                   bundle_config={**TINY_BUNDLE, "num_frames": 8, "frame_noise_correlation": 0.5})
    run(first)
    assert t2v.load(first.out).config.frame_noise_correlation == 0.5
    tuned = config(tmp_path / "b", world32, init=first.out, steps=2, checkpoint_every=2, num_frames=8,
                   bundle_config={})
    run(tuned)
    assert t2v.load(tuned.out).config.frame_noise_correlation == 0.5


def recon_error(vae, video) -> float:
    with torch.no_grad():
        return (vae.decode(vae.encode(video).latent_dist.mode()).sample - video).abs().mean().item()


def test_vae_stage_learns_and_sets_latent_statistics(tmp_path, world32):
    cfg = config(tmp_path, world32, stage="vae", steps=40, lr=3e-3, crop=16, crop_frames=5, kl_weight=1e-6)
    video = video_tensor(next(shard_batches(world32, 8, num_frames=9)), "cpu")
    torch.manual_seed(cfg.seed)
    before = recon_error(build_bundle(cfg).vae, video)
    bundle = run(cfg)
    after = recon_error(t2v.load(cfg.out).vae, video)
    assert after < 0.95 * before  # 40 tiny steps improve it ~10% (measured on two seeds); far from converged
    vae = t2v.load(cfg.out).vae.config
    assert vae.latents_mean == pytest.approx(bundle.vae.config.latents_mean)
    assert any(abs(m) > 1e-4 for m in vae.latents_mean) and all(s > 0 for s in vae.latents_std)


def test_resume_continues_from_the_checkpoint(tmp_path, world32):
    cfg = config(tmp_path, world32, steps=20, checkpoint_every=10)
    # One run in two halves: stop after step 10, then a new call with the same checkpoints resumes.
    first = []
    run(config(tmp_path, world32, steps=10, checkpoint_every=10), first)
    resumed = []
    run(cfg, resumed)
    assert len(first) == 10 and len(resumed) == 10  # steps 11..20 only: no step redone
    state = FolderCheckpoints(cfg.checkpoint_dir).latest()
    assert state["step"] == 20 and state["samples_seen"] == 20 * cfg.batch_size
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000010.pt", "step-000020.pt"]


def test_grad_accumulation_counts_samples(tmp_path, world32):
    cfg = config(tmp_path, world32, steps=4, grad_accum=2, checkpoint_every=4)
    run(cfg)
    assert FolderCheckpoints(cfg.checkpoint_dir).latest()["samples_seen"] == 4 * 2 * cfg.batch_size


def test_denoiser_trains_on_precomputed_latents(tmp_path, world32):
    from t2v.data.latents import add_latents
    from t2v.data.shards import latents_from_bytes
    from t2v.data.stream import iter_batches

    torch.manual_seed(0)
    vae_bundle = str(tmp_path / "vae")
    t2v.from_components("wan", t2v.FAMILIES["wan"].build("tiny"), config=TINY_BUNDLE).save(vae_bundle)
    out = str(tmp_path / "latents")
    counts = add_latents(world32, vae_bundle, out, parallel=False)
    assert sum(counts.values()) == 32
    import pyarrow.parquet as pq

    row = pq.read_table(tmp_path / "latents" / "shard-00000-of-00002.parquet").to_pylist()[0]
    bundle = t2v.load(vae_bundle)
    video = next(iter_batches(world32, batch_size=1))
    with torch.no_grad():
        expect = bundle.family.encode(bundle, video_tensor(video, "cpu"))[0].numpy()
    assert row["key"] == video["key"][0]
    np.testing.assert_allclose(latents_from_bytes(row["latents"]), expect, atol=2e-2, rtol=1e-2)

    losses = []
    cfg = config(tmp_path, out, init=vae_bundle, use_latents=True, steps=40, checkpoint_every=40)
    run(cfg, losses)
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4])


TINY_YAML = str(Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml")


def test_config_from_yaml_with_overrides():
    cfg = TrainConfig.from_yaml(TINY_YAML, ["steps=5", "lr=1e-4", "bundle_config={fps: 4}"])
    assert (cfg.steps, cfg.lr, cfg.bundle_config) == (5, 1e-4, {"fps": 4}) and isinstance(cfg.lr, float)
    with pytest.raises(ValueError, match="lr: expected float"):
        TrainConfig.from_yaml(TINY_YAML, ["lr=fast"])
    with pytest.raises(ValueError, match="unknown training config field.*lrr"):
        TrainConfig.from_yaml(TINY_YAML, ["lrr=1"])


def test_plain_loop_command_line(tmp_path, world32):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "t2v.train", "--config", TINY_YAML, f"data={world32}",
                        f"out={tmp_path / 'model'}", f"checkpoint_dir={tmp_path / 'ckpt'}", "steps=3",
                        "checkpoint_every=3", "num_workers=1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"saved {tmp_path / 'model'}" in r.stdout
    assert t2v.load(tmp_path / "model").config.num_frames == 9
    assert FolderCheckpoints(str(tmp_path / "ckpt")).latest()["step"] == 3


def test_time_budget_fits_the_steps_to_the_measured_pace(tmp_path, world32):
    from t2v.train.loop import BUDGET_PROBE_STEPS, fit_steps

    cfg = config(tmp_path, world32, steps=10_000, time_budget_s=100.0)
    # 30 steps done in 12 s, the last 20 at 0.5 s each (the first 10 included warm-up): 88 s left -> 176 more.
    assert fit_steps(cfg, 30, 0, 12.0, 2.0) == 30 + 176
    assert fit_steps(dataclasses.replace(cfg, steps=50), 30, 0, 12.0, 2.0) == 50  # never past cfg.steps
    assert fit_steps(cfg, 30, 0, 120.0, 2.0) == 30  # over budget already: stop now
    # A real run with a budget far too short for its 10,000 steps stops after the probe.
    losses = []
    run(config(tmp_path, world32, steps=10_000, time_budget_s=0.01, checkpoint_every=1000), losses)
    assert len(losses) == 3 * BUDGET_PROBE_STEPS
    assert FolderCheckpoints(str(tmp_path / "ckpt")).latest()["step"] == 3 * BUDGET_PROBE_STEPS


def test_decoder_fine_tune_keeps_the_encoder_and_its_latents(tmp_path, world32):
    first = config(tmp_path / "a", world32, stage="vae", steps=4, crop=16, crop_frames=5)
    run(first)
    cfg = config(tmp_path / "b", world32, stage="vae", vae_trainable="decoder", init=first.out, steps=6, lr=3e-3,
                 crop=16, crop_frames=5)
    run(cfg)
    before, after = t2v.load(first.out).vae, t2v.load(cfg.out).vae
    changed = {name for name, p in before.state_dict().items() if not torch.equal(p, after.state_dict()[name])}
    assert changed and all(name.startswith(("decoder.", "post_quant_conv.")) for name in changed)
    assert after.config.latents_mean == before.config.latents_mean
    with pytest.raises(ValueError, match="vae_trainable"):
        run(config(tmp_path / "c", world32, vae_trainable="encoder", steps=1))


def test_periodic_samples_and_adherence_eval(tmp_path, world32):
    cfg = config(tmp_path, world32, steps=4, sample_every=4, eval_every=2, sample_prompts=2, sample_steps=2)
    reports = []
    train(cfg, lambda start: shard_batches(cfg.data, cfg.batch_size, start, num_frames=9, width=32, height=32),
          FolderCheckpoints(cfg.checkpoint_dir), on_step=lambda step, m: reports.append(m))
    scored = [m for m in reports if any(k.startswith("adherence/") for k in m)]
    assert [m["step"] for m in scored] == [2, 4]
    # Step 4 is the last: the bundle saved at the end holds the EMA weights the eval and the samples used then.
    # Evaluated afresh on the same 2 held-out prompts, it gives the same adherence, attribute by attribute (each a
    # share of the prompts of its kind), and the same frames as the samples written at that step. (After 4 steps
    # the model draws noise and nearly every attribute is a miss: the samples' pixels are what pin the weights.)
    from PIL import Image

    from t2v.quality.evaluate import contact_sheet, eval_prompts, evaluate

    result = evaluate(t2v.TextToVideoPipeline.from_pretrained(cfg.out), "heldout", 2, 2, sheet_rows=2)
    want = {f"adherence/{kind}/{attribute}": result.accuracy(kind, attribute) for kind, attribute in result.hits}
    assert {k: v for k, v in scored[1].items() if k.startswith("adherence/")} == want
    kinds = ["one" if len(scene.objects) == 1 else "two" for _, scene in eval_prompts("heldout", 2, width=32,
                                                                                      height=32, num_frames=9)]
    assert f"adherence/{kinds[0]}/background" in scored[0] and f"adherence/{kinds[1]}/background" in scored[0]
    for m in scored:
        for k, v in m.items():
            if k.startswith("adherence/"):
                assert v * kinds.count(k.split("/")[1]) in (0, 1, 2), (k, v)  # hits out of that many prompts
    folder = Path(cfg.out) / "samples" / "step-000004"
    videos = sorted(folder.glob("*.mp4"))
    assert len(videos) == 2 and probe(videos[0]).num_frames == 9
    assert [line.split("\t") for line in (folder / "prompts.txt").read_text().splitlines()] == \
        [[f"{i:02d}.mp4", prompt] for i, (prompt, _) in enumerate(result.rows)]
    contact_sheet(result.rows, str(tmp_path / "sheet.png"))  # a lossless PNG, unlike the mp4s
    sheets = [np.asarray(Image.open(path)) for path in (folder / "sheet.png", tmp_path / "sheet.png")]
    assert np.array_equal(*sheets)
    assert not (Path(cfg.out) / "samples" / "step-000002").exists()  # eval only at step 2: no files


def test_weighted_vae_loss_counts_object_pixels_more():
    from types import SimpleNamespace

    from t2v.train.losses import vae_loss

    target = torch.zeros(2, 3, 5, 8, 8)
    recon = target.clone()
    recon[:, :, :, :2, :2] = 0.5  # wrong only on a small "object"
    posterior = SimpleNamespace(kl=lambda: torch.zeros(2))
    plain, _ = vae_loss(recon, target, posterior, 0.0)
    same, _ = vae_loss(recon, target, posterior, 0.0, torch.ones(2, 1, 5, 8, 8))
    assert torch.allclose(plain, same)
    weight = torch.ones(2, 1, 5, 8, 8)
    weight[:, :, :, :2, :2] = 16.0  # the object weighs as much as the other 60 pixels together
    weighted, _ = vae_loss(recon, target, posterior, 0.0, weight)
    err = 0.5 + 0.25
    assert weighted.item() == pytest.approx(err * 16 * 4 / (16 * 4 + 60))
    assert weighted > 5 * plain


def test_area_balanced_object_weights_count_a_small_object_as_much_as_a_large_one():
    from t2v.train.losses import object_pixel_weights

    masks = torch.zeros(2, 3, 16, 16, dtype=torch.bool)
    masks[0, :, :2, :2] = True  # a small object: 4 of 256 pixels
    masks[1, :, :8, :8] = True  # a large one: 64
    plain = object_pixel_weights(masks, 5.0)
    assert plain.shape == (2, 1, 3, 16, 16) and set(plain.unique().tolist()) == {1.0, 6.0}
    balanced = object_pixel_weights(masks, 5.0, area_ref=0.05)
    total = [(balanced[i] - 1).sum().item() for i in range(2)]  # each clip's extra weight on its objects
    assert total[0] == pytest.approx(total[1], rel=1e-5)  # the same, whatever the object's size
    assert balanced[0, 0, 0, 5, 5] == 1.0  # the background keeps weight 1
    tiny = torch.zeros(1, 3, 16, 16, dtype=torch.bool)
    tiny[0, :, 0, 0] = True  # 1 pixel: the scale stops at 8
    assert object_pixel_weights(tiny, 5.0, area_ref=0.5).max().item() == pytest.approx(1 + 5 * 8)


def test_object_weight_margin_makes_drawing_an_object_too_large_cost_as_much_as_too_small():
    from t2v.train.losses import object_pixel_weights, weighted_mse

    masks = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    masks[0, 0, 6:10, 6:10] = True  # a 4x4 object in frame 0 only
    target = masks[:, None].float()
    too_small, too_large = target.clone(), target.clone()
    too_small[..., 0, 6:8, 6:8] = 0.0  # 4 of its cells missed
    too_large[..., 0, 5, 6:10] = 1.0  # 4 cells of background beside it drawn as object

    def cost(prediction, margin):
        return weighted_mse(prediction, target, object_pixel_weights(masks, 5.0, area_ref=0.05, margin=margin)).item()

    assert cost(too_small, 0) > 5 * cost(too_large, 0)  # a weight on the object alone: growing it is cheap
    assert cost(too_small, 1) == pytest.approx(cost(too_large, 1))
    weights = object_pixel_weights(masks, 5.0, area_ref=0.05, margin=1)[0, 0]
    object_weight = object_pixel_weights(masks, 5.0, area_ref=0.05)[0, 0, 0, 6, 6]
    assert (weights[0, 5:11, 5:11] == object_weight).all()  # the object and a ring of one cell, at the object's scale
    assert weights[0, 4, 6] == 1.0 and weights[0, 11, 11] == 1.0  # beyond the ring, the background's 1
    assert (weights[1] == 1.0).all()  # frames are not widened into each other


def test_object_weight_margin_below_0_is_refused(tmp_path):
    cfg = config(tmp_path, "", family="unet3d", use_latents=True, steps=1, object_weight=3.0, object_weight_margin=-1)
    with pytest.raises(ValueError, match="object_weight_margin: .*0 or more, got -1"):
        train(cfg, lambda start: iter(()), FolderCheckpoints(cfg.checkpoint_dir))


def test_edge_loss_sees_a_rounded_corner_that_costs_little_in_pixels():
    """A square decoded with one corner pixel missing: few pixels wrong, but its edges are off."""
    from types import SimpleNamespace

    from t2v.train.losses import vae_loss

    target = torch.zeros(1, 3, 1, 16, 16)
    target[..., 4:12, 4:12] = 1.0
    recon = target.clone()
    recon[..., 4, 4] = 0.0
    posterior = SimpleNamespace(kl=lambda: torch.zeros(1))
    plain, parts = vae_loss(recon, target, posterior, 0.0)
    assert "edge" not in parts
    sharp, parts = vae_loss(recon, target, posterior, 0.0, edge_weight=1.0)
    assert parts["edge"] > 0 and sharp.item() == pytest.approx(plain.item() + parts["edge"])
    assert vae_loss(target, target, posterior, 0.0, edge_weight=1.0)[1]["edge"] == 0.0


def test_object_crops_hold_the_object_pixel_they_are_centred_on():
    import random

    from t2v.train.loop import crop_window

    rng = random.Random(0)
    for _ in range(200):
        at = (rng.randrange(17), rng.randrange(128), rng.randrange(128))
        f, y, x = crop_window((1, 3, 17, 128, 128), 64, 17, rng, around=at)
        assert (f.stop - f.start, y.stop - y.start, x.stop - x.start) == (17, 64, 64)
        assert f.start <= at[0] < f.stop and y.start <= at[1] < y.stop and x.start <= at[2] < x.stop
    assert crop_window((1, 3, 9, 32, 32), 64, None, rng) == (slice(0, 9), slice(0, 32), slice(0, 32))


def test_vae_stage_with_object_weighting_trains_on_masked_rendered_clips(tmp_path):
    from t2v.data.rendered import RenderedWorld, RenderSpec
    from t2v.world.render import object_masks

    world = RenderedWorld(8, RenderSpec(num_frames=9, size=32, chunk=4, masks=True), workers=1).start()
    try:
        world.wait(timeout=120)
        item = world.items()[0]
        video, scene = world.clip(item)
        assert np.array_equal(world.mask(item), object_masks(scene, video))
        batch = next(world.batches(3))
        assert batch["mask"].shape == (3, 9, 32, 32)
        # The step weighs what it crops by the masks: same crops (same rng), same noise, other loss.
        import random

        from t2v.train.loop import build_bundle, vae_step

        bundle = build_bundle(config(tmp_path, "", stage="vae"))
        recon = {}
        for weight in (0.0, 8.0):
            torch.manual_seed(0)
            step_cfg = config(tmp_path, "", stage="vae", crop=16, crop_frames=5, object_weight=weight, object_crops=1.0)
            recon[weight] = vae_step(bundle, bundle.vae, batch, step_cfg, random.Random(1), "cpu")[1]["recon"]
        assert recon[8.0] != pytest.approx(recon[0.0], rel=1e-3)
        cfg = config(tmp_path, "", stage="vae", steps=3, crop=16, crop_frames=5, object_weight=8.0,
                     object_crops=1.0, checkpoint_every=3)
        losses = []
        train(cfg, lambda start: world.batches(cfg.batch_size, seed=start), FolderCheckpoints(cfg.checkpoint_dir),
              on_step=lambda step, m: losses.append(m["loss"]))
        assert len(losses) == 3 and all(np.isfinite(losses))
    finally:
        world.close()
    with pytest.raises(ValueError, match="object_weight / object_crops need the objects' masks"):
        unmasked = [{"video": np.zeros((2, 9, 32, 32, 3), np.uint8), "caption": np.array(["", ""])}] * 2
        train(config(tmp_path / "no-masks", "", stage="vae", steps=1, object_weight=4.0),
              lambda start: iter(unmasked), FolderCheckpoints(str(tmp_path / "no-masks-ckpt")))


def test_latent_object_share_is_the_share_of_each_latent_cell_the_objects_cover():
    from t2v.train.losses import latent_object_share, weighted_mse

    masks = torch.zeros(1, 4, 16, 16, dtype=torch.bool)
    masks[0, :2, 0:4, 0:4] = True  # a whole 4x4 cell of a 4x4 grid, in the first two frames
    masks[0, :, 8:10, 12:16] = True  # half of another cell, in every frame
    share = latent_object_share(masks, (4, 4, 4))
    assert share.shape == (1, 4, 4, 4)
    assert share[0, :2, 0, 0].tolist() == [1.0, 1.0] and share[0, 2:, 0, 0].tolist() == [0.0, 0.0]
    assert share[0, :, 2, 3].tolist() == [0.5] * 4
    assert share.sum() == 2 * 1.0 + 4 * 0.5  # nothing else: the background's cells are 0
    # a VAE that compresses time 2x: pairs of frames pool into one latent frame
    assert latent_object_share(masks, (2, 4, 4))[0, :, 0, 0].tolist() == [1.0, 0.0]
    # weighted MSE: a fully covered cell counts 1 + w times a background cell
    pred, target = torch.zeros(1, 1, 1, 1, 4), torch.tensor([[[[[1.0, 0.0, 0.0, 0.0]]]]])
    weight = torch.tensor([[[[[4.0, 1.0, 1.0, 1.0]]]]])
    assert weighted_mse(pred, target, weight) == pytest.approx(4 / 7)
    assert weighted_mse(pred, target, torch.ones_like(weight)) == weighted_mse(pred, target) == 0.25


def test_denoiser_stage_weighs_the_latent_cells_its_objects_cover(tmp_path):
    """object_weight on the denoiser stage: encoded clips carry their objects' share of each latent cell, batches
    carry it beside the latents, and the step's MSE weighs those cells by 1 + object_weight x share."""
    import random

    from t2v.data.rendered import RenderedWorld, RenderSpec, encode_rendered, latent_batches
    from t2v.families import FAMILIES
    from t2v.train.loop import denoiser_step
    from t2v.train.losses import latent_object_share

    cfg = config(tmp_path, "", family="unet3d", use_latents=True, prediction="v_prediction", steps=3,
                 checkpoint_every=3, object_weight=8.0)
    bundle = build_bundle(cfg)
    world = RenderedWorld(8, RenderSpec(num_frames=9, size=32, chunk=4, masks=True), workers=1).start()
    try:
        world.wait(timeout=120)
        encoded = encode_rendered(bundle, world)
        items = world.items()
        grid = encoded.latents.shape[2:]
        assert encoded.object_share.shape == (8, *grid)
        for i, item in enumerate(items):
            expected = latent_object_share(torch.as_tensor(world.mask(item))[None], grid)[0]
            assert torch.allclose(encoded.object_share[i].float(), expected, atol=1e-3)
            assert 0 < encoded.object_share[i].float().mean() < 0.5  # objects, on a background larger than they are
    finally:
        world.close()
    batch = next(latent_batches(encoded, 3, seed=1))
    for latents, share in zip(batch["latents"], batch["object_share"]):
        row = next(i for i in range(8) if torch.equal(encoded.latents[i].float(), latents))
        assert torch.equal(encoded.object_share[row].float(), share)

    objective = FAMILIES["unet3d"].training_objective(bundle, cfg)

    def mse(step_cfg, step_batch):
        torch.manual_seed(0)
        return denoiser_step(bundle, step_batch, step_cfg, random.Random(0), "cpu", objective)[1]["mse"]

    plain = mse(dataclasses.replace(cfg, object_weight=0.0), batch)
    assert mse(cfg, batch) != pytest.approx(plain, rel=1e-3)
    assert mse(cfg, {**batch, "object_share": torch.zeros_like(batch["object_share"])}) == pytest.approx(plain)
    losses = []
    train(cfg, lambda start: latent_batches(encoded, cfg.batch_size, seed=start),
          FolderCheckpoints(cfg.checkpoint_dir), on_step=lambda step, m: losses.append(m["loss"]))
    assert len(losses) == 3 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="object_weight: the denoiser stage needs the objects' masks"):
        mse(cfg, {k: v for k, v in batch.items() if k != "object_share"})


def test_a_unet3d_run_trains_the_prediction_its_model_makes_unless_told_otherwise():
    """A run from a v-prediction model (the embedded one) trains v, e.g. a LoRA on it; `prediction` overrides."""
    from diffusers import DDIMScheduler

    from conftest import build_tiny
    from t2v.families import UNET3D

    bundle = build_tiny(UNET3D)
    bundle.scheduler = DDIMScheduler.from_config(bundle.scheduler.config, prediction_type="v_prediction")
    x0, noise, level = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4), torch.tensor([0.3, 0.8])
    _, t, target = UNET3D.training_objective(bundle, TrainConfig(family="unet3d")).pair(x0, noise, level)
    assert torch.allclose(target, bundle.scheduler.get_velocity(x0, noise, t))
    _, _, target = UNET3D.training_objective(bundle, TrainConfig(family="unet3d", prediction="epsilon")).pair(
        x0, noise, level)
    assert torch.equal(target, noise)


def test_a_scheduler_override_on_an_init_bundle_fine_tunes_it_to_a_zero_terminal_snr_schedule(unet3d_dir):
    """`overrides.scheduler` on an `init` bundle: the run trains (and saves) that schedule, e.g. zero terminal SNR,
    where the last timestep is pure noise: its v target is the clean clip (negated) and x0 recovered from v there
    is exact, with no division by alpha."""
    from t2v.families import UNET3D

    cfg = TrainConfig(family="unet3d", init=str(unet3d_dir), prediction="v_prediction",
                      overrides={"scheduler": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}})
    bundle = build_bundle(cfg)
    assert bundle.scheduler.config.rescale_betas_zero_snr and bundle.scheduler.config.timestep_spacing == "trailing"
    assert not t2v.load(unet3d_dir).scheduler.config.rescale_betas_zero_snr  # the init's own was not
    objective = UNET3D.training_objective(bundle, cfg)
    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    x_t, t, target = objective.pair(x0, noise, torch.tensor([0.9999, 0.5]))
    assert t[0] == 999 and torch.allclose(x_t[0], noise[0]) and torch.allclose(target[0], -x0[0], atol=1e-6)
    assert torch.allclose(objective.clean(x_t, target, t), x0, atol=1e-4)  # finite at SNR 0 too


def test_a_transformer_design_trains_on_a_unet_models_vae(unet3d_dir, wan_dir):
    """family latte with a transformer design in overrides, init a unet3d bundle: a fresh Latte transformer on
    that bundle's own (trained) per-frame VAE, saved as a LattePipeline bundle; a VAE the family cannot take is
    refused, naming both."""
    from t2v.families import LATTE

    cfg = TrainConfig(family="latte", preset="tiny", init=str(unet3d_dir), prediction="v_prediction",
                      overrides={"transformer": {"video_length": 4}, "vae": {"latent_channels": 4}})
    bundle = build_bundle(cfg)
    init = t2v.load(unet3d_dir)
    assert bundle.family is LATTE and type(bundle.denoiser).__name__ == "LatteTransformer3DModel"
    assert all(torch.equal(a, b) for a, b in zip(bundle.vae.state_dict().values(), init.vae.state_dict().values()))
    assert bundle.scheduler.config.prediction_type == "v_prediction"
    video = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    assert torch.equal(LATTE.encode(bundle, video), init.family.encode(init, video))  # the same latents
    with pytest.raises(ValueError, match="family: latte.*AutoencoderKL.*AutoencoderKLWan"):
        build_bundle(dataclasses.replace(cfg, init=str(wan_dir)))


def coded_latents(clips: list[int], frames: int, channels: int = 4, side: int = 4) -> dict:
    """A latents batch whose every value tells its clip and frame (clip x 100 + frame), with captions and object
    shares coded the same way."""
    code = torch.tensor([[c * 100 + f for f in range(frames)] for c in clips], dtype=torch.float32)
    return {"latents": code[:, None, :, None, None].expand(-1, channels, -1, side, side).clone(),
            "object_share": code[:, :, None, None].expand(-1, -1, side, side).clone(),
            "caption": np.array([f"clip {c}" for c in clips])}


def test_stills_are_one_frame_of_each_clip_with_its_own_caption_and_object_share(tmp_path):
    import itertools
    import random

    from t2v.train.loop import still_batch

    bundle = build_bundle(config(tmp_path, "", family="unet3d", use_latents=True))
    counter = itertools.count()
    batches = iter(lambda: coded_latents([next(counter) for _ in range(3)], frames=5), None)
    stills = still_batch(batches, 7, bundle, random.Random(0))  # 3 batches of 3 clips drawn, the first 7 kept
    assert stills["latents"].shape == (7, 4, 1, 4, 4) and stills["object_share"].shape == (7, 1, 4, 4)
    for i, (latents, share, caption) in enumerate(zip(stills["latents"], stills["object_share"], stills["caption"])):
        clip, frame = divmod(int(latents[0, 0, 0, 0]), 100)
        assert clip == i and caption == f"clip {i}"  # each still comes from its own clip, in order
        assert torch.all(latents == latents[0, 0, 0, 0]) and torch.all(share == clip * 100 + frame)
    many = still_batch(batches, 60, bundle, random.Random(1))
    assert {int(v) % 100 for v in many["latents"][:, 0, 0, 0, 0]} == set(range(5))  # any frame of a per-frame VAE

    # A causal VAE (wan) codes only its first frame alone: its stills are latent frame 0.
    wan = build_bundle(config(tmp_path, ""))
    assert list(wan.family.still_latent_frames(wan, 5)) == [0]
    assert {int(v) % 100 for v in still_batch(batches, 30, wan, random.Random(2))["latents"][:, 0, 0, 0, 0]} == {0}

    # Clips as pixels: any frame, with its mask.
    video = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6, 1, 1, 1) * np.ones((1, 1, 8, 8, 3), np.uint8)
    pixels = still_batch(iter([{"video": video, "mask": video[..., 0] % 2 == 0, "caption": np.array(list("abcd"))}]),
                         4, wan, random.Random(3))
    assert pixels["video"].shape == (4, 1, 8, 8, 3) and pixels["mask"].shape == (4, 1, 8, 8)
    for i, (frame, mask) in enumerate(zip(pixels["video"], pixels["mask"])):
        assert int(frame[0, 0, 0, 0]) // 6 == i and torch.equal(mask, frame[..., 0] % 2 == 0)


def test_every_image_every_th_step_trains_on_stills(tmp_path):
    cfg = config(tmp_path, "", family="unet3d", use_latents=True, steps=6, checkpoint_every=6, image_every=3,
                 image_batch=5)
    frames, seen = [], []

    def latents_batches(start):
        while True:
            yield {"latents": torch.randn(cfg.batch_size, 4, 3, 4, 4), "caption": np.array(["a red circle"] * 4)}

    def record(step, metrics):
        frames.append(metrics["frames"])
        seen.append(metrics["samples_seen"])

    train(cfg, latents_batches, FolderCheckpoints(cfg.checkpoint_dir), on_step=record)
    assert frames == [3, 3, 1, 3, 3, 1]
    assert seen == [4, 8, 13, 17, 21, 26]  # a step of stills counts the clips it drew a frame from
    with pytest.raises(ValueError, match="image_every: stills train the denoiser stage, not 'vae'"):
        train(dataclasses.replace(cfg, stage="vae"), latents_batches, FolderCheckpoints(str(tmp_path / "c2")))
    with pytest.raises(ValueError, match="image_every: stills are one-frame clips; this latte model takes at "
                                         "least 5 frames"):
        train(dataclasses.replace(cfg, family="latte"), latents_batches, FolderCheckpoints(str(tmp_path / "c3")))


def test_object_weight_below_level_weighs_only_the_clips_noised_below_it():
    from t2v.train.loop import object_latent_weights

    share = torch.zeros(4, 2, 3, 3)
    share[:, :, 1, 1] = 0.5  # an object covers half of one cell in each frame
    batch = {"object_share": share}
    x0 = torch.zeros(4, 8, 2, 3, 3)
    levels = torch.tensor([0.1, 0.59, 0.6, 0.95])
    cfg = TrainConfig(object_weight=4.0, object_weight_below_level=0.6)
    weight = object_latent_weights(batch, x0, cfg, levels)
    assert weight.shape == (4, 1, 2, 3, 3)
    assert torch.allclose(weight[:2, 0, :, 1, 1], torch.full((2, 2), 3.0))  # 1 + 4 x 0.5 below the level
    assert torch.equal(weight[2:], torch.ones(2, 1, 2, 3, 3))  # plain loss at and above it
    assert torch.equal(weight[:, 0, :, 0, 0], torch.ones(4, 2))  # the background weighs 1 at every level
    everywhere = object_latent_weights(batch, x0, TrainConfig(object_weight=4.0), levels)
    assert torch.allclose(everywhere[:, 0, :, 1, 1], torch.full((4, 2), 3.0))


def test_object_weight_below_level_outside_0_to_1_is_refused(tmp_path):
    cfg = config(tmp_path, "", family="unet3d", use_latents=True, steps=1, object_weight=3.0,
                 object_weight_below_level=60)
    with pytest.raises(ValueError, match="object_weight_below_level: a noise level in 0..1 .*got 60"):
        train(cfg, lambda start: iter(()), FolderCheckpoints(cfg.checkpoint_dir))


def test_object_weight_until_weighs_the_objects_in_the_steps_before_it_only(tmp_path):
    """The weight needs each batch's object shares: batches that carry them for the first two steps only train
    with object_weight_until=2, and fail on the third step without it."""
    import itertools

    def batches(start):
        for i in itertools.count(start):
            batch = {"latents": torch.randn(4, 4, 3, 4, 4), "caption": np.array(["a red circle"] * 4)}
            yield {**batch, "object_share": torch.rand(4, 3, 4, 4)} if i < 2 else batch

    cfg = config(tmp_path, "", family="unet3d", use_latents=True, steps=4, checkpoint_every=4, object_weight=3.0,
                 object_weight_until=2)
    steps = []
    train(cfg, lambda start: batches(0), FolderCheckpoints(cfg.checkpoint_dir), on_step=lambda s, m: steps.append(s))
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="object_weight: the denoiser stage needs the objects' masks"):
        train(dataclasses.replace(cfg, object_weight_until=3, checkpoint_dir=str(tmp_path / "c2")),
              lambda start: batches(0), FolderCheckpoints(str(tmp_path / "c2")))


def test_guidance_distillation_trains_a_student_to_the_teachers_guided_prediction(tmp_path, unet3d_dir):
    """guidance_range: the denoiser becomes a student that takes the scale; it starts as the teacher's
    conditional prediction (the scale's input weighs nothing yet) and learns the teacher's classifier-free
    guidance at each scale; the bundle it saves records the range."""
    from t2v.sampling import classifier_free_guidance, predict_guided
    from t2v.train.distill import guided_target

    teacher = t2v.load(unet3d_dir)
    x0 = torch.randn(4, 4, 4, 16, 16)
    batch = {"latents": x0, "caption": np.array(["a red ball", "a blue square", "a green ring", "a red ball"])}
    cfg = TrainConfig(family="unet3d", init=str(unet3d_dir), use_latents=True, guidance_range=[1.0, 6.0], steps=60,
                      batch_size=4, lr=1e-3, warmup_steps=3, ema_decay=0.0, text_dropout=0.0, num_frames=4,
                      size=32, checkpoint_every=60, out=str(tmp_path / "student"),
                      checkpoint_dir=str(tmp_path / "ckpt"))
    e = teacher.family.encode_prompt(teacher, list(batch["caption"]), 32)
    empty = teacher.family.encode_prompt(teacher, [""] * 4, 32)
    objective = teacher.family.training_objective(teacher, cfg)

    def distillation_error(student) -> tuple[float, float]:
        """Mean squared distance of the student's prediction, and of the teacher's conditional one, from the
        teacher's guided prediction, over noised copies of the batch at random levels and scales."""
        g = torch.Generator().manual_seed(0)
        ours, conds = [], []
        with torch.no_grad():
            for _ in range(6):
                x_t, t, _ = objective.pair(x0, torch.randn(x0.shape, generator=g), torch.rand(4, generator=g))
                scale = 1.0 + 5.0 * torch.rand(4, generator=g)
                want = guided_target(teacher, x_t, t, e, scale)
                cond = teacher.family.predict(teacher, x_t, t, e)
                assert torch.allclose(want, classifier_free_guidance(teacher.family.predict(teacher, x_t, t, empty),
                                                                     cond, scale.view(-1, 1, 1, 1, 1)), atol=1e-5)
                ours.append((student.family.predict(student, x_t, t, e, guidance=scale) - want).pow(2).mean())
                conds.append((cond - want).pow(2).mean())
        return float(torch.stack(ours).mean()), float(torch.stack(conds).mean())

    start = build_bundle(cfg)
    start.denoiser = start.family.with_guidance_input(start.denoiser).eval()
    before, cond_error = distillation_error(start)
    assert before == pytest.approx(cond_error, rel=1e-4) and cond_error > 0  # it starts as the conditional one
    student = train(cfg, lambda start: itertools.repeat(batch), FolderCheckpoints(cfg.checkpoint_dir))
    after, _ = distillation_error(student)
    assert after < 0.5 * before
    # and it follows the scale: between scales 1 and 6 its prediction moves as the teacher's guided one does
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x_t, t, _ = objective.pair(x0, torch.randn(x0.shape, generator=g), torch.rand(4, generator=g))
        ones = torch.ones(4)
        moved = (student.family.predict(student, x_t, t, e, guidance=6 * ones)
                 - student.family.predict(student, x_t, t, e, guidance=ones))
        want_moved = guided_target(teacher, x_t, t, e, 6 * ones) - guided_target(teacher, x_t, t, e, ones)
    # (one that ignores the scale does not move: its error is the whole move; 60 steps learn about a third of it)
    assert (moved - want_moved).pow(2).mean() < 0.8 * want_moved.pow(2).mean()
    saved = t2v.load(cfg.out)
    assert saved.config.guidance_range == [1.0, 6.0] and saved.family.guidance_input(saved)
    x_t, t = torch.randn(1, 4, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():  # the pipeline's prediction at 5: the student's one forward
        assert torch.allclose(predict_guided(saved, x_t, t, e[:1], 5.0),
                              student.family.predict(student, x_t, t, e[:1], guidance=torch.tensor([5.0])), atol=1e-4)
    with pytest.raises(ValueError, match="guidance_range: distils a trained denoiser"):
        train(dataclasses.replace(cfg, init=None), lambda start: itertools.repeat(batch),
              FolderCheckpoints(str(tmp_path / "c2")))
    with pytest.raises(ValueError, match=r"guidance_range: \[lowest, highest\]"):
        train(dataclasses.replace(cfg, guidance_range=[0.5, 6.0]), lambda start: itertools.repeat(batch),
              FolderCheckpoints(str(tmp_path / "c3")))
