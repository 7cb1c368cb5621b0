"""Synthetic-world clips rendered on the fly for training, without shards: a process pool renders N clips into
chunk files (memory-mapped back), in the background, while training draws batches from the chunks done so
far. Each draw gets a fresh caption of its scene, so the model sees many phrasings of one clip.

Used where rendering is cheaper than moving shards (a GPU machine with idle CPU cores, see
jobs/train_default.py); the shard path (`t2v data world` + `t2v.data.stream`) is the one for clusters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RenderSpec:
    split: str = "train"
    seed: int = 0
    num_frames: int = 17
    size: int = 128
    fps: float = 8.0
    chunk: int = 64  # clips per worker task and chunk file
    masks: bool = False  # also the objects' exact masks (world.render.object_masks), for object-weighted losses


def scene_at(spec: RenderSpec, index: int):
    """The index-th scene of a split: deterministic, so any worker renders any clip."""
    from ..world import sample_scene

    rng = random.Random(f"{spec.seed}/{spec.split}/{index}")
    return sample_scene(rng, spec.split, width=spec.size, height=spec.size, num_frames=spec.num_frames, fps=spec.fps)


def _render_chunk(args: tuple) -> tuple[int, list[str]]:
    spec, folder, chunk_index, start, stop = args
    from ..world import render
    from ..world.render import object_masks

    scenes = [scene_at(spec, i) for i in range(start, stop)]
    video = np.stack([render(s) for s in scenes])
    path = os.path.join(folder, f"chunk-{chunk_index:05d}.npy")
    if spec.masks:  # bits packed along the width: 1/24 of the frames' bytes
        masks = np.stack([object_masks(s, v) for s, v in zip(scenes, video)])
        np.save(path[:-4] + ".masks.npy", np.packbits(masks, axis=-1))
    np.save(path + ".tmp.npy", video)
    os.replace(path + ".tmp.npy", path)  # readers never see a half-written chunk (its masks are written first)
    return chunk_index, [s.to_json() for s in scenes]


class RenderedWorld:
    """`clips` clips of one split, rendered by `workers` processes into `folder` (a temporary one by default)."""

    def __init__(self, clips: int, spec: RenderSpec = RenderSpec(), workers: int | None = None,
                 folder: str | None = None):
        if clips < 1:
            raise ValueError(f"clips must be >= 1, got {clips}")
        self.clips, self.spec = clips, spec
        self.workers = workers or max(1, (os.cpu_count() or 2) - 2)
        self._own_folder = folder is None
        need = clips * spec.num_frames * spec.size * spec.size * 3
        self.folder = folder or tempfile.mkdtemp(prefix="t2v-world-", dir=_roomy_tmp(need))
        os.makedirs(self.folder, exist_ok=True)
        self._chunks: dict[int, tuple[np.ndarray, list]] = {}  # chunk index -> (memmap [n, T, H, W, 3], scenes)
        self._masks: dict[int, np.ndarray] = {}  # chunk index -> packed masks [n, T, H, W / 8] (spec.masks)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.render_seconds = 0.0

    # -- rendering -------------------------------------------------------------------------------------
    def start(self) -> "RenderedWorld":
        """Start rendering in the background (fork the pool before any CUDA call: workers use numpy/PIL only)."""
        import multiprocessing as mp

        c = self.spec.chunk
        jobs = [(self.spec, self.folder, k, s, min(s + c, self.clips)) for k, s in enumerate(range(0, self.clips, c))]
        spec_file = os.path.join(self.folder, "spec.json")  # a kept folder is reused only for the same spec
        same = os.path.exists(spec_file) and json.loads(open(spec_file).read()) == dataclasses.asdict(self.spec)
        if same:
            jobs = [j for j in jobs if not self._load_rendered(*j)]
        else:  # another spec's chunks (or none): start the folder afresh
            for name in os.listdir(self.folder):
                if name.startswith("chunk-"):
                    os.remove(os.path.join(self.folder, name))
            with open(spec_file, "w") as f:
                json.dump(dataclasses.asdict(self.spec), f)
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(self.workers)

        def collect():
            t0 = time.perf_counter()
            try:
                for k, scenes in pool.imap_unordered(_render_chunk, jobs):
                    from ..world import Scene

                    video = np.load(os.path.join(self.folder, f"chunk-{k:05d}.npy"), mmap_mode="r")
                    masks = np.load(os.path.join(self.folder, f"chunk-{k:05d}.masks.npy"),
                                    mmap_mode="r") if self.spec.masks else None
                    with self._lock:
                        self._chunks[k] = (video, [Scene.from_json(s) for s in scenes])
                        if masks is not None:
                            self._masks[k] = masks
            except BaseException as e:  # surfaced by batches()/wait()
                self._error = e
            finally:
                pool.terminate()
                self.render_seconds = time.perf_counter() - t0

        self._thread = threading.Thread(target=collect, daemon=True)
        self._thread.start()
        return self

    def _load_rendered(self, spec: RenderSpec, folder: str, k: int, start: int, stop: int) -> bool:
        """Load chunk k if an earlier run in this folder rendered it whole (scenes are deterministic by index)."""
        path = os.path.join(folder, f"chunk-{k:05d}.npy")
        masks_path = path[:-4] + ".masks.npy"
        if not os.path.exists(path) or (spec.masks and not os.path.exists(masks_path)):
            return False
        try:
            video = np.load(path, mmap_mode="r")
            masks = np.load(masks_path, mmap_mode="r") if spec.masks else None
        except (OSError, ValueError):  # unreadable: render it again
            return False
        if video.shape[:4] != (stop - start, spec.num_frames, spec.size, spec.size):
            return False
        with self._lock:
            self._chunks[k] = (video, [scene_at(spec, i) for i in range(start, stop)])
            if masks is not None:
                self._masks[k] = masks
        return True

    @property
    def ready(self) -> int:
        with self._lock:
            return sum(len(s) for _, s in self._chunks.values())

    def wait(self, timeout: float | None = None) -> int:
        """Block until every clip is rendered (or `timeout` seconds pass); returns how many are ready."""
        if self._thread:
            self._thread.join(timeout)
        self._raise()
        return self.ready

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"rendering the world failed: {self._error!r}") from self._error

    # -- reading ---------------------------------------------------------------------------------------
    def items(self) -> list[tuple[int, int]]:
        """(chunk, row) of every clip ready now."""
        with self._lock:
            return [(k, i) for k in sorted(self._chunks) for i in range(len(self._chunks[k][1]))]

    def clip(self, item: tuple[int, int]):
        """(uint8 frames [T, H, W, 3], Scene) of one ready clip."""
        video, scenes = self._chunks[item[0]]
        return np.asarray(video[item[1]]), scenes[item[1]]

    def mask(self, item: tuple[int, int]) -> np.ndarray:
        """bool [T, H, W]: where the clip's objects are (a world rendered with spec.masks)."""
        return np.unpackbits(self._masks[item[0]][item[1]], axis=-1, count=self.spec.size).astype(bool)

    def batches(self, batch_size: int, seed: int = 0, min_ready: int = 1) -> Iterator[dict]:
        """Endless random batches {"video": uint8 [B, T, H, W, 3], "caption": [B]} over the clips ready so far,
        each caption freshly phrased; with spec.masks also "mask": bool [B, T, H, W]."""
        from ..world import caption

        rng = random.Random(seed)
        while self.ready < min(min_ready, self.clips):
            self._raise()
            time.sleep(0.05)
        while True:
            self._raise()
            items = self.items()
            picked = [items[rng.randrange(len(items))] for _ in range(batch_size)]
            clips = [self.clip(it) for it in picked]
            batch = {"video": np.stack([v for v, _ in clips]),
                     "caption": np.array([caption(s, rng, heldout=self.spec.split == "heldout") for _, s in clips])}
            if self.spec.masks:
                batch["mask"] = np.stack([self.mask(it) for it in picked])
            yield batch

    def close(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._masks.clear()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _roomy_tmp(needed_bytes: int) -> str | None:
    """/dev/shm when it has room for the clips (RAM-backed), else the default temporary folder."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 1.25 * needed_bytes:
            return "/dev/shm"
    except OSError:
        pass
    return None


class Encoded(NamedTuple):
    """A rendered world encoded once: fp16 normalized latents [N, C, F, h, w], the clips' scenes and, for a world
    rendered with masks, the share of each latent cell its objects cover [N, F, h, w] (fp16, else None)."""
    latents: "torch.Tensor"
    scenes: list
    object_share: "torch.Tensor | None" = None


def encode_rendered(bundle, world: RenderedWorld, batch: int = 16) -> Encoded:
    """Every clip `world` has rendered, encoded by `bundle`'s VAE (with its objects' shares of each latent cell
    when the world has masks: the denoiser's object-weighted loss)."""
    import torch

    from ..train.losses import latent_object_share
    from .stream import video_tensor

    items, latents, scenes, shares = world.items(), [], [], []
    with torch.no_grad():
        for i in range(0, len(items), batch):
            clips = [world.clip(it) for it in items[i:i + batch]]
            video = video_tensor({"video": np.stack([v for v, _ in clips])}, bundle.device)
            z = bundle.family.encode(bundle, video)
            latents.append(z.half().cpu())
            scenes += [s for _, s in clips]
            if world.spec.masks:
                masks = torch.as_tensor(np.stack([world.mask(it) for it in items[i:i + batch]]))
                shares.append(latent_object_share(masks, z.shape[2:]).half())
    return Encoded(torch.cat(latents), scenes, torch.cat(shares) if shares else None)


def save_encoded(path: str, encoded: Encoded) -> None:
    """Write encode_rendered's clips to one file, whole or not at all (a stop leaves no half file)."""
    import torch

    tmp = path + ".tmp"
    torch.save({"latents": encoded.latents, "scenes": [s.to_json() for s in encoded.scenes],
                "object_share": encoded.object_share}, tmp)
    os.replace(tmp, path)


def load_encoded(path: str) -> Encoded:
    """The clips save_encoded wrote."""
    import torch

    from ..world import Scene

    data = torch.load(path)
    return Encoded(data["latents"], [Scene.from_json(s) for s in data["scenes"]], data.get("object_share"))


def latent_batches(encoded: Encoded, batch_size: int, seed: int = 0, split: str = "train") -> Iterator[dict]:
    """Endless random batches {"latents": [B, C, F, h, w] fp32, "caption": [B]} of encoded clips (encode_rendered),
    each caption freshly phrased, with "object_share" [B, F, h, w] where the clips have it; `seed` is the data
    position, so a resumed run draws new batches."""
    import torch

    from ..world import caption

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    scenes = encoded.scenes
    while True:
        idx = torch.randint(len(scenes), (batch_size,), generator=gen)
        batch = {"latents": encoded.latents[idx].float(),
                 "caption": np.array([caption(scenes[i], rng, heldout=split == "heldout") for i in idx.tolist()])}
        if encoded.object_share is not None:
            batch["object_share"] = encoded.object_share[idx].float()
        yield batch
