"""TextToVideoPipeline: prompt -> frames, in the diffusers call convention."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from . import bundle as bundle_lib
from .errors import InputError
from .params import GenerationParams, resolve
from .runtime import step_predictor
from .images import check_aspect, image_size
from .sampling import (NO_IMAGE, Handover, ImageCondition, frame_correlated_noise, local_predictor, model_input,
                       scheduler_for)

OUTPUT_TYPES = ("np", "pt", "latent")


@dataclass
class VideoOutput:
    """frames: "np" uint8 [B, T, H, W, 3]; "pt" float [B, T, 3, H, W] in [0, 1]; "latent" [B, C, F, h, w]."""

    frames: Any
    params: GenerationParams
    timings: dict = field(default_factory=dict)
    handover: Handover | None = None  # a call with expert=0: where the low-noise expert goes on from

    @property
    def seed(self) -> int:
        return self.params.seed


class TextToVideoPipeline:
    def __init__(self, bundle: bundle_lib.Bundle):
        self.bundle = bundle
        self.video_processor = VideoProcessor(vae_scale_factor=bundle.family.spatial_factor(bundle))

    @classmethod
    def from_pretrained(cls, uri=None, precision: str = "fp32", device=None, memory=None, cache=None,
                        compile: bool = False) -> "TextToVideoPipeline":
        """memory: vae_tiling, vae_slicing, group_offload, expert_offload; cache: first_block[:threshold],
        taylorseer[:interval], pab; compile: regional torch.compile of the transformer (t2v.runtime)."""
        from .runtime import RuntimeOptions

        runtime = RuntimeOptions.parse(memory, cache, compile)
        return cls(bundle_lib.load(uri, precision=precision, device=device, runtime=runtime))

    # --- LoRA adapters, with diffusers' method names (t2v.lora) ------------------------------------------------
    def load_lora_weights(self, uri: str, adapter_name: str = "default") -> None:
        """Load a LoRA adapter (a folder or .safetensors file, local or s3://; diffusers' format, or the original
        Wan / ComfyUI layouts diffusers converts) into the denoiser and make it the active one."""
        from . import lora

        lora.load(self.bundle, str(uri), adapter_name)
        lora.activate(self.bundle, lora.Choice(adapter_name))

    def set_adapters(self, adapter_name: str | None, adapter_weight: float = 1.0) -> None:
        """Generate with this loaded adapter at this strength from now on (None: the base model alone)."""
        from . import lora

        lora.activate(self.bundle, None if adapter_name is None else lora.Choice(adapter_name, adapter_weight))

    def disable_lora(self) -> None:
        self.set_adapters(None)

    def get_list_adapters(self) -> list[str]:
        from . import lora

        return lora.loaded(self.bundle)

    def delete_adapters(self, adapter_name: str) -> None:
        from . import lora

        lora.unload(self.bundle, adapter_name)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        b = self.bundle
        return b.family.encode_prompt(b, prompts, b.config.max_sequence_length)

    @torch.no_grad()
    def encode_image(self, image, height: int, width: int) -> torch.Tensor:
        """A first frame (a PIL image or an [H, W, 3] uint8 array, of the video's aspect) -> the latents of a
        one-frame video, [1, C, 1, h, w]: what latent frame 0 of the video is (a causal VAE encodes frame 0
        alone)."""
        image = check_images(self.bundle, image, None, width, height)[0]
        return self.bundle.family.image_latents(self.bundle, image, height, width)

    @torch.no_grad()
    def image_condition(self, images: tuple, num_frames: int, height: int, width: int,
                        noise: torch.Tensor) -> ImageCondition:
        """A call's image conditioning (`check_images`' (first, last) frames), as the model's family takes images:
        latent replacement, or an image branch (`Family.image_conditioning`). NO_IMAGE without images."""
        first, last = images
        if first is None:
            return NO_IMAGE
        return self.bundle.family.image_conditioning(self.bundle, first, last, num_frames, height, width, noise)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        output_type: str = "np",
        fps: float | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end: Callable[["TextToVideoPipeline", int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        predictor: Callable | None = None,
        image=None,
        last_image=None,
        modules_lock=None,
        guidance_scale_2: float | None = None,
        expert: int | None = None,
        handover: Handover | None = None,
    ) -> VideoOutput:
        """predictor: where each step's forward runs, (latents list, t, embeds list, guidance) -> predictions
        (default: here; the Serve graph's Denoiser batches concurrent jobs' steps through it). image: the first
        frame (PIL image or [H, W, 3] uint8 array of the video's aspect): image-to-video, through the model's image
        branch where it has one (wan-i2v), else by latent replacement. last_image: the last frame, for a
        first-last-frame model (the Wan2.1-FLF2V layout). modules_lock: held while the call runs the bundle's
        modules itself (encoding prompts and images), for a caller whose other threads share them.
        guidance_scale_2: the low-noise expert's guidance on a mixture of experts (Wan2.2 A14B; default
        guidance_scale's), as diffusers' WanPipeline. expert, handover: a mixture of experts sampled in two
        calls, e.g. each expert on replicas of its own: expert=0 takes the high-noise steps and returns the
        latents at the switch with `handover`; expert=1 with that handover takes the rest. Both calls with the
        same arguments make the one call's video."""
        b, fam = self.bundle, self.bundle.family
        timings: dict[str, float] = {}
        start = time.perf_counter()

        # 1. Check inputs; unset fields take the bundle's defaults.
        if output_type not in OUTPUT_TYPES:
            raise InputError("output_type", f"unknown output type {output_type!r}", ", ".join(OUTPUT_TYPES))
        p = resolve(b, prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height, width=width,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                    fps=fps, seed=seed if generator is None else (seed or 0), guidance_scale_2=guidance_scale_2)
        images = check_images(b, image, last_image, p.width, p.height)
        check_expert(b, expert, handover, output_type)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(p.seed)
        batch = len(p.prompts)
        cfg = p.guided
        modules_lock = modules_lock or contextlib.nullcontext()

        # 2. Encode the prompts (unless given, e.g. by a separate text-encoder stage); with guidance the negative
        #    prompts ride in the same batch, first.
        if prompt_embeds is None:
            with modules_lock:
                embeds = self.encode_prompt(p.negative_prompts + p.prompts if cfg else p.prompts)
        else:
            if cfg and negative_prompt_embeds is None:
                with modules_lock:
                    negative_prompt_embeds = self.encode_prompt(p.negative_prompts)
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
            embeds = embeds.to(b.device)
        timings["encode_s"] = time.perf_counter() - start

        # 3. A fresh scheduler for this call, and its timesteps (the one that took the first expert's steps).
        scheduler = handover.scheduler if handover else scheduler_for(b, p.sampler, p.num_inference_steps)

        # 4. Initial noise, drawn on the CPU so a seed gives the same video on any device.
        shape = fam.latent_shape(b, batch, p.num_frames, p.height, p.width)
        if handover is not None:  # going on from the first expert's last step
            latents, noise = handover.latents.to(b.device), handover.noise.to(b.device)
            generator.set_state(handover.generator_state)
        elif latents is None:
            noise = frame_correlated_noise(randn_tensor(shape, generator=generator, device=b.device,
                                                        dtype=torch.float32),
                                           b.config.frame_noise_correlation, generator)
            latents = fam.init_latents(noise, scheduler)
        elif tuple(latents.shape) != shape:
            raise InputError("latents", f"shape {tuple(latents.shape)} does not match the request", str(shape))
        else:
            noise = latents

        # 5. The images' conditioning (none without images): what they add to the latents, to every forward's
        #    input and to its cross-attention context.
        with modules_lock:
            condition = self.image_condition(images, p.num_frames, p.height, p.width, noise)
        embeds = condition.embeds(embeds)

        # 6. Denoising loop: one forward per step for both guidance halves, by the expert of the step's noise level.
        predict = step_predictor(b, predictor or local_predictor(b), len(scheduler.timesteps))
        t0 = time.perf_counter()
        for i, t in enumerate(scheduler.timesteps):
            if expert is not None and fam.expert(b, t) != expert:
                continue  # the other expert's step, taken in its own call
            latents = condition.before_step(scheduler, latents, t)
            x = condition.model_input(model_input(scheduler, latents, t))
            pred = predict([x], condition.timestep(t), [embeds], p.guidance(fam.expert(b, t)))[0]
            latents = fam.step(scheduler, pred, t, latents, generator=generator, eta=eta)
            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": embeds}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = (outputs or {}).get("latents", latents)
        timings["denoise_s"] = time.perf_counter() - t0
        if expert == 0:  # handed over at the switch: the low-noise expert's call finishes the video
            state = Handover(latents, scheduler, generator.get_state(), noise)
            return VideoOutput(frames=latents, params=p, timings=timings, handover=state)
        latents = condition.after_last_step(latents)

        # 7. Decode to frames.
        t0 = time.perf_counter()
        frames = latents if output_type == "latent" else self.decode_latents(latents, output_type)
        timings["decode_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - start
        return VideoOutput(frames=frames, params=p, timings=timings)


    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "np"):
        """Latents [B, C, F, h, w] -> frames ("np": uint8 [B, T, H, W, 3]; "pt": [B, T, 3, H, W] in [0, 1])."""
        video = self.video_processor.postprocess_video(self.bundle.family.decode(self.bundle, latents),
                                                       output_type="pt")
        return video if output_type == "pt" else to_uint8(video)


def check_images(bundle, image, last_image, width: int, height: int) -> tuple:
    """A call's (first, last) frames as RGB PIL images (None where not given), each checked against the video's
    aspect, and against what the model takes (`Family.check_images`)."""
    from PIL import Image

    check_frames(bundle, image is not None, last_image is not None)
    out = []
    for name, im in (("image", image), ("last_image", last_image)):
        if im is not None:
            check_aspect(image_size(im), width, height, name)
            im = (Image.fromarray(im) if isinstance(im, np.ndarray) else im).convert("RGB")
        out.append(im)
    return tuple(out)


def check_expert(bundle, expert: int | None, handover: Handover | None, output_type: str) -> None:
    """A call for one expert of a mixture: expert 0 hands its latents over (output_type "latent"), expert 1 goes on
    from a handover."""
    if expert is None and handover is None:
        return
    if bundle.denoiser_2 is None:
        raise InputError("expert", "this model has one denoiser, not a mixture of experts", "unset")
    if expert not in (0, 1):
        raise InputError("expert", f"{expert!r} is not an expert of the mixture", "0 (high noise) or 1 (low noise)")
    if expert == 0 and (handover is not None or output_type != "latent"):
        raise InputError("expert", "the high-noise expert starts a video and hands its latents over",
                         'no handover, output_type "latent"')
    if expert == 1 and handover is None:
        raise InputError("handover", "the low-noise expert goes on from the high-noise expert's handover",
                         "the handover of a call with expert=0")


def check_frames(bundle, first: bool, last: bool, fields: tuple[str, str] = ("image", "last_image")) -> None:
    """Refuse a call's frames (whether it gives a first and a last) where the model cannot start from them, naming
    the caller's field for each: no last frame without a first, then what the family takes (`Family.check_images`)."""
    if last and not first:
        raise InputError(fields[1], "a last frame without a first frame", f"{fields[0]} as well")
    bundle.family.check_images(bundle, first, last, fields)


def progress_callback(report: Callable[[int, int], None] | None, total: int):
    """report(step, total) after every step, as a `callback_on_step_end` (None: no callback). total: the
    call's number of timesteps (`sampling.num_timesteps`; a second-order sampler takes two per step)."""
    if report is None:
        return None

    def callback(_pipe, i, _t, tensors):
        report(i + 1, total)
        return tensors

    return callback


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[B, T, 3, H, W] floats in [0, 1] -> [B, T, H, W, 3] uint8."""
    return (video.permute(0, 1, 3, 4, 2).float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
