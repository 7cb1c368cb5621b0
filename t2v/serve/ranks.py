"""The extra ranks of a Denoiser replica's parallel layout (`parallel` in a Serve config): Ray actors its replica
starts in its own placement group, and the wire format tensors take between them."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

from .. import parallel
from .stages import stage_pipeline

log = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's own log file


def parse_parallel(options: dict | None) -> tuple[parallel.ParallelLayout, dict]:
    """A Serve config's `parallel` ({cfg | ulysses | ring, attention_backend, rank_actor_options}) -> the
    layout and the ray_actor_options of each extra rank (e.g. {num_gpus: 1})."""
    options = dict(options or {})
    rank_options = options.pop("rank_actor_options", None) or {}
    return parallel.ParallelLayout.parse(**options), rank_options


def start_ranks(bundle, layout: parallel.ParallelLayout, rank_options: dict, stage: tuple,
                rank_class: type | None = None) -> list:
    """A layout's other ranks for the bundle of a Denoiser replica (the lead): Ray actors it starts, so they land
    in its placement group (the Denoiser's placement_group_bundles reserve their GPUs) and die with it; the
    bundle's forwards then run across them (`parallel.attach`). stage: (model, precision, threads, runtime),
    what each rank loads; rank_class: the actor (default DenoiserRank)."""
    if layout.ranks == 1:
        return []
    import ray

    if layout.sequence > 1:  # refused here, before any process group forms
        for model in bundle.experts:
            parallel.check_sequence_parallel(model, layout, bundle.device)
    actor = ray.remote(rank_class or DenoiserRank).options(**rank_options)
    ranks = [actor.remote(*stage) for _ in range(layout.ranks - 1)]
    dtype = bundle.denoiser.dtype
    stored = parallel.PerTensor()  # a job's embeddings -> their copy in Ray's object store

    def on_cpu(requests):
        """Requests as they travel: latents in the denoiser's dtype (its forward casts them to it anyway);
        embeddings, the same at every step of a job, put in the object store once and passed by reference."""
        return [(to_wire(x.to(dtype)), t.cpu(), stored.get(e, lambda e: ray.put(to_wire(e.to(dtype)))), g)
                for x, t, e, g in requests]

    def gathered(refs):
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError:
            # A rank died: the gang cannot sample any more. The replica ends itself, so Serve replaces it (ranks
            # and all) and the job service retries its jobs there, as for any replica that dies.
            log.error("a rank of this Denoiser's %s layout died: the replica exits to be replaced", layout.name)
            os._exit(1)

    if layout.sequence > 1:
        address = parallel.free_address(ray.util.get_node_ip_address())
        joined = [r.join.remote(i + 1, layout.ranks, address, layout) for i, r in enumerate(ranks)]
        parallel.join_sequence_parallel(bundle, 0, layout.ranks, address, layout)
        ray.get(joined)

        def start_peers(requests):  # parallel.lockstep sends one forward at a time, in order
            sent = on_cpu(requests)
            refs = [r.predict.remote(sent, False) for r in ranks]
            return lambda: gathered(refs)
    else:
        def start_peers(requests):
            ref = ranks[0].predict.remote(on_cpu(requests))
            return lambda: [from_wire(p) for p in gathered(ref)]
    parallel.attach(bundle, layout, start_peers)
    return ranks


def to_wire(x: torch.Tensor) -> tuple:
    """A tensor as Ray moves it fastest between processes: a numpy array, which leaves the object store without
    a copy (a torch tensor is pickled: about 3x slower at 16 MiB); bf16, which numpy lacks, as int16 bits."""
    x = x.detach().cpu().contiguous()
    return (x.view(torch.int16).numpy(), "bfloat16") if x.dtype == torch.bfloat16 else (x.numpy(), None)


def from_wire(wire: tuple) -> torch.Tensor:
    array, dtype = wire
    x = torch.from_numpy(array.copy())  # the store's buffer is read-only
    return x.view(torch.bfloat16) if dtype == "bfloat16" else x


class DenoiserRank:
    """One extra rank of a Denoiser replica's parallel layout (a Ray actor in the replica's placement group):
    the transformer's weights only, predicting what the replica sends (`parallel.Rank`)."""

    def __init__(self, *stage):
        self.rank = parallel.Rank(self.load(*stage))
        self._embeds: OrderedDict = OrderedDict()

    def load(self, model, precision, threads, runtime):
        """The bundle this rank runs: the stage's model, the transformer's weights only."""
        return stage_pipeline(model, precision, threads, runtime, weights=("denoiser",)).bundle

    def join(self, rank: int, world: int, address: str, layout) -> None:
        self.rank.join(rank, world, address, layout)

    def predict(self, requests: list, reply: bool = True):
        import ray

        for _, _, ref, _ in requests:  # a job's embeddings: fetched at its first step, then kept (a few jobs)
            if ref not in self._embeds:
                self._embeds[ref] = from_wire(ray.get(ref))
                while len(self._embeds) > 16:
                    self._embeds.popitem(last=False)
            self._embeds.move_to_end(ref)
        out = self.rank.predict([(from_wire(x), t, self._embeds[ref], g) for x, t, ref, g in requests], reply)
        return None if out is None else [to_wire(p) for p in out]

    def ping(self) -> bool:
        return True
