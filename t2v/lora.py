"""LoRA adapters on a bundle's denoiser, in diffusers' LoRA format.

An adapter is a folder (local or s3://) holding `pytorch_lora_weights.safetensors`, its keys prefixed by the
pipeline component they patch (`transformer.blocks.0.attn1.to_q.lora_A.weight`) and its peft config in the file's
metadata: what `WanPipeline.save_lora_weights` writes and `pipe.load_lora_weights` reads, so diffusers loads
t2v's adapters and t2v loads diffusers'. A folder holding one other `.safetensors` file instead is an adapter as
published (a few-step distillation LoRA in the original Wan layout, a ComfyUI export): diffusers' converters read
those. t2v trains adapters with peft (`TrainConfig.lora_rank`), and a generation chooses one by name with a
strength.

On a mixture of experts (Wan2.2 A14B) an adapter folder may hold one file per expert, as Wan2.2's few-step LoRAs
are published: `high_noise_model.safetensors` for `transformer` and `low_noise_model.safetensors` for
`transformer_2` (diffusers: `load_lora_weights(..., load_into_transformer_2=True)`). A folder of one file patches
the high-noise expert only, as diffusers' `load_lora_weights` does; an expert without a file of the adapter runs
its base weights while the adapter is chosen.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import storage
from .errors import InputError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
EXPERT_WEIGHTS = ("high_noise_model.safetensors", "low_noise_model.safetensors")  # a pair, one per expert
CARD_NAME = "adapter.json"  # t2v's note beside it: what the adapter was trained on and for which words
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection (diffusers' Wan LoRA recipe)
# One path segment of letters, digits and ._- (no leading dot): a name can never leave the adapters' root.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_STRENGTH = 4.0
# The embedded default model's adapters (t2v/models/adapters/<name>): a folder per adapter, as any adapters root.
DEFAULT_ROOT = Path(__file__).parent / "models" / "adapters"


@dataclass(frozen=True)
class Choice:
    """One generation's adapter: its name and the strength its update is scaled by (1 = as trained)."""

    name: str
    strength: float = 1.0

    @classmethod
    def parse(cls, name: str, strength: float = 1.0, field: str = "lora") -> "Choice":
        check_name(name, field)
        if not -MAX_STRENGTH <= float(strength) <= MAX_STRENGTH:
            raise InputError(f"{field}.strength", f"{strength} is outside [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]")
        return cls(name, float(strength))


def check_name(name: str, field: str = "lora") -> str:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise InputError(field, f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting "
                                "with a letter or digit (one folder under the adapters' root)")
    return name


def adapter_uri(root: str, name: str) -> str:
    """The folder of adapter `name` under `root`, the name checked first."""
    return storage.join(root, check_name(name))


def from_spec(spec: str, root: str | None = None) -> tuple[str, str, float]:
    """A command line's `NAME_OR_FOLDER[:strength]` -> (folder, name, strength): a folder (or s3:// URI) of
    its own, else a name under `root` (default: the embedded model's adapters)."""
    head, sep, tail = spec.rpartition(":")
    try:
        strength = float(tail) if sep and head else None
    except ValueError:
        strength = None
    uri = head if strength is not None else spec
    strength = 1.0 if strength is None else strength
    if storage.is_s3(uri) or Path(uri).is_dir() or (uri.endswith(".safetensors") and Path(uri).is_file()):
        name = uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".safetensors")
        name = name if NAME.match(name) else "adapter"
    else:
        root, name = str(root or DEFAULT_ROOT), uri
        if not NAME.match(name) or not exists(root, name):
            raise InputError("lora", f"no adapter folder or adapter named {name!r}",
                             ", ".join(list_adapters(root)) or "a LoRA folder")
        uri = adapter_uri(root, name)
    return uri, name, Choice.parse(name, strength).strength


def list_adapters(root: str | None) -> list[str]:
    """The adapters under a root: its folders that hold a LoRA weight file (`weight_file`), by name."""
    if not root or not storage.exists(root):
        return []
    files: dict[str, list[str]] = {}
    for rel in storage.list_files(root):  # one listing for the whole root
        folder, _, file = rel.partition("/")
        files.setdefault(folder, []).append(file)
    return sorted(n for n, found in files.items() if NAME.match(n) and _weights_among(found))


def exists(root: str | None, name: str) -> bool:
    try:
        return bool(root) and bool(weight_file(adapter_uri(root, name)))
    except FileNotFoundError:
        return False


def weight_file(uri: str) -> str:
    """The weights of the adapter at `uri`: a .safetensors file itself, or in a folder diffusers'
    pytorch_lora_weights.safetensors, else the folder's only .safetensors file (an adapter as published)."""
    if uri.endswith(".safetensors"):
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: no such LoRA file")
        return uri
    files = storage.list_files(uri) if storage.exists(uri) else []
    weights = _weights_among(files)
    if weights is None:
        raise FileNotFoundError(f"{uri}: not a LoRA adapter (no {WEIGHT_NAME}, and not exactly one other "
                                ".safetensors file)")
    return storage.join(uri, weights)


def _weights_among(files: list[str]) -> str | None:
    """Which of an adapter folder's files (paths relative to it) holds its weights: diffusers' WEIGHT_NAME, else
    the only .safetensors file directly in it; None when neither is there."""
    found = [f for f in files if "/" not in f and f.endswith(".safetensors")]
    if WEIGHT_NAME in found:
        return WEIGHT_NAME
    pair = [f for f in EXPERT_WEIGHTS if f in found]
    return pair[0] if pair and len(found) == len(pair) else (found[0] if len(found) == 1 else None)


def expert_files(uri: str, experts: int) -> dict[int, str]:
    """Which file of the adapter at `uri` patches which expert: {0: its weights} for a model of one denoiser or
    an adapter of one file; a mixture's high/low pair, {0: high, 1: low} (either may be missing)."""
    main = weight_file(uri)
    if experts == 1 or uri.endswith(".safetensors") or main.rsplit("/", 1)[-1] not in EXPERT_WEIGHTS:
        return {0: main}
    return {k: storage.join(uri, f) for k, f in enumerate(EXPERT_WEIGHTS) if storage.exists(storage.join(uri, f))}


def card(uri: str) -> dict:
    """An adapter's adapter.json ({} when it has none, as diffusers' own adapters do)."""
    path = storage.join(uri, CARD_NAME)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else {}


# --- training ---------------------------------------------------------------------------------------------

def lora_config(rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS, dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), target_modules=list(targets),
                      lora_dropout=float(dropout), init_lora_weights=True)


def add_trainable(bundle, config, name: str = "default") -> list:
    """Add a fresh adapter to the bundle's denoiser, which is frozen; its LoRA weights are the only trainable
    parameters (returned)."""
    denoiser = _trainable(bundle)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(config, adapter_name=name)
    params = [p for n, p in denoiser.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_state(bundle, name: str = "default") -> dict:
    """An adapter's LoRA weights, keyed as peft names them inside the denoiser (no component prefix)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(bundle.denoiser, adapter_name=name)


def save(bundle, uri: str, name: str = "default", info: dict | None = None) -> None:
    """Write adapter `name` of the bundle's denoiser as a diffusers LoRA folder (weights, peft config in the
    metadata) plus t2v's adapter.json (`info`: base model, trigger words, training figures)."""
    denoiser = _trainable(bundle)
    loader, prefix = bundle.family.lora_loader(), bundle.family.denoiser_key
    config = denoiser.peft_config[name].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set, which JSON metadata cannot hold
    state = {k: v.detach().float().cpu().contiguous() for k, v in adapter_state(bundle, name).items()}
    with tempfile.TemporaryDirectory() as tmp:
        loader.save_lora_weights(tmp, weight_name=WEIGHT_NAME, **{f"{prefix}_lora_layers": state,
                                                                  f"{prefix}_lora_adapter_metadata": config})
        Path(tmp, CARD_NAME).write_text(json.dumps({"rank": config["r"], "alpha": config["lora_alpha"],
                                                    "target_modules": config["target_modules"], **(info or {})},
                                                   indent=2, sort_keys=True))
        for file in (WEIGHT_NAME, CARD_NAME):
            storage.write_bytes(storage.join(uri, file), Path(tmp, file).read_bytes())


# --- loading and choosing ---------------------------------------------------------------------------------

def load(bundle, uri: str, name: str) -> None:
    """Load the LoRA adapter at `uri` (a folder or a .safetensors file, local or s3://: `weight_file`) into the
    bundle's denoiser -- each file into its expert on a mixture (`expert_files`) -- as adapter `name`, inactive
    until a generation chooses it. Formats diffusers converts (original Wan, ComfyUI) load too."""
    experts = _supporting(bundle)
    if name in loaded(bundle):
        return
    loader, prefix = bundle.family.lora_loader(), bundle.family.denoiser_key
    states = {}
    from .runtime import is_shapes_only

    for k, file in expert_files(uri, len(experts)).items():
        if is_shapes_only(experts[k]):
            continue  # the other expert's replica loads it (expert-disaggregated serving)
        with _local_copy(file) as path:
            # (state, metadata); Stable Diffusion's loader also returns the network alphas between them
            loaded_file = loader.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)
            states[k] = loaded_file[0], loaded_file[-1]
    with lock_of(bundle.denoiser):
        for k, (state, metadata) in states.items():
            denoiser = experts[k]
            was = _active(denoiser)
            # (each expert's keys are prefixed "transformer." as diffusers saves them for either expert)
            denoiser.load_lora_adapter(state, prefix=prefix, adapter_name=name, metadata=metadata)
            _set_active(denoiser, _STALE)  # loading made the new adapter active: put back what was chosen
            _apply(denoiser, None if was is _STALE else was)


def unload(bundle, name: str) -> None:
    """Remove adapter `name` from the bundle's denoiser(s) (nothing to do where it is not loaded)."""
    with lock_of(bundle.denoiser):
        for denoiser in bundle.experts:
            if name in getattr(denoiser, "peft_config", {}):
                was = _active(denoiser)
                denoiser.delete_adapters(name)
                _set_active(denoiser, _STALE)
                _apply(denoiser, None if was is None or was is _STALE or was.name == name else was)


def loaded(bundle) -> list[str]:
    return sorted({n for d in bundle.experts for n in (getattr(d, "peft_config", {}) or {})})


def activate(bundle, choice: Choice | None) -> None:
    """Make `choice` the adapter the denoiser's next forwards use (None: the base model alone)."""
    with lock_of(bundle.denoiser):
        _apply_all(bundle, choice)


def _apply_all(bundle, choice: Choice | None) -> None:
    """`choice` on every expert that holds it, the others (a mixture's expert without a file of it) on their
    base weights."""
    if choice is not None and choice.name not in loaded(bundle):
        raise KeyError(f"adapter {choice.name!r} is not loaded (loaded: {', '.join(loaded(bundle)) or 'none'})")
    for denoiser in bundle.experts:
        holds = choice is not None and choice.name in getattr(denoiser, "peft_config", {})
        _apply(denoiser, choice if holds else None)


_STALE = object()  # the denoiser's adapter state is not known: the next choice is applied whatever it is


def _active(denoiser):
    return denoiser.__dict__.get("_t2v_lora")


def _set_active(denoiser, choice) -> None:
    denoiser.__dict__["_t2v_lora"] = choice


def _apply(denoiser, choice: Choice | None) -> None:
    if _active(denoiser) is choice or (_active(denoiser) is not _STALE and _active(denoiser) == choice):
        return
    if choice is None:
        if getattr(denoiser, "peft_config", None):
            denoiser.disable_lora()
    else:
        if choice.name not in getattr(denoiser, "peft_config", {}):
            raise KeyError(f"adapter {choice.name!r} is not loaded (loaded: {', '.join(sorted(getattr(denoiser, 'peft_config', {}))) or 'none'})")
        denoiser.enable_lora()
        denoiser.set_adapters([choice.name], [choice.strength])
    _set_active(denoiser, choice)


def with_adapter(bundle, choice: Choice | None, predict_requests: Callable) -> Callable:
    """requests -> predictions with `choice` active for each forward: the switch and the forward hold the
    denoiser's lock together, so loops of jobs with different adapters may share one replica."""
    def predict(requests):
        with lock_of(bundle.denoiser):
            _apply_all(bundle, choice)
            return predict_requests(requests)

    return predict


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def lock_of(denoiser) -> threading.RLock:
    """The lock that pairs an adapter switch with the forwards that use it."""
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(denoiser, threading.RLock())


def _supporting(bundle) -> tuple:
    """The bundle's denoisers, able to hold adapters (`Family.peft_denoiser`)."""
    if bundle.family.lora_loader() is None:
        raise InputError("lora", f"the {bundle.family.name} family's denoiser has no LoRA support in diffusers")
    bundle.family.peft_denoiser(bundle)
    return bundle.experts


def _trainable(bundle):
    """The one denoiser an adapter is trained on."""
    experts = _supporting(bundle)
    if len(experts) > 1:
        raise InputError("lora_rank", "t2v trains adapters on a model of one denoiser, not on a mixture of experts",
                         "a model of one denoiser")
    return experts[0]


@contextmanager
def _local_copy(uri: str):
    """A local path of the file at `uri` (s3://: downloaded to a temporary folder for the block)."""
    if not storage.is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, uri.rsplit("/", 1)[-1])
        path.write_bytes(storage.read_bytes(uri))
        yield path


def version(root: str, name: str) -> str:
    """A fingerprint of an adapter's weights file (size and mtime, or the S3 ETag): cached results of an adapter
    that was replaced under the same name are not served again."""
    files = expert_files(adapter_uri(root, name), 2)  # a high/low pair's both files, else the one
    marks = []
    for uri in files.values():
        if storage.is_s3(uri):
            bucket, key = storage.split_s3(uri)
            marks.append(storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"'))
        else:
            stat = Path(uri).stat()
            marks.append(f"{stat.st_size}-{stat.st_mtime_ns}")
    return "+".join(marks)


def choice_of(params: dict) -> Choice | None:
    """A job's adapter, from its parameters (`params["lora"]`, set by the job service)."""
    spec = params.get("lora")
    return None if not spec else Choice(spec["name"], float(spec.get("strength", 1.0)))


class Loaded:
    """An adapter loaded into a bundle's denoiser. Whoever holds it -- a cache that keeps it loaded, each
    generation that uses it -- holds a reference; the last one released unloads it, so an LRU evicting an adapter
    never pulls it from under a generation still sampling with it."""

    def __init__(self, bundle, root: str, name: str):
        self.bundle, self.root, self.name, self._released = bundle, root, name, False
        load(bundle, adapter_uri(root, name), name)
        _hold(bundle, name, +1)

    @contextmanager
    def in_use(self):
        _hold(self.bundle, self.name, +1)
        try:
            yield self
        finally:
            _hold(self.bundle, self.name, -1)

    def unload(self) -> None:
        """The cache's reference, released (once)."""
        if not self._released:
            self._released = True
            _hold(self.bundle, self.name, -1)

    def __del__(self):  # Serve's multiplexing calls it when its LRU evicts the adapter
        try:
            self.unload()
        except Exception:  # noqa: BLE001 - at interpreter exit the denoiser may be gone already
            pass


def _hold(bundle, name: str, delta: int) -> None:
    denoiser = bundle.denoiser
    with lock_of(denoiser):
        refs = denoiser.__dict__.setdefault("_t2v_lora_refs", {})
        refs[name] = refs.get(name, 0) + delta
        if refs[name] <= 0:
            del refs[name]
            unload(bundle, name)


class LRU:
    """The adapters one process keeps loaded, the least recently used unloaded past `capacity` (the policy Serve's
    `@serve.multiplexed` applies per Denoiser replica, for generators that run without Serve)."""

    def __init__(self, bundle, root: str | None, capacity: int = 4):
        from collections import OrderedDict

        self.bundle, self.root, self.capacity = bundle, root, capacity
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()

    def get(self, name: str) -> Loaded:
        if not self.root:
            raise InputError("lora", "this server has no adapters (no adapters root is configured)")
        if name not in self._loaded:
            self._loaded[name] = Loaded(self.bundle, self.root, name)
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)[1].unload()
        self._loaded.move_to_end(name)
        return self._loaded[name]


def by_adapter(requests: list, choices: list, predict_requests: Callable[[Choice | None, list], list]) -> list:
    """Predictions for requests that each name an adapter: one call per adapter, requests of the same adapter
    batched together (a batch never mixes two), results in the requests' order."""
    groups: dict = {}
    for i, choice in enumerate(choices):
        groups.setdefault(choice, []).append(i)
    out = [None] * len(requests)
    for choice, members in groups.items():
        for i, pred in zip(members, predict_requests(choice, [requests[i] for i in members])):
            out[i] = pred
    return out
