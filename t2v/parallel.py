"""One video on several devices: guidance-parallel and sequence-parallel denoising.

    cfg: 2         the unconditional and conditional halves of every guided step run on two ranks at once and
                   meet where the scheduler steps (`split_guidance`); each rank holds a copy of the transformer
    ulysses: N     diffusers' context parallelism (`ContextParallelConfig`): the sequence of every forward is
    ring: N        split over N ranks that run each forward together, Ulysses by all-to-all of heads, ring by
                   passing keys and values round (ring needs an attention kernel that returns log-sum-exp:
                   flash or _native_cudnn on a GPU)

The lead rank runs the sampling loop; the others only predict what it sends them. How the requests travel
(a thread, a Ray actor in the Serve replica's placement group) is the caller's; this module holds the rules:
which half goes where, how the halves meet, how a rank joins a sequence-parallel group. A layout becomes the
bundle's way of predicting (`attach`), so every sampling loop on that bundle -- a clip, a long video's
windows, a programme's clips, per-step batches -- uses it.
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import InputError
from .ports import free_port
from .sampling import classifier_free_guidance, local_requests

Request = tuple  # (x, t, embeds, guidance_scale), as sampling.predict_batch takes them
PredictRequests = Callable[[list], list]  # requests -> predictions
StartRequests = Callable[[list], Callable[[], list]]  # requests -> wait() for their predictions


@dataclass(frozen=True)
class ParallelLayout:
    cfg: int = 1  # ranks the guidance halves are split over (1 or 2)
    ulysses: int = 1  # sequence-parallel degrees (diffusers' ContextParallelConfig)
    ring: int = 1
    attention_backend: str | None = None  # diffusers attention backend of every rank (ring needs flash / cudnn)

    @classmethod
    def parse(cls, cfg=1, ulysses=1, ring=1, attention_backend=None, **unknown) -> "ParallelLayout":
        if unknown:
            raise InputError("parallel", f"unknown key(s) {', '.join(sorted(unknown))}",
                             "cfg, ulysses, ring, attention_backend")
        for name, value in (("cfg", cfg), ("ulysses", ulysses), ("ring", ring)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"parallel.{name}", f"{value!r} is not a number of ranks", "an integer >= 1")
        if attention_backend is not None:
            from diffusers.models.attention_dispatch import AttentionBackendName

            known = sorted(b.value for b in AttentionBackendName)
            if attention_backend not in known:
                raise InputError("parallel.attention_backend", f"unknown backend {attention_backend!r}",
                                 ", ".join(known))
        if cfg > 2:
            raise InputError("parallel.cfg", f"{cfg} ranks for two guidance halves", "1 or 2")
        if cfg > 1 and ulysses * ring > 1:
            raise InputError("parallel", "cfg and a sequence split in one layout are not supported",
                             "either cfg: 2, or ulysses / ring")
        return cls(cfg=cfg, ulysses=ulysses, ring=ring, attention_backend=attention_backend)

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring

    @property
    def ranks(self) -> int:
        """Processes (devices) one video runs on."""
        return self.cfg * self.sequence

    @property
    def name(self) -> str:
        """How a job record names the layout that served it: "single", "cfg2", "ulysses2", "ulysses2+ring2"."""
        parts = [f"{k}{v}" for k, v in (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring)) if v > 1]
        return "+".join(parts) or "single"

    def describe(self) -> dict:
        """What a job record keeps of the layout that served it (its `t2v.served_by`)."""
        return {"parallel": self.name, "ranks": self.ranks}


def layout_of(bundle) -> ParallelLayout:
    """The layout attached to a bundle (`attach`); one device when none is."""
    return getattr(getattr(bundle, "runtime", None), "layout", None) or ParallelLayout()


# --- guidance-parallel ------------------------------------------------------------------------------------

def split_guidance(requests: list[Request], predict_here: PredictRequests, start_there: StartRequests) -> list:
    """Predictions for (x, t, embeds, guidance) requests, as `sampling.predict_batch` gives them. Each guided
    request's unconditional half (the first half of its embeddings, the negative prompts) is started on the
    other rank first; its conditional half, and any unguided request, runs here meanwhile; the halves meet in
    classifier-free guidance."""
    here, there, plan = [], [], []
    for x, t, e, g in requests:
        if g > 1.0:
            negative, positive = guidance_halves(e)
            plan.append((len(here), len(there), g))
            here.append((x, t, positive, 1.0))
            there.append((x, t, negative, 1.0))
        else:
            plan.append((len(here), None, g))
            here.append((x, t, e, g))
    wait = start_there(there) if there else list
    mine = predict_here(here)
    theirs = wait()
    return [mine[i] if j is None else classifier_free_guidance(theirs[j].to(mine[i].device), mine[i], g)
            for i, j, g in plan]


class PerTensor:
    """Values made once per tensor object and dropped when it is (a WeakKeyDictionary would compare tensors
    with ==, elementwise). A value must not refer to its tensor, or the tensor would never go."""

    def __init__(self):
        self._values: dict[int, object] = {}

    def get(self, tensor: torch.Tensor, make: Callable):
        key = id(tensor)
        if key not in self._values:
            self._values[key] = make(tensor)
            weakref.finalize(tensor, self._values.pop, key, None)
        return self._values[key]


_halves = PerTensor()


def guidance_halves(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative, positive) halves of a guided request's embeddings: the same two tensors at every step of a
    sampling loop (which passes the same embeddings each step), so what a rank got of them once can be
    reused. Copies, not views: a view would keep its embeddings alive."""
    return _halves.get(embeds, lambda e: tuple(h.clone() for h in e.chunk(2)))


def lockstep(predict_here: PredictRequests, start_followers: StartRequests) -> PredictRequests:
    """A sequence-parallel group's forward: every rank runs the same requests together (their collectives
    meet inside the transformer); the lead's predictions are the result. One forward at a time, so every rank
    sees them in the same order even when several threads (jobs, windows) predict at once."""
    order = threading.Lock()

    def predict(requests):
        with order:
            wait = start_followers(requests)
            out = predict_here(requests)
            wait()
        return out

    return predict


def attach(bundle, layout: ParallelLayout, start_peers: StartRequests | None) -> None:
    """Make the layout the way `bundle`'s forwards run (bundle.runtime.forward). start_peers sends requests
    to the other ranks: to the guidance rank for cfg, to every follower for a sequence split."""
    from .runtime import Runtime

    if bundle.runtime is None:
        bundle.runtime = Runtime()
    if layout.cfg > 1 and bundle.family.guidance_input(bundle):
        raise InputError("parallel.cfg", "this model takes the guidance scale as an input: one forward a step, no "
                         "guidance halves to split over ranks", "1")
    here = local_requests(bundle)
    bundle.runtime.layout = layout
    if layout.cfg > 1:
        bundle.runtime.forward = lambda requests: split_guidance(requests, here, start_peers)
    elif layout.sequence > 1:
        bundle.runtime.forward = lockstep(here, start_peers)
    else:
        bundle.runtime.forward = None


class Rank:
    """A rank other than the lead: a bundle's transformer, predicting what the lead sends (on CPU tensors, so
    they may cross processes)."""

    def __init__(self, bundle):
        self.bundle = bundle
        self._predict = local_requests(bundle)

    def join(self, rank: int, world: int, address: str, layout: ParallelLayout) -> None:
        join_sequence_parallel(self.bundle, rank, world, address, layout)

    @torch.no_grad()
    def predict(self, requests: list[Request], reply: bool = True) -> list | None:
        device = self.bundle.device
        moved = [(x.to(device), t.to(device), e.to(device), g) for x, t, e, g in requests]
        out = self._predict(moved)
        return [p.cpu() for p in out] if reply else None  # a sequence follower's copy is the lead's: not sent


def thread_peer(rank: Rank) -> StartRequests:
    """start_peers for a guidance rank in this process (e.g. a second GPU of this machine, or a test)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="t2v-guidance-rank")

    def start(requests):
        future = pool.submit(rank.predict, requests)
        return future.result

    return start


# --- sequence-parallel ------------------------------------------------------------------------------------

def free_address(host: str = "127.0.0.1") -> str:
    """host:port for a process group's rendezvous, a port free on this node now (`t2v.ports.free_port`)."""
    return f"{host}:{free_port(host)}"


def join_sequence_parallel(bundle, rank: int, world: int, address: str, layout: ParallelLayout) -> None:
    """Join this process to the layout's process group (rank of world, rendezvous at address) and split its
    transformer's sequence with diffusers' context parallelism. Every rank calls this with the same layout."""
    import torch.distributed as dist

    for model in bundle.experts:
        check_sequence_parallel(model, layout, bundle.device)
    device = torch.device(bundle.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{address}",
                                rank=rank, world_size=world)
    for model in bundle.experts:  # a mixture of experts: both split the same way, one group
        if layout.attention_backend:
            model.set_attention_backend(layout.attention_backend)
        enable_context_parallel(model, layout, device)


def check_sequence_parallel(model, layout: ParallelLayout, device) -> None:
    """Refuse, before any process group forms, a split the model or the device cannot run."""
    name = "parallel.ulysses" if layout.ulysses > 1 else "parallel.ring"
    if getattr(model, "_cp_plan", None) is None:
        raise InputError(name, f"{type(model).__name__} has no context-parallel plan in diffusers",
                         "a transformer with _cp_plan (the wan family)")
    heads = getattr(model.config, "num_attention_heads", None)
    if heads is not None and heads % layout.ulysses:
        raise InputError("parallel.ulysses", f"{layout.ulysses} does not divide the model's {heads} heads",
                         "a divisor of num_attention_heads")
    if layout.ring > 1 and torch.device(device).type != "cuda":
        # Seen with diffusers 0.42: "Native attention does not support return_lse=True".
        raise InputError("parallel.ring", "ring attention needs the kernel's log-sum-exp, which the native (CPU) "
                         "attention does not return", "ulysses on a CPU; ring on a GPU with attention_backend "
                         "flash or _native_cudnn")


def enable_context_parallel(model, layout: ParallelLayout, device: torch.device) -> None:
    """diffusers' `enable_parallelism(ContextParallelConfig(...))`. On a CPU, diffusers 0.42 divides by the
    accelerator count to pick the rank's device (ZeroDivisionError); there the same config is set up on a CPU
    mesh and diffusers' own context-parallel hooks are applied, as enable_parallelism does after that point."""
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=layout.ulysses, ring_degree=layout.ring)
    if device.type == "cuda":
        model.enable_parallelism(config=config)
        return
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig

    parallel = ParallelConfig(context_parallel_config=config)
    mesh = dist.device_mesh.init_device_mesh("cpu", config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
    parallel.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    model._parallel_config = parallel
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor._parallel_config = parallel
    apply_context_parallel(model, config, model._cp_plan)


def env_rank() -> tuple[int, int, str]:
    """(rank, world, address) from torchrun's environment, for `join_sequence_parallel` outside Ray."""
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
