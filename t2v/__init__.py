"""t2v: text-to-video on Ray. `t2v.load(uri)` -> Bundle; `TextToVideoPipeline(bundle)(prompt)` -> frames.

Names are imported on first use, so `t2v.world` or `t2v.data` in a Ray worker does not pay for torch and
diffusers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "bundle", "BundleConfig": "bundle", "DEFAULT_MODEL": "bundle", "PRECISIONS": "bundle",
    "from_components": "bundle", "load": "bundle", "to_precision": "bundle",
    "BundleError": "errors", "InputError": "errors", "T2VError": "errors",
    "FAMILIES": "families",
    "TextToVideoPipeline": "pipeline", "VideoOutput": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 't2v' has no attribute {name!r}")
