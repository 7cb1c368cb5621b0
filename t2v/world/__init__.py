"""The synthetic captioned-video world: scenes, rendering, captions, splits.

The submodules analyze (pixels, OpenCV), parse (prompts) and score are imported only where needed, so that
importing the package (or parsing text) never loads OpenCV."""

from .captions import caption
from .render import render
from .scene import Scene, WorldObject, random_scene
from .splits import sample_scene, split_of

__all__ = ["Scene", "WorldObject", "caption", "random_scene", "render", "sample_scene", "split_of"]
