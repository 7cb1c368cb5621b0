"""`wan-i2v`: Wan2.1's image-to-video checkpoints (WanImageToVideoPipeline): a WanTransformer3DModel with an image
branch, the causal AutoencoderKLWan, a CLIP vision encoder, flow matching.

Conventions follow diffusers' WanImageToVideoPipeline (Wan2.1-I2V-14B-480P/720P, Wan2.1-FLF2V-14B-720P):
- the first frame (and for a first-last-frame model the last) is VAE-encoded inside a video of black frames; those
  latents and a mask of the frames given ride as 4 + 16 extra input channels of every forward;
- CLIP's penultimate hidden states of the image(s) are cross-attention tokens ahead of the prompt's 512;
- prompts and the VAE as WanPipeline's (the `wan` family).
Wan2.2-I2V-A14B is the same pipeline with two experts (`transformer_2`, `boundary_ratio`, as the `wan` family
samples them) and no image encoder: its transformers have no image branch (image_dim null), so the image reaches
them through the input channels alone. Wan2.2-TI2V-5B (expand_timesteps) is the `wan` family's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BundleError, InputError
from ..sampling import FLOW_SAMPLERS, ImageCondition
from .wan import _UMT5_XXL, _UNIPC_FLOW, _WAN21, _WAN21_VAE, WanFamily

# diffusers' Wan attention takes the last 512 context tokens as the prompt's and the ones before as the image's.
TEXT_TOKENS = 512

# open_clip's ViT-H/14, the image encoder every Wan2.1 image-to-video checkpoint ships (image_encoder/config.json).
_CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
_I2V_14B = dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, image_dim=1280,
                added_kv_proj_dim=5120)
_I2V_A14B = dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36)
PRESETS = {  # the released checkpoints' shapes, built with random weights (`t2v info --preset`)
    "wan2.1-i2v-14b-480p": {"transformer": _I2V_14B, "vae": _WAN21_VAE, "scheduler": dict(_UNIPC_FLOW, flow_shift=3.0),
                            "text_encoder": _UMT5_XXL, "image_encoder": _CLIP_VIT_H},
    "wan2.1-i2v-14b-720p": {"transformer": _I2V_14B, "vae": _WAN21_VAE, "scheduler": dict(_UNIPC_FLOW, flow_shift=5.0),
                            "text_encoder": _UMT5_XXL, "image_encoder": _CLIP_VIT_H},
    "wan2.1-flf2v-14b-720p": {"transformer": dict(_I2V_14B, pos_embed_seq_len=2 * 257), "vae": _WAN21_VAE,
                              "scheduler": dict(_UNIPC_FLOW, flow_shift=5.0), "text_encoder": _UMT5_XXL,
                              "image_encoder": _CLIP_VIT_H},
    # Wan-AI/Wan2.2-I2V-A14B: two experts without an image branch, the low-noise one from t < 0.9 x 1000.
    "wan2.2-i2v-a14b": {"transformer": _I2V_A14B, "transformer_2": _I2V_A14B, "pipeline": dict(boundary_ratio=0.9),
                        "vae": _WAN21_VAE, "scheduler": dict(_UNIPC_FLOW, flow_shift=5.0), "text_encoder": _UMT5_XXL},
}


def pack_tokens(image_tokens: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """[B, n, D_image] image tokens and [B, L, D_text] prompt embeddings -> one [B, n + L, max(D)] context,
    zero-padded in width: it travels as any prompt's embeddings do (batched with other jobs' steps, split into
    guidance halves, sent to other ranks and replicas); `unpack_tokens` splits it back."""
    width = max(image_tokens.shape[-1], text_embeds.shape[-1])
    image_tokens = image_tokens.to(text_embeds).expand(text_embeds.shape[0], -1, -1)
    return torch.cat([F.pad(image_tokens, (0, width - image_tokens.shape[-1])),
                      F.pad(text_embeds, (0, width - text_embeds.shape[-1]))], dim=1)


def unpack_tokens(context: torch.Tensor, text_tokens: int, text_dim: int, image_dim: int):
    """The inverse of `pack_tokens`: (image tokens [B, n, image_dim], prompt embeddings [B, L, text_dim])."""
    return context[:, :-text_tokens, :image_dim], context[:, -text_tokens:, :text_dim]


def frame_mask(num_frames: int, temporal_factor: int, height: int, width: int, last: bool) -> torch.Tensor:
    """Which frames an image gives, as Wan's [1, temporal_factor, latent frames, h, w] mask channels: each latent
    frame holds temporal_factor frames, except the first, which holds one (a causal VAE), so its mask repeats."""
    mask = torch.zeros(1, 1, num_frames, height, width)
    mask[:, :, 0] = 1
    if last:
        mask[:, :, -1] = 1
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal_factor, dim=2), mask[:, :, 1:]], dim=2)
    return mask.view(1, -1, temporal_factor, height, width).transpose(1, 2)


class ImageBranch(ImageCondition):
    """Image-to-video through the model's image branch: `condition` (mask + image latents) joins every forward's
    input channels, the image tokens lead its cross-attention context. The latents themselves are untouched."""

    def __init__(self, condition: torch.Tensor, tokens: torch.Tensor | None):
        self.condition, self.tokens = condition, tokens

    def embeds(self, embeds):
        return embeds if self.tokens is None else pack_tokens(self.tokens, embeds)

    def model_input(self, x):
        return torch.cat([x, self.condition.to(x).expand(x.shape[0], -1, -1, -1, -1)], dim=1)


class WanImageToVideoFamily(WanFamily):
    def first_last(self, bundle) -> bool:
        """A first-last-frame model (Wan2.1-FLF2V): its image embedder has positions for two images."""
        return bundle.denoiser.config.pos_embed_seq_len is not None

    def image_branch(self, bundle) -> bool:
        """Wan2.1's transformers read CLIP tokens of the image; Wan2.2-I2V-A14B's only its input channels."""
        return bundle.denoiser.config.image_dim is not None

    def check_index(self, index, uri):
        if index.get("expand_timesteps"):
            raise BundleError(uri, "expand_timesteps: a Wan2.2-TI2V layout; load it as a WanPipeline bundle (the wan "
                                   "family samples TI2V from text and from an image)")
        super().check_index(index, uri)  # a mixture of experts: both experts and the boundary, or neither
        second = (index.get("transformer_2") or [None])[0]
        for part in ("image_encoder", "image_processor"):
            if not second and not (index.get(part) or [None])[0]:
                raise BundleError(uri, f"no {part}: a Wan2.1 image-to-video bundle has a CLIP image encoder and "
                                       "its image processor")

    def after_load(self, pipe, config):
        if pipe.transformer.config.in_channels != 2 * pipe.vae.config.z_dim + pipe.vae.config.scale_factor_temporal:
            raise ValueError(f"the transformer takes {pipe.transformer.config.in_channels} input channels, not the "
                             "latents, a frame mask and the image's latents: it is a text-to-video transformer; save "
                             "it as a WanPipeline bundle")
        if pipe.transformer.config.image_dim is None:
            return  # Wan2.2-I2V-A14B: no CLIP tokens, any prompt length
        if getattr(pipe, "image_encoder", None) is None:
            raise ValueError("the transformer has an image branch (image_dim set) but the bundle no image_encoder")
        if config.max_sequence_length != TEXT_TOKENS:
            raise ValueError(f"max_sequence_length is {config.max_sequence_length}: an image-conditioned Wan "
                             f"transformer reads exactly {TEXT_TOKENS} prompt tokens")

    def extra_components(self, bundle):
        return {**super().extra_components(bundle), "image_encoder": bundle.image_encoder,
                "image_processor": bundle.image_processor}

    # --- image-to-video --------------------------------------------------------------------------
    def check_images(self, bundle, first, last, fields=("image", "last_image")):
        if not first:
            raise InputError(fields[0], "this is an image-to-video model: it generates from a first frame",
                             "a first frame of the video's aspect")
        if self.first_last(bundle) and not last:
            raise InputError(fields[1], "this is a first-last-frame model (Wan2.1-FLF2V layout): it starts from a "
                                        "first and a last frame", "a last frame of the video's aspect")
        if last and not self.first_last(bundle):
            raise InputError(fields[1], "this model's image branch reads one image (Wan2.1-I2V layout)",
                             "a first frame only, or a first-last-frame model (Wan2.1-FLF2V layout)")

    def image_conditioning(self, bundle, image, last_image, num_frames, height, width, noise):
        images = [image] if last_image is None else [image, last_image]
        condition = self.video_condition(bundle, images, num_frames, height, width)
        return ImageBranch(condition, self.image_tokens(bundle, images) if self.image_branch(bundle) else None)

    def image_tokens(self, bundle, images) -> torch.Tensor:
        """CLIP's penultimate hidden states of the images, one row of tokens: [1, images * tokens, D]."""
        encoder = bundle.image_encoder
        pixels = bundle.image_processor(images=images, return_tensors="pt").pixel_values
        hidden = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype), output_hidden_states=True)
        tokens = hidden.hidden_states[-2].float()
        return tokens.reshape(1, -1, tokens.shape[-1])

    def video_condition(self, bundle, images, num_frames, height, width) -> torch.Tensor:
        """[1, 4 + 16, latent frames, h, w]: the mask of the frames given, then the latents of a video that is
        those frames with black between them."""
        from ..images import to_pixels

        pixels = [to_pixels(im, height, width).unsqueeze(2) for im in images]
        black = pixels[0].new_zeros(1, 3, num_frames - len(images), height, width)
        video = torch.cat([pixels[0], black, *pixels[1:]], dim=2)
        latents = self.encode(bundle, video.to(bundle.device, bundle.vae.dtype)).float()
        mask = frame_mask(num_frames, self.temporal_factor(bundle), *latents.shape[-2:], last=len(images) == 2)
        return torch.cat([mask.to(latents), latents], dim=1)

    # --- the steps of sampling -------------------------------------------------------------------
    def predict(self, bundle, latents, t, embeds):
        model = self.denoiser_at(bundle, t)
        cfg = model.config
        if cfg.image_dim is None:  # Wan2.2-I2V-A14B: the image is in the input channels only
            return super().predict(bundle, latents, t, embeds)
        image, text = unpack_tokens(embeds, TEXT_TOKENS, cfg.text_dim, cfg.image_dim)
        if cfg.pos_embed_seq_len is not None:  # one row per image: the embedder adds positions across the pair
            image = image.reshape(-1, image.shape[1] // 2, image.shape[2])
        return model(
            hidden_states=latents.to(model.dtype), timestep=t.expand(latents.shape[0]),
            encoder_hidden_states=text.to(model.dtype), encoder_hidden_states_image=image.to(model.dtype),
            return_dict=False,
        )[0]

    def training_objective(self, bundle, cfg=None):
        raise ValueError("wan-i2v: t2v does not train image-conditioned denoisers yet; train a wan or unet3d model "
                         "(they start videos from images by latent replacement)")

    def build(self, preset: str = "wan2.1-i2v-14b-480p", text_dim: int = 384, text_encoder: bool = False,
              device=None, **overrides):
        """The released checkpoints' components with random weights, {transformer, vae, scheduler, image_encoder}
        (+ text_encoder with text_encoder=True); device="meta": shapes only."""
        from transformers import CLIPVisionConfig, CLIPVisionModel

        components = super().build(preset, text_dim, text_encoder, device, **overrides)
        if "image_encoder" in PRESETS[preset]:  # (Wan2.2-I2V-A14B has none)
            image_cfg = {**PRESETS[preset]["image_encoder"], **overrides.get("image_encoder", {})}
            with torch.device(device or "cpu"):
                components["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(**image_cfg))
        return components


WAN_I2V = WanImageToVideoFamily(
    name="wan-i2v",
    pipeline_class="WanImageToVideoPipeline",
    denoiser_key="transformer",
    samplers=FLOW_SAMPLERS,
    flow=True,
    presets=PRESETS,
    expert_key="transformer_2",
    # Wan2.1-I2V-14B-480P's recommended settings.
    defaults=dict(num_frames=81, height=480, width=832, fps=16, num_inference_steps=50, guidance_scale=5.0,
                  max_sequence_length=TEXT_TOKENS, max_frames=161, min_size=16, max_size=1280),
)
