"""One plain PyTorch training loop for both stages and both families. Ray Train (`ray.py`) runs this same
function on N workers; without Ray it runs as is (`python -m t2v.train --config ...`)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import itertools
import logging
import math
import random
import time
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from .. import lora, storage
from ..bundle import Bundle, BundleConfig, from_components, load
from ..data.stream import video_tensor
from ..sampling import frame_correlated_noise, predict_guided
from ..families import FAMILIES, DenoisingObjective
from .config import TrainConfig
from . import distill
from .losses import (latent_object_share, object_pixel_weights, offset_noise, temporal_difference_loss, vae_loss,
                     weighted_mse)

log = logging.getLogger("t2v.train")


class CheckpointStore(Protocol):
    def latest(self) -> dict | None: ...
    def save(self, state: dict, step: int, metrics: dict) -> None: ...
    def report(self, metrics: dict) -> None: ...


class FolderCheckpoints:
    """Checkpoints as `step-000123.pt` files in a local folder or s3:// prefix; keeps the newest `keep`."""

    def __init__(self, uri: str, keep: int = 2):
        self.uri, self.keep = uri, keep

    def steps(self) -> list[int]:
        """The steps of the checkpoints kept, oldest first."""
        if not storage.exists(self.uri):
            return []
        return sorted(int(n[5:-3]) for n in storage.list_files(self.uri) if n.startswith("step-") and n.endswith(".pt"))

    def latest(self) -> dict | None:
        steps = self.steps()
        if not steps:
            return None
        data = storage.read_bytes(storage.join(self.uri, f"step-{steps[-1]:06d}.pt"))
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def save(self, state: dict, step: int, metrics: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(storage.join(self.uri, f"step-{step:06d}.pt"), buf.getvalue())
        for old in self.steps()[: -self.keep]:
            storage.delete(storage.join(self.uri, f"step-{old:06d}.pt"))

    def report(self, metrics: dict) -> None:
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


class EMA:
    """Exponential moving average of a model's floating-point weights (with the usual warm-up)."""

    def __init__(self, model: torch.nn.Module, decay: float, keys=None):
        self.decay = decay  # keys: only these state entries (an adapter's weights), else every floating one
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point() and (keys is None or k in keys)}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def copy_to(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        model.load_state_dict({k: self.shadow[k].to(state[k].dtype) if k in self.shadow else v for k, v in state.items()})


# --- building blocks --------------------------------------------------------------------------------

def build_bundle(cfg: TrainConfig) -> Bundle:
    """The bundle a run starts from: `init`, or the family's preset with `overrides`. With both, where `overrides`
    names the denoiser, the denoiser is a fresh one of the preset with those overrides, on `init`'s VAE (a
    denoiser design trained on a VAE already trained)."""
    if cfg.init:
        bundle = load(cfg.init, device="cpu")
        if bundle.denoiser_2 is not None:  # one expert trained alone would no longer match its partner's steps
            raise ValueError(f"init: {cfg.init} is a mixture of experts (Wan2.2 A14B); t2v trains models of one "
                             "denoiser")
        bundle.config = dataclasses.replace(bundle.config, **cfg.bundle_config)
        if "scheduler" in cfg.overrides:  # e.g. a zero-terminal-SNR schedule: the model is fine-tuned to it
            bundle.scheduler = type(bundle.scheduler).from_config(bundle.scheduler.config, **cfg.overrides["scheduler"])
        # A denoiser design in overrides: a fresh denoiser of it on init's trained VAE, of init's family or of
        # another family whose models take the same VAE (a transformer on a U-Net model's per-frame VAE).
        family = FAMILIES[cfg.family] if FAMILIES[cfg.family].denoiser_key in cfg.overrides else bundle.family
        if family.denoiser_key in cfg.overrides:
            if cfg.lora_rank:
                raise ValueError(f"overrides.{family.denoiser_key}: a LoRA run trains an adapter on init's "
                                 "denoiser; a denoiser design in overrides would replace it")
            log.info("a fresh %s %s of the given design on %s's VAE", family.name, family.denoiser_key, cfg.init)
            fresh = family.build(cfg.preset, text_dim=bundle.text_encoder.config.hidden_size,
                                 **_overrides(cfg, family))
            if type(fresh["vae"]) is not type(bundle.vae):
                raise ValueError(f"family: {family.name} models take a {type(fresh['vae']).__name__}; {cfg.init}'s "
                                 f"VAE is a {type(bundle.vae).__name__}")
            side = bundle.family.spatial_factor(bundle)
            with torch.no_grad():
                channels = bundle.family.encode(bundle, torch.zeros(1, 3, 1, side, side)).shape[1]
            denoiser = fresh[family.denoiser_key].eval()
            if denoiser.config.in_channels != channels:
                raise ValueError(f"overrides: the new {family.denoiser_key} takes {denoiser.config.in_channels} "
                                 f"latent channels; {cfg.init}'s VAE makes {channels}")
            bundle = dataclasses.replace(bundle, family=family, denoiser=denoiser, scheduler=fresh["scheduler"],
                                         config=BundleConfig.from_dict(family, dataclasses.asdict(bundle.config)))
        return bundle
    family = FAMILIES[cfg.family]
    return from_components(family, family.build(cfg.preset, **_overrides(cfg, family)), config=cfg.bundle_config)


def _overrides(cfg: TrainConfig, family) -> dict:
    overrides = copy.deepcopy(cfg.overrides)
    for part, values in family.training_overrides(cfg).items():
        overrides.setdefault(part, {}).update(values)
    return overrides


def crop_window(shape, size: int | None, frames: int | None, rng: random.Random,
                around: tuple[int, int, int] | None = None) -> tuple[slice, slice, slice]:
    """(frames, rows, columns) of a random crop of a [..., T, H, W] clip: `frames` x `size` x `size` (whole
    where None or larger); with `around` (t, y, x), a crop that holds that pixel."""
    def start(n: int, k: int | None, at: int | None) -> slice:
        if not k or k >= n:
            return slice(0, n)
        s = rng.randrange(n - k + 1) if at is None else min(max(at - rng.randrange(k), 0), n - k)
        return slice(s, s + k)

    t, h, w = shape[-3:]
    size = size if size and size < min(h, w) else None
    at = around or (None, None, None)
    return start(t, frames, at[0]), start(h, size, at[1]), start(w, size, at[2])


def random_crop(video: torch.Tensor, size: int | None, frames: int | None, rng: random.Random) -> torch.Tensor:
    f, y, x = crop_window(video.shape, size, frames, rng)
    return video[:, :, f, y, x]


def _object_pixel(mask: torch.Tensor, rng: random.Random) -> tuple[int, int, int] | None:
    """A random (t, y, x) inside a clip's objects (mask [T, H, W]), or None when it shows none."""
    where = mask.nonzero()
    return tuple(where[rng.randrange(len(where))].tolist()) if len(where) else None


def vae_step(bundle: Bundle, vae, batch: dict, cfg: TrainConfig, rng: random.Random, device) -> tuple:
    video, weight = video_tensor(batch, device), None
    if cfg.object_weight or cfg.object_crops:
        if batch.get("mask") is None:
            raise ValueError("object_weight / object_crops need the objects' masks in the batches "
                             "(t2v.data.rendered.RenderSpec(masks=True))")
        masks = torch.as_tensor(np.asarray(batch["mask"]), device=device)  # [B, T, H, W]
        windows = [crop_window(video.shape, cfg.crop, cfg.crop_frames, rng,
                               _object_pixel(m, rng) if rng.random() < cfg.object_crops else None) for m in masks]
        x = torch.stack([v[:, f, y, xs] for v, (f, y, xs) in zip(video, windows)])
        cropped = torch.stack([m[f, y, xs] for m, (f, y, xs) in zip(masks, windows)])
        weight = object_pixel_weights(cropped, cfg.object_weight, cfg.object_area_ref,
                                      cfg.object_weight_margin)  # [B, 1, T, H, W]
    else:
        x = random_crop(video, cfg.crop, cfg.crop_frames, rng)
    x = bundle.family.vae_batch(x)
    weight = None if weight is None else bundle.family.vae_batch(weight)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    return vae_loss(recon, x, posterior, cfg.kl_weight, weight, cfg.edge_weight)


def denoiser_step(bundle: Bundle, batch: dict, cfg: TrainConfig, rng: random.Random, device,
                  objective: DenoisingObjective, teacher: torch.nn.Module | None = None) -> tuple:
    """bundle.denoiser's loss on one batch: flow matching / diffusion, or with a teacher, guidance distillation."""
    fam = bundle.family
    captions = ["" if rng.random() < cfg.text_dropout else str(c) for c in batch["caption"]]
    with torch.no_grad():
        text = fam.encode_prompt(bundle, captions, bundle.config.max_sequence_length)
        if batch.get("latents") is not None:
            x0 = torch.as_tensor(batch["latents"], device=device).float()
        else:
            x0 = fam.encode(bundle, video_tensor(batch, device))
    # the noise the bundle's sampling starts from (its config says how its frames correlate)
    noise = frame_correlated_noise(offset_noise(x0, cfg.noise_offset), bundle.config.frame_noise_correlation)
    levels = objective.levels(x0.shape[0], device)
    x_t, t, target = objective.pair(x0, noise, levels)
    if teacher is not None:
        mse = distill.distillation_loss(bundle, teacher, x_t, t, text, cfg.guidance_range)
        return mse, {"mse": mse.item(), "frames": x0.shape[2]}
    # a denoiser that takes the guidance scale learns the denoising loss unguided (scale 1: the prompt alone)
    pred = predict_guided(bundle, x_t, t, text, 1.0)
    pred_x0 = objective.clean(x_t, pred, t)
    weight = object_latent_weights(batch, x0, cfg, levels) if cfg.object_weight else None
    mse = weighted_mse(pred.float(), target.float(), weight)
    loss, parts = mse, {"mse": mse.item(), "frames": x0.shape[2]}  # frames 1: a step of stills (image_every)
    if cfg.temporal_loss_weight:
        tl = temporal_difference_loss(pred_x0.float(), x0, order=1)
        loss, parts["temporal"] = loss + cfg.temporal_loss_weight * tl, tl.item()
    if cfg.smoothness_loss_weight:
        sl = temporal_difference_loss(pred_x0.float(), x0, order=2)
        loss, parts["smoothness"] = loss + cfg.smoothness_loss_weight * sl, sl.item()
    return loss, parts


def still_batch(batches: Iterator[dict], clips: int, bundle: Bundle, rng: random.Random) -> dict:
    """A batch of stills for joint image-video training: one random frame of each of `clips` clips drawn from
    `batches`, as one-frame clips (of latents, a frame the family's VAE codes alone)."""
    drawn: list[dict] = []
    while sum(len(b["caption"]) for b in drawn) < clips:
        drawn.append(next(batches))
    batch = {k: torch.cat([torch.as_tensor(b[k]) for b in drawn])[:clips]
             if k in ("latents", "video", "mask", "object_share") else np.concatenate([b[k] for b in drawn])[:clips]
             for k in drawn[0]}
    if batch.get("latents") is not None:
        frames = bundle.family.still_latent_frames(bundle, batch["latents"].shape[2])
    else:
        frames = range(batch["video"].shape[1])
    pick = [rng.choice(frames) for _ in range(clips)]
    for key, axis in (("latents", 1), ("video", 0), ("mask", 0), ("object_share", 0)):  # the frame axis of a clip
        if batch.get(key) is not None:
            batch[key] = torch.stack([clip.narrow(axis, j, 1) for clip, j in zip(batch[key], pick)])
    return batch


def is_still_step(cfg: TrainConfig, step: int) -> bool:
    return bool(cfg.image_every) and (step + 1) % cfg.image_every == 0


def object_latent_weights(batch: dict, x0: torch.Tensor, cfg: TrainConfig, levels: torch.Tensor) -> torch.Tensor:
    """Loss weights [B, 1, F, h, w] of a denoiser batch's latent cells: 1 + cfg.object_weight x the share of the
    cell its objects cover (precomputed "object_share" of encoded clips, or the pixel masks pooled here); with
    cfg.object_weight_below_level, 1 for the clips noised to `levels` at or above it."""
    if batch.get("object_share") is not None:
        share = torch.as_tensor(batch["object_share"], device=x0.device).float()
    elif batch.get("mask") is not None:
        share = latent_object_share(torch.as_tensor(np.asarray(batch["mask"]), device=x0.device), x0.shape[2:])
    else:
        raise ValueError("object_weight: the denoiser stage needs the objects' masks in its batches (a world "
                         "rendered with RenderSpec(masks=True), or clips encoded from one)")
    if share.shape[1:] != x0.shape[2:]:
        raise ValueError(f"object_share: {tuple(share.shape[1:])} per clip does not match the latents' grid "
                         f"{tuple(x0.shape[2:])}")
    weight = object_pixel_weights(share, cfg.object_weight, cfg.object_area_ref, cfg.object_weight_margin)
    if cfg.object_weight_below_level:
        weight = torch.where((levels < cfg.object_weight_below_level).view(-1, 1, 1, 1, 1), weight, 1.0)
    return weight


@torch.no_grad()
def latent_statistics(bundle: Bundle, batches: Iterator[dict], n: int, device) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a trained VAE's latents over about n clips (the pipeline normalizes with them)."""
    zs, seen = [], 0
    vae = bundle.vae
    for batch in batches:
        x = bundle.family.vae_batch(video_tensor(batch, device))
        z = vae.encode(x).latent_dist.mode().float()
        zs.append(z.transpose(0, 1).flatten(1))
        seen += len(batch["video"])
        if seen >= n:
            break
    z = torch.cat(zs, 1)
    return z.mean(1).tolist(), z.std(1).tolist()


def fit_steps(cfg: TrainConfig, step: int, first_step: int, elapsed: float, probe_elapsed: float) -> int:
    """Total steps that fit cfg.time_budget_s, from the pace between the probe step (after warm-up: kernel
    autotuning, data start) and now; never more than cfg.steps. The cosine schedule then ends on time."""
    done = step - first_step
    per_step = (elapsed - probe_elapsed) / max(1, done - BUDGET_PROBE_STEPS)
    return min(cfg.steps, step + max(0, int((cfg.time_budget_s - elapsed) / per_step)))


BUDGET_PROBE_STEPS = 10  # steps after which the pace is measured; it is fixed after twice as many more


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --- the loop -------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, make_batches: Callable[[int], Iterator[dict]], store: CheckpointStore,
          rank: int = 0, world_size: int = 1, sync_grads: Callable[[torch.nn.Module], None] | None = None,
          device=None, on_step: Callable[[int, dict], None] | None = None) -> Bundle:
    """Train `cfg.stage` for cfg.steps optimizer steps. `make_batches(start)` yields this worker's batches
    from sample `start` on (the data position, so a resumed run sees no sample twice). Returns the bundle with
    EMA weights; rank 0 saves it to cfg.out."""
    # settings refused before the bundle is built or loaded
    if cfg.image_every and cfg.stage != "denoiser":
        raise ValueError(f"image_every: stills train the denoiser stage, not {cfg.stage!r}")
    if cfg.guidance_range:
        distill.check(cfg)
    if cfg.object_weight_margin < 0:
        raise ValueError(f"object_weight_margin: pixels (VAE) or latent cells (denoiser), 0 or more, "
                         f"got {cfg.object_weight_margin}")
    if not 0 <= cfg.object_weight_below_level <= 1:
        raise ValueError(f"object_weight_below_level: a noise level in 0..1 (0: every level), "
                         f"got {cfg.object_weight_below_level}")
    device = torch.device(device or ("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    bundle = build_bundle(cfg)
    torch.manual_seed(cfg.seed * 1000 + rank)  # different noise and text dropout per worker
    rng = random.Random(cfg.seed * 1000 + rank)
    for module in (bundle.text_encoder, bundle.vae, bundle.denoiser):
        module.to(device).requires_grad_(False).eval()
    teacher = distill.make_student(bundle, cfg.guidance_range) if cfg.guidance_range else None  # guidance distillation
    trained = bundle.vae if cfg.stage == "vae" else bundle.denoiser
    adapter_keys = None
    if cfg.lora_rank:
        if cfg.stage != "denoiser":
            raise ValueError(f"lora_rank: adapters are trained on the denoiser stage, not {cfg.stage!r}")
        lora.add_trainable(bundle, lora.lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                                                    cfg.lora_dropout))
        adapter_keys = {k for k, p in trained.named_parameters() if p.requires_grad}
        trained.train()
    else:
        trained.requires_grad_(True).train()
    if cfg.stage == "vae" and cfg.vae_trainable == "decoder":
        trained.requires_grad_(False)
        for part in (trained.post_quant_conv, trained.decoder):
            part.requires_grad_(True)
    elif cfg.vae_trainable != "all":
        raise ValueError(f"vae_trainable must be 'all' or 'decoder' (stage vae), got {cfg.vae_trainable!r}")
    fewest_frames = bundle.family.frame_range(bundle)[0]
    if cfg.image_every and fewest_frames > 1:
        raise ValueError(f"image_every: stills are one-frame clips; this {bundle.family.name} model takes at least "
                         f"{fewest_frames} frames a clip")
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = EMA(trained, cfg.ema_decay, adapter_keys)
    step, samples_seen = 0, 0
    state = store.latest()
    if state is not None:
        trained.load_state_dict(state["model"], strict=adapter_keys is None)
        ema.shadow = state["ema"]
        opt.load_state_dict(state["optimizer"])
        step, samples_seen = state["step"], state["samples_seen"]
        log.info("resumed from step %d (%d samples seen)", step, samples_seen)
    batches = make_batches(samples_seen // world_size)
    if cfg.stage == "vae":
        step_fn = functools.partial(vae_step, bundle, trained)
    else:
        step_fn = functools.partial(denoiser_step, bundle, objective=bundle.family.training_objective(bundle, cfg),
                                    teacher=teacher)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    t0, window, first_step, probe_elapsed = time.perf_counter(), [], step, 0.0
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        parts: dict = {}
        step_cfg = (dataclasses.replace(cfg, object_weight=0.0) if cfg.object_weight_until and
                    step >= cfg.object_weight_until and cfg.stage == "denoiser" else cfg)
        for _ in range(cfg.grad_accum):
            batch = (still_batch(batches, cfg.image_batch or cfg.batch_size * cfg.num_frames, bundle, rng)
                     if is_still_step(cfg, step) else next(batches))
            with autocast:
                loss, parts = step_fn(batch, step_cfg, rng, device)
            (loss / cfg.grad_accum).backward()
            samples_seen += len(batch["caption"]) * world_size
        if sync_grads:
            sync_grads(trained)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(trained, step)
        step += 1
        window.append(loss.item())
        if cfg.time_budget_s:
            if step - first_step == BUDGET_PROBE_STEPS:
                probe_elapsed = time.perf_counter() - t0
            elif step - first_step == 3 * BUDGET_PROBE_STEPS:
                steps = fit_steps(cfg, step, first_step, time.perf_counter() - t0, probe_elapsed)
                log.info("time budget %.0f s: %d steps in all", cfg.time_budget_s, steps)
                cfg = dataclasses.replace(cfg, steps=max(step, steps))
        metrics = {"step": step, "loss": window[-1], "loss_avg": float(np.mean(window)), "grad_norm": float(grad_norm),
                   "lr": opt.param_groups[0]["lr"], "samples_seen": samples_seen,
                   "wall_s": time.perf_counter() - t0, **parts}
        want_samples = rank == 0 and cfg.sample_every and step % cfg.sample_every == 0
        want_eval = rank == 0 and cfg.eval_every and step % cfg.eval_every == 0
        if want_samples or want_eval:
            from .samples import sample_and_eval

            metrics.update(sample_and_eval(bundle, trained, ema, cfg, step, bool(want_samples), bool(want_eval)))
        if on_step:
            on_step(step, metrics)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            weights = trained.state_dict()
            if adapter_keys is not None:  # the frozen base is the init bundle's: an adapter's checkpoint is its own
                weights = {k: v for k, v in weights.items() if k in adapter_keys}
            state = {"model": weights, "ema": ema.shadow, "optimizer": opt.state_dict(), "step": step,
                     "samples_seen": samples_seen, "config": dataclasses.asdict(cfg)}
            store.save(state, step, metrics)
            window = []
        elif step % cfg.log_every == 0:
            store.report(metrics)
            window = []
    ema.copy_to(trained)
    trained.eval().requires_grad_(False)
    if cfg.stage == "vae" and cfg.vae_trainable == "all":  # a frozen encoder keeps its latent statistics
        set_latent_statistics(bundle, make_batches(0), device)
    if rank == 0 and cfg.lora_rank:
        lora.save(bundle, cfg.out, info={"base": cfg.init, "words": list(cfg.lora_words), "steps": cfg.steps,
                                         "data": cfg.data, "samples_seen": samples_seen})
    elif rank == 0:
        bundle.save(cfg.out)
    return bundle


def set_latent_statistics(bundle: Bundle, batches: Iterator[dict], device, n: int = 256) -> None:
    bundle.family.set_latent_statistics(bundle.vae, *latent_statistics(bundle, batches, n, device))


def data_columns(cfg: TrainConfig) -> list[str]:
    return ["key", "caption", "latents"] if cfg.use_latents else ["key", "video", "caption"]


def shard_batches(uri: str, batch_size: int, start: int = 0, columns=("key", "video", "caption"),
                  **decode) -> Iterator[dict]:
    """Endless batches over a shard folder, epoch after epoch, from sample `start` (plain, no Ray)."""
    from ..data.stream import iter_batches

    def rows():
        for _ in itertools.count():
            for batch in iter_batches(uri, batch_size=batch_size, columns=list(columns), **decode):
                for i in range(len(batch["key"])):
                    yield {k: v[i] for k, v in batch.items()}

    it = itertools.islice(rows(), start, None)
    while True:
        chunk = list(itertools.islice(it, batch_size))
        yield {k: np.stack([r[k] for r in chunk]) if k in ("video", "latents") else np.array([r[k] for r in chunk])
           for k in chunk[0]}
