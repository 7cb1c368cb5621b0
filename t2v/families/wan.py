"""`wan`: WanTransformer3DModel + causal AutoencoderKLWan + flow matching (the Wan2.1 layout).

Conventions follow diffusers' WanPipeline: prompts are cleaned, tokenized to max_sequence_length and
zeroed past their length; latents are normalized per channel by the VAE's latents_mean/std.
"""

from __future__ import annotations

import torch

from ..errors import BundleError, InputError
from ..sampling import FLOW_SAMPLERS, ImageCondition, flow_shift
from .base import DenoisingObjective, Family

# Sizes built from config (tests, the embedded default). The VAE keeps Wan's 4x temporal / 8x spatial
# compression; the transformer patch is Wan's (1, 2, 2).
PRESETS = {
    "tiny": {
        "transformer": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                            freq_dim=32, rope_max_seq_len=32),
        "vae": dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    },
    "small": {
        "transformer": dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=384, num_layers=6,
                            freq_dim=64, rope_max_seq_len=64),
        # base 16: ~0.7 s per training step of 4 crops and ~1.5 s to decode a 17x128x128 clip on 2 CPU cores.
        "vae": dict(base_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    },
    # The embedded default: small's VAE, a 7M DiT (width 256, 6 layers; 25 CFG steps ~2 s on 2 CPU cores).
    "base": {
        "transformer": dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=6,
                            freq_dim=256, rope_max_seq_len=64),
        # Wan's own channel multipliers at base 32 (10M): on a 2-core x86 CPU it decodes faster than base 16 (1.8-2.3 s
        # vs 2.7-2.8 s per 17x128x128 clip; oneDNN favours the wider convs) and has 12x the capacity.
        "vae": dict(base_dim=32, dim_mult=[1, 2, 4, 4], num_res_blocks=1),
    },
}

# The released checkpoints' shapes (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers: transformer/, vae/ and scheduler/
# config.json; text_encoder/ is google/umt5-xxl's encoder). Built with random weights: nothing is downloaded.
_WAN21 = dict(patch_size=(1, 2, 2), freq_dim=256, attention_head_dim=128, text_dim=4096, rope_max_seq_len=1024,
              eps=1e-6)
_WAN21_VAE = dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[])
_UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
_UNIPC_FLOW = dict(_class_name="UniPCMultistepScheduler", prediction_type="flow_prediction", use_flow_sigmas=True,
                   num_train_timesteps=1000)
REAL_PRESETS = {
    "wan2.1-1.3b": {
        "transformer": dict(_WAN21, num_attention_heads=12, ffn_dim=8960, num_layers=30),
        "vae": _WAN21_VAE,
        "scheduler": dict(_UNIPC_FLOW, flow_shift=3.0),  # 480p
        "text_encoder": _UMT5_XXL,
    },
    "wan2.1-14b": {
        "transformer": dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        "vae": _WAN21_VAE,
        "scheduler": dict(_UNIPC_FLOW, flow_shift=5.0),  # 720p
        "text_encoder": _UMT5_XXL,
    },
    # Wan-AI/Wan2.2-T2V-A14B: two experts of Wan2.1-14B's shape, the low-noise one from t < 0.875 x 1000 (the
    # release's sample_shift 12).
    "wan2.2-t2v-a14b": {
        "transformer": dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        "transformer_2": dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        "pipeline": dict(boundary_ratio=0.875),
        "vae": _WAN21_VAE,
        "scheduler": dict(_UNIPC_FLOW, flow_shift=12.0),
        "text_encoder": _UMT5_XXL,
    },
    # Wan-AI/Wan2.2-TI2V-5B: one transformer on the Wan2.2 VAE's 48 channels (16x space, 4x time, patchified
    # 2x2 pixels; its latent statistics come with the checkpoint).
    "wan2.2-ti2v-5b": {
        "transformer": dict(_WAN21, num_attention_heads=24, ffn_dim=14336, num_layers=30),
        "vae": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                    attn_scales=[], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                    scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
        "scheduler": dict(_UNIPC_FLOW, flow_shift=5.0),
        "text_encoder": _UMT5_XXL,
    },
}
PRESETS.update(REAL_PRESETS)


class CleanFirstFrame(ImageCondition):
    """Wan2.2 TI2V-5B's image-to-video (diffusers' WanImageToVideoPipeline with expand_timesteps): every forward
    sees the image's latents as latent frame 0, clean, and its tokens' timestep is 0; the other tokens are at
    the step's t. first: [B, C, 1, h, w]; shape: the latents'; patch: the transformer's spatial patch."""

    per_token_timesteps = True

    def __init__(self, first: torch.Tensor, shape: tuple, patch: int):
        self.first = first
        self.mask = torch.ones(1, 1, *shape[2:], device=first.device)
        self.mask[:, :, 0] = 0
        self.patch = patch

    def model_input(self, x):
        return (1 - self.mask) * self.first.to(x) + self.mask * x

    def timestep(self, t):
        return (self.mask[0, 0, :, ::self.patch, ::self.patch] * t).flatten().unsqueeze(0)

    def after_last_step(self, latents):
        return self.model_input(latents)


class WanFamily(Family):
    def check_index(self, index, uri):
        # Wan2.2-T2V-A14B: a high-noise `transformer` and a low-noise `transformer_2`, switched at boundary_ratio.
        # Half of that pair would sample another video without a word: refused.
        second = (index.get("transformer_2") or [None, None])[-1]  # ["diffusers", "WanTransformer3DModel"]
        boundary = index.get("boundary_ratio")
        if bool(second) != (boundary is not None):
            raise BundleError(uri, f"transformer_2: {second}, boundary_ratio: {boundary}: a Wan2.2 mixture of "
                                   "experts needs both (the low-noise expert, and the step where it takes over)")
        if not (index.get("transformer") or [None])[0]:
            raise BundleError(uri, "no transformer: t2v samples the high-noise expert's steps with it")
        if boundary is not None and not 0 < boundary < 1:
            raise BundleError(uri, f"boundary_ratio: {boundary} is not between 0 and 1")

    def pipeline_options(self, pipe):
        built = isinstance(pipe, dict)  # components built in memory, or a loaded pipeline and its config
        options = pipe if built else dict(pipe.config)
        expert = (pipe.get(self.expert_key) if built else getattr(pipe, self.expert_key, None)) \
            if self.expert_key else None
        return {"denoiser_2": None if expert is None else expert.eval(),
                "boundary_ratio": None if expert is None else float(options["boundary_ratio"]),
                "expand_timesteps": bool(options.get("expand_timesteps"))}

    def extra_components(self, bundle):
        out = {"expand_timesteps": True} if bundle.expand_timesteps else {}
        if bundle.denoiser_2 is not None:
            out.update(transformer_2=bundle.denoiser_2, boundary_ratio=bundle.boundary_ratio)
        return out

    # --- image-to-video: Wan2.2 TI2V-5B holds an image's latent frame clean, at t = 0, in every forward ---------
    def check_images(self, bundle, first, last, fields=("image", "last_image")):
        if bundle.expand_timesteps and last:
            raise InputError(fields[1], "a TI2V model (Wan2.2-TI2V-5B layout) starts from a first frame only",
                             "a first frame")
        super().check_images(bundle, first, last, fields)

    def image_conditioning(self, bundle, image, last_image, num_frames, height, width, noise):
        if not bundle.expand_timesteps:
            return super().image_conditioning(bundle, image, last_image, num_frames, height, width, noise)
        first = self.image_latents(bundle, image, height, width).expand(noise.shape[0], -1, -1, -1, -1)
        return CleanFirstFrame(first, noise.shape, int(bundle.denoiser.config.patch_size[1]))

    def lora_loader(self):
        from diffusers.loaders import WanLoraLoaderMixin

        return WanLoraLoaderMixin

    def spatial_factor(self, bundle) -> int:
        return int(bundle.vae.config.scale_factor_spatial)

    def temporal_factor(self, bundle) -> int:
        return int(bundle.vae.config.scale_factor_temporal)

    def size_multiple(self, bundle) -> int:
        return self.spatial_factor(bundle) * int(bundle.denoiser.config.patch_size[1])

    def latent_shape(self, bundle, batch, num_frames, height, width):
        s, t = self.spatial_factor(bundle), self.temporal_factor(bundle)
        return (batch, bundle.vae.config.z_dim, (num_frames - 1) // t + 1, height // s, width // s)

    def encode_prompt(self, bundle, prompts, max_length):
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tok = bundle.tokenizer(
            [prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = bundle.text_encoder.device
        mask = tok.attention_mask.to(device)
        embeds = bundle.text_encoder(tok.input_ids.to(device), mask).last_hidden_state
        # WanPipeline trims each prompt to its length and pads with zeros: the same as masking.
        return embeds * mask[..., None].to(embeds.dtype)

    def predict(self, bundle, latents, t, embeds):
        model = self.denoiser_at(bundle, t)
        t = t.expand(latents.shape[0], -1) if t.ndim == 2 else t.expand(latents.shape[0])  # per token, or one
        return model(
            hidden_states=latents.to(model.dtype), timestep=t,
            encoder_hidden_states=embeds.to(model.dtype), return_dict=False,
        )[0]

    def step(self, scheduler, pred, t, latents, generator=None, eta=0.0):
        return scheduler.step(pred, t, latents, return_dict=False)[0]

    def _stats(self, vae, latents):
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std

    def decode(self, bundle, latents):
        vae = bundle.vae
        latents = latents.to(vae.device, vae.dtype)
        mean, std = self._stats(vae, latents)
        return vae.decode(latents * std + mean, return_dict=False)[0]

    def encode(self, bundle, video, sample=False, generator=None):
        vae = bundle.vae
        dist = vae.encode(video.to(vae.device, vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        mean, std = self._stats(vae, latents)
        return (latents - mean) / std

    def training_overrides(self, cfg):
        return {"scheduler": {"shift": cfg.flow_shift}}

    def training_objective(self, bundle, cfg=None):
        """Rectified flow: the transformer predicts the velocity noise - x0 at sigma, timestep sigma * 1000;
        training sigmas carry the same shift as the inference schedule."""
        from ..train.losses import flow_matching_pair, flow_x0, shifted_sigmas

        shift = cfg.flow_shift if cfg is not None else flow_shift(dict(bundle.scheduler.config))
        scale = float(bundle.scheduler.config.get("num_train_timesteps", 1000))

        def levels(batch, device):
            return shifted_sigmas(torch.rand(batch, device=device).clamp(1e-4, 1 - 1e-4), shift)

        def pair(x0, noise, sigma):
            x_t, velocity = flow_matching_pair(x0, noise, sigma)
            return x_t, sigma * scale, velocity

        return DenoisingObjective(levels, pair, lambda x_t, pred, t: flow_x0(x_t, pred, t / scale))

    def set_latent_statistics(self, vae, mean, std):
        vae.register_to_config(latents_mean=mean, latents_std=std)

    def build(self, preset: str = "tiny", text_dim: int = 384, text_encoder: bool = False, device=None,
              **overrides):
        """Random-initialised components of a preset size: {transformer, vae, scheduler}, and with
        text_encoder=True the preset's own encoder where it names one (the real sizes: UMT5-XXL's encoder).
        device="meta" builds the shapes without memory (parameter counts, `t2v info --preset`)."""
        import diffusers
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        cfg = self.preset_config(preset, overrides)
        transformer_cfg = {"text_dim": text_dim, **cfg["transformer"]}
        scheduler_cfg = {**({} if "_class_name" in cfg.get("scheduler", {}) else
                            {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}), **cfg.get("scheduler", {})}
        with torch.device(device or "cpu"):
            vae = AutoencoderKLWan(**{"z_dim": 16, "temperal_downsample": [False, True, True], **cfg["vae"]})
            transformer = WanTransformer3DModel(**{
                "in_channels": vae.config.z_dim, "out_channels": vae.config.z_dim, "cross_attn_norm": True,
                "qk_norm": "rms_norm_across_heads", "patch_size": (1, 2, 2), **transformer_cfg})
            components = {"transformer": transformer, "vae": vae}
            if "transformer_2" in cfg:  # a mixture of experts: the low-noise expert, and where it takes over
                components["transformer_2"] = WanTransformer3DModel(**{
                    "in_channels": vae.config.z_dim, "out_channels": vae.config.z_dim, "cross_attn_norm": True,
                    "qk_norm": "rms_norm_across_heads", "patch_size": (1, 2, 2), "text_dim": text_dim,
                    **cfg["transformer_2"]})
                components["boundary_ratio"] = float(cfg["pipeline"]["boundary_ratio"])
            if text_encoder and "text_encoder" in cfg:
                from transformers import UMT5Config, UMT5EncoderModel

                components["text_encoder"] = UMT5EncoderModel(UMT5Config(**cfg["text_encoder"]))
        scheduler_cls = getattr(diffusers, scheduler_cfg.pop("_class_name"))
        components["scheduler"] = scheduler_cls(**scheduler_cfg)
        return components


WAN = WanFamily(
    name="wan",
    pipeline_class="WanPipeline",
    denoiser_key="transformer",
    samplers=FLOW_SAMPLERS,
    flow=True,
    presets=PRESETS,
    expert_key="transformer_2",
    # Wan2.1-T2V-1.3B's recommended settings.
    defaults=dict(num_frames=81, height=480, width=832, fps=16, num_inference_steps=50, guidance_scale=5.0,
                  max_sequence_length=512, max_frames=161, min_size=16, max_size=1280),
)
