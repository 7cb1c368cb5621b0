"""t2v: text-to-video on Ray. `t2v.load(uri)` -> Bundle; `TextToVideoPipeline(bundle)(prompt)` -> frames."""

from .bundle import DEFAULT_MODEL, PRECISIONS, Bundle, BundleConfig, from_components, load, to_precision
from .errors import BundleError, InputError, T2VError
from .families import FAMILIES
from .pipeline import TextToVideoPipeline, VideoOutput

__version__ = "0.1.0"

__all__ = [
    "Bundle", "BundleConfig", "BundleError", "DEFAULT_MODEL", "FAMILIES", "InputError", "PRECISIONS", "T2VError",
    "TextToVideoPipeline", "VideoOutput", "from_components", "load", "to_precision",
]
