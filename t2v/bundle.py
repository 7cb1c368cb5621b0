"""Diffusers-format video bundles: `model_index.json` + one folder per component, safetensors only.

A bundle is the reference diffusers pipeline's folder (WanPipeline or TextToVideoSDPipeline), so real
Wan2.1 and ModelScope checkpoints load here and t2v's bundles load in diffusers. t2v's own generation
defaults and limits ride along in model_index.json under "_t2v" (diffusers ignores keys starting with _).
A bundle whose text_encoder entry is null uses the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import storage
from .errors import BundleError, InputError
from .families import FAMILIES, Family, family_of
from .runtime import RuntimeOptions, apply, is_shapes_only
from .text import DEFAULT_TEXT_ENCODER, load_default_text_encoder

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.qint8}
DEFAULT_MODEL = Path(__file__).parent / "models" / "default"


@dataclass
class BundleConfig:
    """Generation defaults and limits of one bundle (model_index.json's "_t2v")."""

    num_frames: int
    height: int
    width: int
    fps: float
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int
    max_frames: int
    min_size: int
    max_size: int
    negative_prompt: str = ""
    text_encoder: str | None = None  # DEFAULT_TEXT_ENCODER when the packaged MiniLM is used
    description: str = ""
    vocabulary: str = "open"  # "world": trained on the synthetic world's captions only (the prompt optimizer
    # then rewrites prompts into that phrasing and adds no tags)
    frame_noise_correlation: float = 0.0  # the share of the noise's variance a clip's frames share, in training
    # and so in sampling (t2v.sampling.frame_correlated_noise)
    guidance_range: list | None = None  # [lowest, highest]: a denoiser that takes the guidance scale as an input
    # (a guidance-distilled student, TrainConfig.guidance_range) was trained on these scales and takes no others

    def __post_init__(self):
        if not 0.0 <= self.frame_noise_correlation < 1.0:
            raise ValueError(f"frame_noise_correlation: {self.frame_noise_correlation} is not in [0, 1)")
        if self.guidance_range is not None and not (
                len(self.guidance_range) == 2 and 0.0 <= self.guidance_range[0] <= self.guidance_range[1]):
            raise ValueError(f"guidance_range: [lowest, highest] guidance scale, got {self.guidance_range}")

    @classmethod
    def from_dict(cls, family: Family, values: dict | None) -> "BundleConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**family.defaults, **{k: v for k, v in (values or {}).items() if k in names}})


@dataclass
class Bundle:
    family: Family
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any
    tokenizer: Any
    text_encoder: torch.nn.Module
    config: BundleConfig
    precision: str = "fp32"
    source: str | None = None
    runtime: Any = None  # t2v.runtime.Runtime: the memory, cache and compile options switched on
    image_encoder: torch.nn.Module | None = None  # an image-conditioned family's (wan-i2v: CLIP's vision model)
    image_processor: Any = None  # and its preprocessing (CLIPImageProcessor)
    # A mixture of two experts (Wan2.2 A14B): `denoiser` takes the high-noise steps, t >= boundary_ratio x the
    # training timesteps, and `denoiser_2` the rest (`Family.expert`).
    denoiser_2: torch.nn.Module | None = None
    boundary_ratio: float | None = None
    # Per-token timesteps (Wan2.2 TI2V-5B): an image holds the first latent frame clean, at t = 0.
    expand_timesteps: bool = False

    @property
    def experts(self) -> tuple[torch.nn.Module, ...]:
        """The denoisers: one, or the high- and the low-noise expert."""
        return (self.denoiser,) if self.denoiser_2 is None else (self.denoiser, self.denoiser_2)

    @property
    def device(self) -> torch.device:
        """Where the sampling tensors live: the VAE's device (the first component with weights, when it was
        loaded without them)."""
        for module in (self.vae, self.denoiser, self.text_encoder):
            if module is not None and not is_shapes_only(module):
                return next(module.parameters()).device
        return torch.device("cpu")

    @property
    def uses_packaged_text_encoder(self) -> bool:
        return self.config.text_encoder == DEFAULT_TEXT_ENCODER

    def save(self, uri: str) -> None:
        """Write a diffusers-format folder (locally or to s3://) that diffusers' pipeline class loads."""
        if self.precision == "int8":
            raise InputError("precision", "an int8 (dynamically quantized) bundle cannot be saved; "
                             "save the fp32/bf16/fp16 bundle", "fp32, bf16, fp16")
        import diffusers

        packaged = self.uses_packaged_text_encoder
        pipeline_cls = getattr(diffusers, self.family.pipeline_class)
        with _quiet_diffusers():
            pipe = pipeline_cls(**{
                self.family.denoiser_key: self.denoiser, "vae": self.vae, "scheduler": self.scheduler,
                "tokenizer": None if packaged else self.tokenizer,
                "text_encoder": None if packaged else self.text_encoder, **self.family.extra_components(self),
            })
        with tempfile.TemporaryDirectory(prefix="t2v-save-") as tmp:
            target = Path(tmp) if storage.is_s3(uri) else Path(uri)
            with _quiet_diffusers():
                pipe.save_pretrained(target, safe_serialization=True)
            index = json.loads((target / "model_index.json").read_text())
            index["_t2v"] = dataclasses.asdict(self.config)
            # Written last and atomically: a folder whose index has t2v's block was saved whole.
            storage.write_bytes(str(target / "model_index.json"), (json.dumps(index, indent=2) + "\n").encode())
            if storage.is_s3(uri):
                storage.upload_dir(target, uri)

    def num_parameters(self) -> dict[str, int]:
        out = {}
        for name in ("text_encoder", "denoiser", "denoiser_2", "vae", "image_encoder"):
            module = getattr(self, name)
            if module is not None or name != "denoiser_2":
                out[name] = sum(p.numel() for p in module.parameters()) if module is not None else 0
        return out


# The components with weights ("denoiser_2": a mixture's low-noise expert, which a replica of the other may skip).
COMPONENTS = ("denoiser", "denoiser_2", "vae", "text_encoder", "image_encoder")


def load(uri: str | Path | None = None, precision: str = "fp32", device: str | torch.device | None = None,
         runtime: RuntimeOptions | None = None, weights: tuple[str, ...] = COMPONENTS) -> Bundle:
    """Load a bundle from a local folder or s3:// URI (default: the embedded model). runtime: memory, cache
    and compile options (`t2v.runtime`); with group_offload the offloaded weights stay on the CPU.
    weights: the components whose weights are read (of denoiser, denoiser_2, vae, text_encoder, image_encoder);
    the others are built from their configs on the meta device, shapes without memory: a serving stage that only
    encodes prompts or only decodes holds no 14B transformer (nor, on a mixture, the other expert)."""
    unknown = set(weights) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)} (known: {', '.join(COMPONENTS)})")
    if precision not in PRECISIONS:
        raise InputError("precision", f"unknown precision {precision!r}", ", ".join(PRECISIONS))
    uri = str(DEFAULT_MODEL if uri in (None, "", "default") else uri)  # "default": the embedded model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision == "int8" and device.type != "cpu":
        raise InputError("precision", "int8 dynamic quantization runs on the CPU only", "fp32, bf16, fp16 on GPU")
    try:
        index = json.loads(storage.read_bytes(storage.join(uri, "model_index.json")))
    except FileNotFoundError:
        raise BundleError(uri, "no such bundle (a folder with model_index.json)") from None
    except NotADirectoryError:
        raise BundleError(uri, "not a folder") from None
    except json.JSONDecodeError as e:
        raise BundleError(uri, f"model_index.json is not valid JSON: {e}") from None
    family = family_of(index, uri)
    family.check_index(index, uri)
    with storage.local_copy(uri) as folder:
        bundle = _load_folder(Path(folder), index, family, uri, weights)
    bundle.source = uri
    for module in (*bundle.experts, bundle.vae, bundle.text_encoder, bundle.image_encoder):
        if module is not None:
            module.requires_grad_(False)  # inference; the training loop turns on what it trains
    return place(bundle, precision, device, runtime)


def place(bundle: Bundle, precision: str, device: torch.device | str, runtime: RuntimeOptions | None = None) -> Bundle:
    """Cast a bundle to its precision on the device and switch its runtime options on. With group_offload the
    offloaded weights stay on the CPU (never the whole model on the device: the hooks bring it block by block)."""
    runtime = runtime or RuntimeOptions()
    device = torch.device(device)
    if "expert_offload" in runtime.memory:  # the low-noise expert waits in host memory until the switch
        to_precision(bundle, precision, "cpu")
        for module in (bundle.denoiser, bundle.vae, bundle.text_encoder, bundle.image_encoder):
            if module is not None and not is_shapes_only(module):
                module.to(device)
        return apply(bundle, runtime, device)
    if "group_offload" not in runtime.memory:
        return apply(to_precision(bundle, precision, device), runtime, device)
    to_precision(bundle, precision, "cpu")
    _cast(bundle.vae, device, torch.float32)
    _cast(bundle.image_encoder, device, torch.float32)
    return apply(bundle, runtime, device)


def _load_folder(folder: Path, index: dict, family: Family, uri: str, weights=COMPONENTS) -> Bundle:
    import diffusers

    config_values = dict(index.get("_t2v") or {})
    kwargs: dict[str, Any] = {}
    packaged = not (index.get("text_encoder") or [None])[0]
    if packaged:
        kwargs["tokenizer"], kwargs["text_encoder"] = load_default_text_encoder()
        config_values["text_encoder"] = DEFAULT_TEXT_ENCODER
    _check_folder(folder, index, family, uri)
    for name in COMPONENTS:
        key = {"denoiser": family.denoiser_key, "denoiser_2": family.expert_key}.get(name, name)
        if key and name not in weights and key not in kwargs and (index.get(key) or [None])[0]:
            kwargs[key] = _shapes_only(folder / key, index[key])
    try:
        with _quiet_diffusers():  # (importing WanImageToVideoPipeline warns that CLIP's processor falls back to PIL)
            pipeline_cls = getattr(diffusers, family.pipeline_class)
            pipe = pipeline_cls.from_pretrained(folder, use_safetensors=True, **kwargs)
    except ImportError as e:
        raise BundleError(uri, f"a package this bundle needs is not installed: {e}") from None
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        component = _failing_component(e.__traceback__)
        raise BundleError(uri, f"diffusers {diffusers.__version__} refused "
                               f"{f'the {component} component' if component else 'the bundle'}: {e}") from None
    if "max_sequence_length" not in config_values and not packaged:
        config_values["max_sequence_length"] = min(int(pipe.tokenizer.model_max_length),
                                                  family.defaults["max_sequence_length"])
    config = BundleConfig.from_dict(family, config_values)
    try:
        family.after_load(pipe, config)
    except ValueError as e:  # the family's own conventions refuse what diffusers accepted
        raise BundleError(uri, str(e)) from None
    image_encoder = getattr(pipe, "image_encoder", None)
    return Bundle(
        family=family, denoiser=getattr(pipe, family.denoiser_key).eval(), vae=pipe.vae.eval(),
        scheduler=pipe.scheduler, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder.eval(),
        config=config, image_encoder=None if image_encoder is None else image_encoder.eval(),
        image_processor=getattr(pipe, "image_processor", None), **family.pipeline_options(pipe),
    )


def _shapes_only(folder: Path, entry: list) -> torch.nn.Module:
    """A component built from its config on the meta device: its class, config and parameter shapes, no
    weights read and no memory held (model_index.json's [library, class] entry names the class)."""
    library, class_name = entry
    with torch.device("meta"):
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            return cls.from_config(cls.load_config(folder)).eval()
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        return getattr(transformers, class_name)(config).eval()


def _check_folder(folder: Path, index: dict, family: Family, uri: str) -> None:
    """Name what is wrong with a bundle before diffusers reads it: a missing loader package, a missing
    component folder, missing or unreadable safetensors weights."""
    from diffusers.utils import is_accelerate_available
    from safetensors import SafetensorError, safe_open

    if not is_accelerate_available():
        raise BundleError(uri, "loading needs the accelerate package, which is not installed "
                               "(a t2v dependency): pip install accelerate")
    required = (family.denoiser_key, "vae", "scheduler")
    named = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
    missing = [k for k in dict.fromkeys([*required, *named]) if not (folder / k).is_dir()]
    if missing:
        raise BundleError(uri, f"missing component folder(s): {', '.join(missing)}")
    for name in (family.denoiser_key, "vae", *(k for k in named if k in ("text_encoder", "image_encoder",
                                                                           family.expert_key))):
        weights = sorted((folder / name).glob("*.safetensors"))
        if not weights:
            others = sorted(p.name for p in (folder / name).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            found = f" (found {others[0]}: convert it with save_pretrained(safe_serialization=True))" if others else ""
            raise BundleError(uri, f"{name}/ has no .safetensors weights{found}; bundles hold safetensors weights only")
        for path in weights:
            try:
                with safe_open(str(path), "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise BundleError(uri, f"{name}/{path.name} is not a readable safetensors file ({e}): it is "
                                       "truncated or corrupt; copy or save the bundle again") from None


def _failing_component(tb) -> str | None:
    """The pipeline component diffusers was loading when it raised (its `load_sub_model(name=...)` frame)."""
    component = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "load_sub_model":
            component = tb.tb_frame.f_locals.get("name")
        tb = tb.tb_next
    return component if isinstance(component, str) else None


def from_components(family: str | Family, components: dict, config: dict | None = None,
                    text_encoder=None, tokenizer=None) -> Bundle:
    """A bundle from models built in memory (see each family's `build`); MiniLM unless given an encoder."""
    family = FAMILIES[family] if isinstance(family, str) else family
    values = dict(config or {})
    if text_encoder is None:
        tokenizer, text_encoder = load_default_text_encoder()
        values["text_encoder"] = DEFAULT_TEXT_ENCODER
    return Bundle(
        family=family, denoiser=components[family.denoiser_key].eval(), vae=components["vae"].eval(),
        scheduler=components["scheduler"], tokenizer=tokenizer, text_encoder=text_encoder.eval(),
        config=BundleConfig.from_dict(family, values), image_encoder=components.get("image_encoder"),
        image_processor=components.get("image_processor"), **family.pipeline_options(components),
    )


def to_precision(bundle: Bundle, precision: str, device: torch.device | str = "cpu") -> Bundle:
    """Cast (or quantize) the denoiser and text encoder; the VAE stays fp32, where colour is decided.

    int8 is dynamic quantization of the denoiser's Linear layers (CPU). Returns the bundle, changed in place.
    """
    if precision not in PRECISIONS:
        raise InputError("precision", f"unknown precision {precision!r}", ", ".join(PRECISIONS))
    device = torch.device(device)
    _cast(bundle.vae, device, torch.float32)
    _cast(bundle.image_encoder, device, torch.float32)  # as diffusers' Wan image-to-video examples load it
    if precision == "int8":
        for expert in bundle.experts:
            _cast(expert, device, torch.float32)
        _cast(bundle.text_encoder, device, torch.float32)
        bundle.denoiser = _quantize_int8(bundle.denoiser)
        if bundle.denoiser_2 is not None:
            bundle.denoiser_2 = _quantize_int8(bundle.denoiser_2)
    else:
        dtype = PRECISIONS[precision]
        for expert in bundle.experts:
            _cast(expert, device, dtype)
        _cast(bundle.text_encoder, device, dtype)
    bundle.precision = precision
    return bundle


def _quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of Linear layers, except those the model keeps in fp32 (its forward reads
    their parameters' dtype, e.g. Wan's time embedder)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    spec = {name: default_dynamic_qconfig for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not keep & set(name.split("."))}
    return quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8)


def _cast(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """`.to(dtype)` that keeps a model's `_keep_in_fp32_modules` (norms, time embeddings) in fp32, as
    diffusers' `from_pretrained(torch_dtype=...)` does."""
    if module is None or is_shapes_only(module):
        return  # no weights to move: a stage that never runs it (load(weights=...)), or no such component
    for p in module.parameters():
        p.data = p.data.to(device, dtype if p.is_floating_point() else p.dtype)
    for b in module.buffers():
        b.data = b.data.to(device, dtype if b.is_floating_point() else b.dtype)
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    if dtype != torch.float32 and keep:
        for name, sub in module.named_modules():
            if keep & set(name.split(".")):
                for p in sub.parameters(recurse=False):
                    p.data = p.data.float()


class _quiet_diffusers:
    """diffusers warns that a BertModel is not the UMT5 its pipeline names; that is by design here."""

    def __enter__(self):
        from diffusers.utils import logging as dlog

        from transformers.utils import logging as tlog

        self._level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        logging.getLogger("transformers").setLevel(logging.ERROR)

    def __exit__(self, *exc):
        from diffusers.utils import logging as dlog

        dlog.set_verbosity(self._level)
        dlog.enable_progress_bar()
