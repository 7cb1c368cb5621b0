"""What a family must say about its models; `wan.py` and `unet3d.py` fill it in. Everything that differs
between families lives behind these methods: nothing outside families/ branches on a family."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class DenoisingObjective:
    """What a family's denoiser learns, as tensor functions (built once per training run).

    levels(batch, device): training noise levels in (0, 1), drawn as the family's schedule weighs them;
    pair(x0, noise, levels): (noised latents, the denoiser's timestep, its regression target);
    clean(x_t, prediction, timestep): the clean latents that prediction implies (for losses on x0).
    """

    levels: Callable
    pair: Callable
    clean: Callable


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # the reference diffusers pipeline, written as model_index.json's _class_name
    denoiser_key: str  # component folder of the denoiser: "transformer" or "unet"
    samplers: dict[str, tuple[str, dict]]
    flow: bool  # flow matching (velocity) rather than noise-prediction diffusion
    defaults: dict[str, Any] = field(default_factory=dict)  # generation defaults of real checkpoints
    presets: dict[str, dict] = field(default_factory=dict)  # sizes `build` makes: name -> component configs
    expert_key: str | None = None  # component folder of a low-noise second expert (Wan2.2 A14B: transformer_2)

    # --- geometry -------------------------------------------------------------------------------
    def spatial_factor(self, bundle) -> int:
        """Pixels per latent cell along height/width."""
        raise NotImplementedError

    def size_multiple(self, bundle) -> int:
        """Height and width must be multiples of this."""
        raise NotImplementedError

    def temporal_factor(self, bundle) -> int:
        """Frames per latent frame (1 for per-frame VAEs); num_frames must be 1 + k * this."""
        raise NotImplementedError

    def frame_range(self, bundle) -> tuple[int, int]:
        """The fewest and the most frames one clip of this model has (a model with a fixed-length temporal
        position table makes exactly that length)."""
        return 1, bundle.config.max_frames

    def latent_shape(self, bundle, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    # --- the steps of sampling ------------------------------------------------------------------
    def encode_prompt(self, bundle, prompts: list[str], max_length: int) -> torch.Tensor:
        raise NotImplementedError

    def init_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return noise

    def expert(self, bundle, t) -> int:
        """Which expert denoises at timestep t: 0, the bundle's `denoiser` (its only one, or the high-noise expert,
        at t >= boundary_ratio x the training timesteps, as diffusers' WanPipeline switches), or 1, `denoiser_2`."""
        if bundle.denoiser_2 is None:
            return 0
        t = float(t.max()) if torch.is_tensor(t) else float(t)  # (per-token timesteps: the step's is the largest)
        return 0 if t >= bundle.boundary_ratio * bundle.scheduler.config.num_train_timesteps else 1

    def denoiser_at(self, bundle, t) -> torch.nn.Module:
        index = self.expert(bundle, t)
        runtime = getattr(bundle, "runtime", None)
        if runtime is not None:
            runtime.onload(bundle.experts, index)  # memory expert_offload: this expert onto the device
        return bundle.experts[index]

    def predict(self, bundle, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for latents already passed through the scheduler's scale_model_input (the
        scheduler lives with the sampling loop; the forward may run elsewhere, batched with other jobs)."""
        raise NotImplementedError

    def step(self, scheduler, pred: torch.Tensor, t, latents: torch.Tensor, generator=None, eta: float = 0.0):
        raise NotImplementedError

    # --- guidance as an input (a guidance-distilled student) -----------------------------------------
    def guidance_input(self, bundle) -> bool:
        """Whether the denoiser takes the guidance scale as an input (`predict(..., guidance=)`): one forward a
        step instead of classifier-free guidance's two. Here: no denoiser of this family does."""
        return False

    def with_guidance_input(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """A copy of `denoiser` that also takes the guidance scale, computing what `denoiser` does until trained
        (`TrainConfig.guidance_range` distils classifier-free guidance into it)."""
        raise ValueError(f"guidance_range: a {self.name} denoiser ({type(denoiser).__name__}) takes no guidance "
                         "scale as an input")

    def decode(self, bundle, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video in [-1, 1], shape [B, 3, F, H, W]."""
        raise NotImplementedError

    def encode(self, bundle, video: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Video in [-1, 1] [B, 3, F, H, W] -> normalized latents (the inverse of decode)."""
        raise NotImplementedError

    # --- image-to-video -----------------------------------------------------------------------------
    def check_images(self, bundle, first: bool, last: bool, fields=("image", "last_image")) -> None:
        """Refuse the frames a call gives (first, last: whether it gives each) where the model cannot start from
        them, naming the field (fields: the caller's names for the two). Here a model without an image branch:
        a causal VAE encodes frame 0 alone, so a first frame is latent frame 0; a last frame has no latent of its
        own."""
        from ..errors import InputError

        if last:
            raise InputError(fields[1], "this model has no image branch: an image can only be its first frame",
                             "a first-last-frame model (wan-i2v family, the Wan2.1-FLF2V layout)")

    def image_conditioning(self, bundle, image, last_image, num_frames: int, height: int, width: int,
                           noise: torch.Tensor):
        """How images start a video on this family's models (`sampling.ImageCondition`), once `check_images`
        accepted them. image, last_image: RGB PIL images of the video's aspect (last_image may be None); noise:
        the call's initial noise. Here latent replacement: the image's latents are latent frame 0's."""
        from ..sampling import FirstFrame

        first = self.image_latents(bundle, image, height, width)
        return FirstFrame(first.expand(noise.shape[0], -1, -1, -1, -1), noise[:, :, :1])

    def image_latents(self, bundle, image, height: int, width: int) -> torch.Tensor:
        """An RGB PIL image -> the latents of a one-frame video of it, [1, C, 1, h, w]."""
        from ..images import to_pixels

        pixels = to_pixels(image, height, width).unsqueeze(2).to(bundle.device, bundle.vae.dtype)
        return self.encode(bundle, pixels).float()

    def check_cache(self, bundle, name: str) -> None:
        """Refuse a step cache (first_block, taylorseer, pab) that this family's denoiser cannot run under."""

    def check_index(self, index: dict, uri: str) -> None:
        """Refuse a model_index.json this family's code cannot sample (before any weight is read)."""

    def extra_components(self, bundle) -> dict:
        """Pipeline components besides denoiser, VAE, scheduler, tokenizer and text encoder, as the family's
        diffusers pipeline takes them (save_pretrained writes them)."""
        return {}

    def lora_loader(self):
        """The diffusers LoRA loader mixin of the family's pipeline (save_lora_weights / lora_state_dict), or None
        when diffusers has no LoRA support for its denoiser."""
        return None

    def peft_denoiser(self, bundle):
        """The bundle's denoiser, able to hold peft LoRA adapters (diffusers' PeftAdapterMixin). A diffusers model
        class without that mixin (UNet3DConditionModel, LatteTransformer3DModel: their pipelines cannot load a LoRA)
        gets it, as its sibling classes have it; the class name stays, so a saved bundle is unchanged."""
        from diffusers.loaders.peft import PeftAdapterMixin

        model = bundle.denoiser
        if not isinstance(model, PeftAdapterMixin):
            model.__class__ = _with_peft(type(model))
        return model

    def pipeline_options(self, pipe) -> dict:
        """Bundle fields from the family's diffusers pipeline beyond its components (a mixture's second expert
        and boundary, per-token timesteps), read from a loaded pipeline or a dict of built components."""
        return {}

    def after_load(self, pipe, config) -> None:
        """Adjust a pipeline diffusers just loaded to the bundle's config (default: nothing to do)."""

    def preset_config(self, preset: str, overrides: dict) -> dict:
        """A preset's component configs (copies) with `overrides` merged into each component's."""
        if preset not in self.presets:
            raise KeyError(f"unknown {self.name} preset {preset!r} (known: {', '.join(self.presets)})")
        cfg = {k: dict(v) for k, v in self.presets[preset].items()}
        for part, values in overrides.items():
            cfg.setdefault(part, {}).update(values)
        return cfg

    # --- training -------------------------------------------------------------------------------
    def training_overrides(self, cfg) -> dict:
        """Component config overrides that a TrainConfig implies for a model built from a preset."""
        return {}

    def training_objective(self, bundle, cfg=None) -> DenoisingObjective:
        """The denoiser's training target; cfg None: the bundle's own schedule."""
        raise NotImplementedError

    def still_latent_frames(self, bundle, latent_frames: int) -> range:
        """The latent frames of a clip that each code one image alone (the stills joint image-video training draws,
        `TrainConfig.image_every`): every one where the VAE codes frames one by one; frame 0 of a causal VAE, which
        codes the first frame alone."""
        return range(latent_frames) if self.temporal_factor(bundle) == 1 else range(1)

    def vae_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Video-shaped [B, C, T, H, W] tensors (clips, pixel weights) -> the layout the VAE itself takes."""
        return x

    def set_latent_statistics(self, vae, mean: list[float], std: list[float]) -> None:
        """Store a trained VAE's per-channel latent statistics the way the family's pipeline normalizes."""
        raise NotImplementedError


@functools.cache
def _with_peft(cls: type) -> type:
    from diffusers.loaders.peft import PeftAdapterMixin

    return type(cls.__name__, (cls, PeftAdapterMixin), {"__module__": cls.__module__})
