"""Runtime options of a loaded bundle, each mapped onto diffusers' (or torch's) own mechanism:

    memory   vae_tiling[:px] AutoencoderKLWan / AutoencoderKL .enable_tiling(): decode in overlapping tiles
                             (diffusers' default tile size, or px-pixel tiles with a quarter overlap)
             vae_slicing     .enable_slicing(): one video of a batch at a time
             group_offload   diffusers.hooks.apply_group_offloading: the transformer block by block and the
                             text encoder leaf by leaf live on the CPU and visit the GPU for their forward
                             (on CUDA with a side stream that prefetches the next group)
             expert_offload  a mixture of experts (Wan2.2 A14B) with one expert on the device at a time: the
                             other waits in host memory; at the switch the high-noise expert leaves and the
                             low-noise one comes, and back at the next video's first step
    cache    first_block[:threshold]   FirstBlockCacheConfig (default 0.05)
             taylorseer[:interval]     TaylorSeerCacheConfig (default cache_interval 5)
             pab                       PyramidAttentionBroadcastConfig (spatial attention every 2nd step in
                                       the middle of the schedule)
    compile  torch.compile of the transformer's repeated block (diffusers' compile_repeated_blocks: one
             compiled graph serves every block; the whole model for a denoiser without repeated blocks)

A step cache lives in the transformer's hooks and is keyed by a context name per call. A sampling loop asks
`step_predictor` for its predictor: with a cache on, each latent of a step (a video, or each window of a
long video) is predicted under a context of its own, with the step index the cache schedules on; without one
the predictor is returned as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import InputError

MEMORY_OPTIONS = ("vae_tiling", "vae_slicing", "group_offload", "expert_offload")


@dataclass(frozen=True)
class RuntimeOptions:
    memory: tuple[str, ...] = ()
    cache: str | None = None  # "first_block", "first_block:0.1", "taylorseer:4", "pab"
    compile: bool = False

    @classmethod
    def parse(cls, memory=None, cache=None, compile=False, **unknown) -> "RuntimeOptions":
        """From CLI text ("vae_tiling,group_offload"), a list (YAML) or None; every name checked."""
        if unknown:
            raise InputError("runtime", f"unknown key(s) {', '.join(sorted(unknown))}", "memory, cache, compile")
        if isinstance(memory, str):
            memory = [m for m in memory.replace(" ", "").split(",") if m]
        memory = tuple(memory or ())
        for option in memory:
            name, _, value = option.partition(":")
            if name not in MEMORY_OPTIONS or (value and (name != "vae_tiling" or not value.isdigit())):
                raise InputError("memory", f"unknown option {option!r}",
                                 ", ".join(MEMORY_OPTIONS) + " (vae_tiling:<tile pixels>, e.g. vae_tiling:256)")
        if cache in ("", "none"):
            cache = None
        if cache is not None:
            cache_config(cache, lambda: 0)  # checks the name and its value now
        return cls(memory=memory, cache=cache, compile=bool(compile))


def cache_config(spec: str, current_timestep: Callable[[], float]):
    """A cache spec ("name" or "name:value") -> the diffusers hook config."""
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    name, _, value = str(spec).partition(":")
    try:
        if name == "first_block":
            return FirstBlockCacheConfig(threshold=float(value or 0.05))
        if name == "taylorseer":
            # Lite mode: on a predicted step the blocks are skipped and proj_out's output is extrapolated (the
            # default patterns match no module of WanTransformer3DModel: "^blocks.*attn" fullmatches no name).
            return TaylorSeerCacheConfig(cache_interval=int(value or 5), disable_cache_before_step=2,
                                         taylor_factors_dtype=torch.float32, use_lite_mode=True)
        if name == "pab" and not value:
            return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                   spatial_attention_timestep_skip_range=(100, 800),
                                                   current_timestep_callback=current_timestep)
    except ValueError:
        raise InputError("cache", f"{spec!r}: the value after ':' must be a number") from None
    raise InputError("cache", f"unknown cache {spec!r}", "first_block[:threshold], taylorseer[:interval], pab")


@dataclass
class Runtime:
    """What `apply` switched on for a bundle (bundle.runtime), and the state a step cache reads."""

    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    timestep: float = 1000.0  # the current step's timestep (PyramidAttentionBroadcast asks for it)
    compile_s: float | None = None  # the first compiled forward's time (the warm-up), once measured
    forward: Callable | None = None  # requests -> predictions through a parallel layout's ranks (t2v.parallel)
    layout: object = None  # that t2v.parallel.ParallelLayout
    device: torch.device | None = None  # expert_offload: where the resident expert runs
    resident: int | None = None  # expert_offload: the expert on that device
    expert_swaps: int = 0  # expert_offload: how many times an expert came onto the device

    def onload(self, experts: list, index: int) -> None:
        """expert_offload: expert `index` on the device, the other in host memory (moved off first, so the
        device never holds both)."""
        if self.resident is None or self.resident == index:
            return
        for k, model in enumerate(experts):
            if k != index and not is_shapes_only(model):
                model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        experts[index].to(self.device)
        self.resident = index
        self.expert_swaps += 1


def is_shapes_only(module: torch.nn.Module | None) -> bool:
    """A component built by `t2v.load(weights=...)` without its weights."""
    param = next(module.parameters(), None) if module is not None else None
    return param is not None and param.is_meta


def apply(bundle, options: RuntimeOptions | None = None, device: str | torch.device | None = None):
    """Switch the options on for a loaded bundle (in place; returns it). device: where the forwards run
    (default: the bundle's); with group_offload the offloaded weights stay on the CPU."""
    options = options or RuntimeOptions()
    runtime = Runtime(options)
    bundle.runtime = runtime
    device = torch.device(device or bundle.device)
    vae = bundle.vae
    for option in options.memory:
        name, _, tile = option.partition(":")
        if name == "vae_tiling":
            _require(vae, "enable_tiling", "memory", "vae_tiling")
            if tile and hasattr(vae, "tile_sample_min_size"):  # AutoencoderKL: square tiles, a quarter overlap
                vae.enable_tiling()
                vae.tile_sample_min_size = int(tile)
                vae.tile_latent_min_size = int(tile) // 2 ** (len(vae.config.block_out_channels) - 1)
                continue
            # diffusers' default tiles (256 px, stride 192 for Wan) unless given; the stride keeps a quarter overlap
            vae.enable_tiling(**({} if not tile else dict(
                tile_sample_min_height=int(tile), tile_sample_min_width=int(tile),
                tile_sample_stride_height=int(tile) * 3 // 4, tile_sample_stride_width=int(tile) * 3 // 4)))
    if "expert_offload" in options.memory:
        if len([m for m in bundle.experts if not is_shapes_only(m)]) < 2:
            raise InputError("memory", "expert_offload swaps the two experts of a mixture (Wan2.2 A14B); this model "
                             "has one denoiser here", "vae_tiling, vae_slicing, group_offload")
        if "group_offload" in options.memory:
            raise InputError("memory", "expert_offload and group_offload both place the experts: choose one",
                             "expert_offload (one expert on the device) or group_offload (one block)")
        runtime.device, runtime.resident = device, 0  # `place` put the high-noise expert on the device
    if "vae_slicing" in options.memory:
        _require(vae, "enable_slicing", "memory", "vae_slicing")
        vae.enable_slicing()
    if "group_offload" in options.memory:
        from diffusers.hooks import apply_group_offloading

        stream = device.type == "cuda"
        # Blocks of the transformer one at a time (the stream prefetches the next); the encoder leaf by leaf.
        for expert in bundle.experts:
            if not is_shapes_only(expert):
                apply_group_offloading(expert, onload_device=device, offload_device="cpu",
                                       offload_type="block_level", num_blocks_per_group=1, use_stream=stream)
        if not is_shapes_only(bundle.text_encoder):
            apply_group_offloading(bundle.text_encoder, onload_device=device, offload_device="cpu",
                                   offload_type="leaf_level", use_stream=stream)
    # A mixture of experts: each keeps a cache of its own steps. (An expert without weights, e.g. in a stage that
    # never runs the transformer or on another expert's replica: nothing to cache or compile.)
    for model in (m for m in bundle.experts if not is_shapes_only(m)):
        if options.cache:
            _require(model, "enable_cache", "cache", options.cache)
            bundle.family.check_cache(bundle, options.cache.partition(":")[0])
            model.enable_cache(cache_config(options.cache, lambda: runtime.timestep))
        if options.compile:
            if getattr(model, "_repeated_blocks", None):
                model.compile_repeated_blocks(fullgraph=True)
            else:
                model.compile()
    return bundle


def _require(module, method: str, field_name: str, value: str) -> None:
    if not hasattr(module, method):
        raise InputError(field_name, f"{value} needs {type(module).__name__}.{method}(), which it does not have")


def options_of(bundle) -> RuntimeOptions:
    runtime = getattr(bundle, "runtime", None)
    return runtime.options if runtime is not None else RuntimeOptions()


def step_predictor(bundle, predict: Callable, num_steps: int) -> Callable:
    """The predictor a sampling loop calls once per denoiser step. With a step cache on, a fresh cache state
    for this generation, and each latent of a call (a clip, or one window of a long video) predicted under a
    cache context of its own ("latent-<k>"), so the cache compares each with itself a step earlier."""
    runtime = getattr(bundle, "runtime", None)
    if runtime is None or not runtime.options.cache:
        return _timed_first(bundle, predict)
    for model in (m for m in bundle.experts if not is_shapes_only(m)):  # as diffusers' pipelines between calls
        model._reset_stateful_cache()
    step = [0]

    def predict_cached(xs, t, embeds, guidance):
        runtime.timestep = float(t.max()) if torch.is_tensor(t) else float(t)  # per-token: the step's is the largest
        # At a mixture's switch the low-noise expert starts from a cache of its own, empty.
        model = bundle.family.denoiser_at(bundle, t)
        out = []
        for k, (x, e) in enumerate(zip(xs, embeds)):
            with model.cache_context(f"latent-{k}", step_index=step[0], num_inference_steps=num_steps,
                                     timestep=runtime.timestep):
                out += predict([x], t, [e], guidance)
        step[0] += 1
        return out

    return _timed_first(bundle, predict_cached)


def _timed_first(bundle, predict: Callable) -> Callable:
    """Records the first forward's time of a compiled model (its warm-up: tracing and code generation)."""
    runtime = getattr(bundle, "runtime", None)
    if runtime is None or not runtime.options.compile or runtime.compile_s is not None:
        return predict

    def first(*args):
        t0 = time.perf_counter()
        out = predict(*args)
        if runtime.compile_s is None:
            runtime.compile_s = time.perf_counter() - t0
        return out

    return first
