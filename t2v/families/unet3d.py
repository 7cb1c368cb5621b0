"""`unet3d`: UNet3DConditionModel + per-frame AutoencoderKL + DDPM/DDIM (the ModelScope / zeroscope layout).

Conventions follow diffusers' TextToVideoSDPipeline: prompts padded to the tokenizer's model_max_length,
the scheduler steps frames as a batch of images, the VAE decodes frame by frame.
"""

from __future__ import annotations

import inspect

from ..sampling import DIFFUSION_SAMPLERS, guidance_scale_embedding
from .per_frame import PerFrameDiffusionFamily

PRESETS = {
    "tiny": {
        "unet": dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, norm_num_groups=4,
                     down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")),
        "vae": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1),
    },
    "small": {
        "unet": dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8,
                     norm_num_groups=8,
                     down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")),
        "vae": dict(block_out_channels=(32, 64, 64), norm_num_groups=8, layers_per_block=1),
    },
}


class UNet3DFamily(PerFrameDiffusionFamily):
    def size_multiple(self, bundle) -> int:
        return self.spatial_factor(bundle) * 2 ** (len(bundle.denoiser.config.block_out_channels) - 1)

    def encode_prompt(self, bundle, prompts, max_length):
        tok = bundle.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                               return_tensors="pt")
        te = bundle.text_encoder
        use_mask = getattr(te.config, "use_attention_mask", False)
        mask = tok.attention_mask.to(te.device) if use_mask else None
        return te(tok.input_ids.to(te.device), attention_mask=mask)[0]

    def predict(self, bundle, latents, t, embeds, guidance=None):
        """guidance: the scale of each sample [B], for a denoiser that takes it (`guidance_input`)."""
        model = bundle.denoiser
        cond = None
        if guidance is not None:
            cond = guidance_scale_embedding(guidance.to(latents.device), model.config.time_cond_proj_dim)
            cond = cond.to(model.dtype)
        return model(latents.to(model.dtype), t, encoder_hidden_states=embeds.to(model.dtype), timestep_cond=cond,
                     return_dict=False)[0]

    def guidance_input(self, bundle) -> bool:
        # diffusers' UNets take a guidance embedding through time_cond_proj_dim (the LCM convention)
        return bool(getattr(bundle.denoiser.config, "time_cond_proj_dim", None))

    def with_guidance_input(self, denoiser, embedding_dim: int = 256):
        import torch
        from diffusers import UNet3DConditionModel

        student = UNet3DConditionModel.from_config(dict(denoiser.config), time_cond_proj_dim=embedding_dim)
        missing, unexpected = student.load_state_dict(denoiser.state_dict(), strict=False)
        if unexpected or missing != ["time_embedding.cond_proj.weight"]:
            raise ValueError(f"with_guidance_input: weights that do not carry over: {missing + unexpected}")
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # the guidance adds nothing until trained
        student = student.to(denoiser.device)
        return student if denoiser.dtype == student.dtype else student.to(dtype=denoiser.dtype)

    def step(self, scheduler, pred, t, latents, generator=None, eta=0.0):
        # ModelScope steps each frame as an image; stochastic samplers then draw noise in that layout.
        b, c, f, h, w = latents.shape
        as_images = lambda x: x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # noqa: E731
        params = inspect.signature(scheduler.step).parameters
        kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        out = scheduler.step(as_images(pred), t, as_images(latents), **kwargs).prev_sample
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    def lora_loader(self):
        # TextToVideoSDPipeline's own loader: LoRA files with "unet." keys, as save_lora_weights(unet_lora_layers=...)
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    def after_load(self, pipe, config):
        # TextToVideoSDPipeline pads to model_max_length: make that the bundle's sequence length.
        pipe.tokenizer.model_max_length = config.max_sequence_length

    def build_denoiser(self, cfg: dict, latent_channels: int, text_dim: int):
        from diffusers import UNet3DConditionModel

        return UNet3DConditionModel(in_channels=latent_channels, out_channels=latent_channels,
                                    cross_attention_dim=text_dim, **cfg)


UNET3D = UNet3DFamily(
    name="unet3d",
    pipeline_class="TextToVideoSDPipeline",
    denoiser_key="unet",
    samplers=DIFFUSION_SAMPLERS,
    flow=False,
    presets=PRESETS,
    # ModelScope text-to-video-ms-1.7b's settings.
    defaults=dict(num_frames=16, height=256, width=256, fps=8, num_inference_steps=50, guidance_scale=9.0,
                  max_sequence_length=77, max_frames=64, min_size=32, max_size=1024),
)
