"""Training configuration: one dataclass, read from YAML (jobs/configs/*.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    stage: str = "denoiser"  # "vae": reconstruction + KL; "denoiser": flow matching (wan) / DDPM (unet3d)
    family: str = "wan"
    preset: str = "small"  # size built from config when `init` is None
    overrides: dict = field(default_factory=dict)  # {"transformer": {...}, "vae": {...}} on top of the preset
    init: str | None = None  # a bundle to start from (a trained VAE for the denoiser stage)
    data: str = ""  # shard folder or s3:// URI
    out: str = "out/model"  # the trained bundle (EMA weights) is saved here
    checkpoint_dir: str = "out/checkpoints"  # plain loop; Ray Train uses RunConfig.storage_path
    bundle_config: dict = field(default_factory=dict)  # "_t2v" defaults for the saved bundle

    steps: int = 1000
    time_budget_s: float = 0.0  # > 0: stop early so this run's steps fit in that many seconds (see loop.fit_steps)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0

    num_frames: int = 17
    size: int = 128
    use_latents: bool = False  # denoiser stage: train on the shards' precomputed `latents` column
    crop: int | None = None  # VAE stage: random square crops of this size (cheaper, same kernels)
    crop_frames: int | None = None  # VAE stage: random windows of this many frames (1 + 4k for wan)

    text_dropout: float = 0.1  # captions replaced by "" so classifier-free guidance has an unconditional model
    prediction: str | None = None  # unet3d: "epsilon" or "v_prediction"; None: init's own (epsilon when fresh)
    flow_shift: float = 3.0  # wan: training timesteps sampled with the same shift as inference
    noise_offset: float = 0.0  # denoiser stage: plus this x a per-sample, per-channel constant in the noise
    # Joint image-video training (denoiser stage): every image_every-th step trains on stills, one frame of each of
    # image_batch clips (0: batch_size x num_frames, the pixels of a video step), as one-frame videos. A step of
    # stills shows the words for colour, shape, size and place with that many captions instead of batch_size.
    image_every: int = 0
    image_batch: int = 0
    # Guidance distillation (denoiser stage, from `init`): [lowest, highest] guidance scale. The denoiser becomes
    # a student that takes the scale as an input, trained to predict what init's classifier-free guidance predicts
    # at a scale drawn from that range: then one forward a step instead of two (Meng et al., "On Distillation of
    # Guided Diffusion Models").
    guidance_range: list = field(default_factory=list)
    temporal_loss_weight: float = 0.0  # match frame-to-frame differences of predicted and true clean latents
    smoothness_loss_weight: float = 0.0  # match second differences (motion smoothness)
    kl_weight: float = 1e-6  # VAE stage
    object_weight: float = 0.0  # object pixels (VAE) / latent cells (denoiser, by share covered) weigh 1 + this in
    # the loss; needs the objects' masks (RenderSpec(masks=True))
    object_weight_until: int = 0  # > 0: the object weight applies to the denoiser's steps before this one only (it
    # teaches the objects' colours early; kept on, it tilts every uncertain cell towards "object": objects come out
    # too large)
    object_weight_below_level: float = 0.0  # > 0: the denoiser's object weight applies at noise levels (0..1, the
    # family's training levels) below this only; at higher noise whether a cell holds an object is not yet decided
    # by the noised input, and a weight that depends on the answer tilts the prediction there
    object_weight_margin: int = 0  # > 0: the pixels (VAE) / latent cells (denoiser) within this many of an object
    # weigh as the object does: a weight on the object alone makes drawing it too large cheap (in the one run
    # measured, the margin did not bring the objects to their size either: docs/training.md)
    object_area_ref: float = 0.0  # > 0 scales a clip's object weight by this / its objects' share of the clip
    edge_weight: float = 0.0  # VAE stage: plus this x the L1 of horizontal and vertical pixel differences
    object_crops: float = 0.0  # VAE stage: share of crops centred on an object pixel (needs masks)
    vae_trainable: str = "all"  # VAE stage: "all", or "decoder" (fine-tune the decoder of an `init` bundle; its
    # latents, and so a denoiser trained on them, stay valid)

    # LoRA (denoiser stage): > 0 trains an adapter of this rank on the frozen `init` bundle's denoiser and saves
    # it to `out` as a diffusers LoRA folder (t2v.lora) instead of a whole bundle.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: the rank (a scale of 1)
    lora_targets: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_dropout: float = 0.0
    lora_words: list = field(default_factory=list)  # the words it teaches, recorded in its adapter.json

    log_every: int = 10
    checkpoint_every: int = 200
    sample_every: int = 0  # 0: never; else write sample videos to <out>/samples
    eval_every: int = 0  # 0: never; else adherence of sample prompts by the world analyzer (VAE: recon error)
    sample_prompts: int = 4  # held-out prompts (or clips, VAE stage) per sample / eval
    sample_steps: int = 25
    num_workers: int = 1  # Ray Train
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # on small machines leave one whole CPU free: Ray Data lists files with one
    data_cpus: float = 1.0  # per Ray Data decode task
    max_failures: int = 2  # Ray Train: worker-group restarts (a lost node, a killed worker) before the run fails
    worker_resources: dict = field(default_factory=dict)  # Ray Train: custom resources per worker, e.g. {"trainer": 1}
    placement_strategy: str = "PACK"  # Ray Train: "SPREAD" puts workers on different nodes where they fit

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown training config field(s): {', '.join(sorted(unknown))}")
        values = dict(values)
        for f in dataclasses.fields(cls):
            # YAML reads 1e-4 as a string: coerce numbers by the type of the field's default.
            kind = type(f.default) if f.default is not dataclasses.MISSING else None
            if f.name in values and kind in (int, float) and not isinstance(values[f.name], kind):
                try:
                    values[f.name] = kind(values[f.name])
                except (TypeError, ValueError):
                    raise ValueError(f"{f.name}: expected {kind.__name__}, got {values[f.name]!r}") from None
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] = ()) -> "TrainConfig":
        """A YAML config file, with `key=value` overrides (values parsed as YAML) on top."""
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not key=value")
            values[key] = yaml.safe_load(value)
        return cls.from_dict(values)
