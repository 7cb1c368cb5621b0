"""Prompt analysis and optimization, offline: rules plus
zero-shot similarity of all-MiniLM-L6-v2 embeddings to label descriptions.

The optimizer never adds words a model cannot use. For a model trained on the synthetic world (the embedded
default), a prompt the world parser understands is rewritten in the training captions' own phrasing (held-out
synonyms such as "scarlet disc" or "swelling" become "red ball", "growing"); quality and style tags are for
general models (Wan2.1, ModelScope) only.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError

STYLES = {
    "realistic": "a photorealistic, realistic live-action video",
    "anime": "an anime or cartoon style animation",
    "cinematic": "a cinematic film shot with dramatic lighting",
    "watercolor": "a watercolor or painterly artistic style",
    "pixel art": "retro pixel art video game graphics",
    "minimal": "a simple minimal flat graphic with plain shapes on a plain background",
}
EMOTIONS = {
    "happy": "a happy, joyful, cheerful and playful scene",
    "sad": "a sad, gloomy, melancholic and lonely scene",
    "calm": "a calm, peaceful, quiet and relaxing scene",
    "tense": "a tense, scary, dangerous and threatening scene",
    "exciting": "an exciting, energetic, fast and thrilling scene",
}
INDOOR = {"room", "kitchen", "office", "bedroom", "house", "indoors", "inside", "studio", "hall", "library", "shop"}
OUTDOOR = {"sky", "beach", "forest", "street", "city", "mountain", "field", "meadow", "grass", "sea", "ocean",
           "park", "garden", "outdoors", "outside", "river", "desert", "snow", "sunset", "stars"}
TIMES = {"morning": "morning", "sunrise": "morning", "dawn": "morning", "noon": "day", "day": "day",
         "afternoon": "day", "sunset": "evening", "dusk": "evening", "evening": "evening", "night": "night",
         "midnight": "night", "starry": "night", "stars": "night", "darkness": "night"}
GENERIC_SUBJECTS = {"person", "man", "woman", "child", "girl", "boy", "dog", "cat", "bird", "horse", "car",
                    "train", "boat", "robot", "dragon", "fish", "tree", "flower", "balloon", "plane",
                    "teacher", "student", "chef", "dancer", "product", "bottle", "phone", "logo"}
ACTIONS = {"running", "walking", "flying", "jumping", "dancing", "swimming", "driving", "falling", "rising",
           "spinning", "rotating", "bouncing", "moving", "drifting", "sliding", "growing", "shrinking", "floating",
           "rolling", "talking", "speaking", "exploding", "waving", "turning", "sinking", "hopping", "sitting", "chasing",
           "standing", "eating", "cooking", "writing", "singing", "fighting", "racing", "twirling", "swelling"}
HIGH_MOTION = {"quickly", "fast", "rapidly", "racing", "exploding", "running", "fighting", "jumping", "speeding",
               "chase", "chasing"}
LOW_MOTION = {"still", "slowly", "gently", "calm", "motionless", "sitting", "standing", "leisurely", "static"}


@dataclass
class TextAnalysis:
    prompt: str
    entities: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    scene: dict = field(default_factory=dict)  # {"setting": indoor|outdoor|unknown, "time_of_day": ...}
    style: str = "unspecified"
    emotion: str = "neutral"
    motion_intensity: str = "medium"  # low | medium | high
    world: dict | None = None  # the world parser's reading, when the prompt is in its vocabulary

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def _encoder():
    from ..text import load_default_text_encoder

    return load_default_text_encoder()


def embed(texts: list[str]) -> np.ndarray:
    """Mean-pooled, L2-normalized MiniLM sentence embeddings (how all-MiniLM-L6-v2 is meant to be used)."""
    import torch

    tokenizer, model = _encoder()
    with torch.no_grad():
        tok = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**tok).last_hidden_state
        e = (h * tok.attention_mask[..., None]).sum(1) / tok.attention_mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(e, dim=-1).numpy()


def similar_label(text: str, labels: dict[str, str], threshold: float) -> str | None:
    """The label whose description is most similar to the text, if similar enough."""
    e = embed([text, *labels.values()])
    sims = e[1:] @ e[0]
    best = int(np.argmax(sims))
    return list(labels)[best] if sims[best] >= threshold else None


def _words(prompt: str) -> list[str]:
    """Lower-case words, plural nouns singular ("cars" -> "car"), so the word lists need one form."""
    words = re.findall(r"[a-z]+(?:-[a-z]+)?", prompt.lower())
    known = GENERIC_SUBJECTS | INDOOR | OUTDOOR
    return [w[:-1] if w.endswith("s") and w[:-1] in known else w for w in words]


def analyze_text(prompt: str, zero_shot: bool = True) -> TextAnalysis:
    """zero_shot: read style and emotion with MiniLM sentence embeddings (otherwise only from the words: a world
    model's optimizer has no use for them, and they cost a text-encoder load)."""
    from ..world.parse import parse_prompt

    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt", "is empty", "a non-empty string")
    words = _words(prompt)
    wordset = set(words)
    world = parse_prompt(prompt)
    # A world prompt names its shapes ("a man sitting" parses to a shapeless object: not the world's).
    world = world if world.get("objects") and all(o.get("shape") for o in world["objects"]) else None
    entities = [" ".join(filter(None, [o.get("color"), o.get("shape")])) for o in world["objects"]] if world else []
    entities += [w for w in words if w in GENERIC_SUBJECTS and not any(w in e for e in entities)]
    actions = ([o["motion"] for o in world["objects"] if o.get("motion")] if world
               else [w for w in words if w in ACTIONS])
    setting = "indoor" if wordset & INDOOR else "outdoor" if wordset & OUTDOOR else "unknown"
    time = next((TIMES[w] for w in words if w in TIMES), "unspecified")
    style = next((s for s in STYLES if s in prompt.lower()), None)
    style = style or (zero_shot and similar_label(prompt, STYLES, 0.45)) or "unspecified"
    emotion = (zero_shot and similar_label(prompt, EMOTIONS, 0.35)) or "neutral"
    if wordset & HIGH_MOTION:
        intensity = "high"
    elif wordset & LOW_MOTION or not actions:
        intensity = "low"
    else:
        intensity = "medium"
    return TextAnalysis(prompt=prompt, entities=entities, actions=actions,
                        scene={"setting": setting, "time_of_day": time}, style=style, emotion=emotion,
                        motion_intensity=intensity, world=world)


# --- the optimizer ------------------------------------------------------------------------------------------

TEMPLATES = {
    "action": "{subject} {action} {place}, dynamic motion, {style}",
    "nature": "{scene} at {time}, {motion}, {style}",
    "dialogue": "{speaker} talking to {listener} {place}, natural gestures, {style}",
    "product": "{product} rotating slowly {place}, studio lighting, clean background, {style}",
}
QUALITY_TAGS = ["high quality", "detailed", "smooth motion"]
NEGATIVE_BASE = ["blurry", "low quality", "flickering", "distorted", "watermark", "text"]


def fill_template(name: str, **values: str) -> str:
    if name not in TEMPLATES:
        raise InputError("template", f"unknown template {name!r}", ", ".join(TEMPLATES))
    needed = set(re.findall(r"{(\w+)}", TEMPLATES[name]))
    missing = needed - set(values)
    if missing:
        raise InputError("template", f"{name} needs {', '.join(sorted(missing))}", ", ".join(sorted(needed)))
    return TEMPLATES[name].format(**values)


@dataclass
class OptimizedPrompt:
    prompt: str
    negative_prompt: str
    parameters: dict  # recommended num_inference_steps, guidance_scale, fps, seconds
    analysis: TextAnalysis
    changes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["analysis"] = self.analysis.to_dict()
        return d


def world_caption(parsed: dict) -> str:
    """A prompt in the world's training phrasing (each attribute's first training synonym)."""
    from ..world.captions import (BACKGROUND_WORDS, CAMERA_WORDS, COLOR_WORDS, MOTION_WORDS, RELATION_WORDS,
                                 SHAPE_WORDS, SIZE_WORDS, SPEED_WORDS)

    def obj(o: dict) -> str:
        words = [SIZE_WORDS[o["size"]][0][0] if o.get("size") else "",
                 COLOR_WORDS[o["color"]][0][0] if o.get("color") else "",
                 SHAPE_WORDS[o["shape"]][0][0] if o.get("shape") else "object"]
        phrase = " ".join(w for w in words if w)
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
        if o.get("motion"):
            phrase += " " + MOTION_WORDS[o["motion"]][0][0]
            if o.get("speed") and o["speed"] != "normal":
                phrase += " " + SPEED_WORDS[o["speed"]][0][0]
        return phrase

    objects = [obj(o) for o in parsed["objects"]]
    text = objects[0]
    if len(objects) > 1:
        text += f" {RELATION_WORDS[parsed['relation']][0][0] if parsed.get('relation') else 'and'} {objects[1]}"
    if parsed.get("background"):
        text += " " + BACKGROUND_WORDS[parsed["background"]][0][0]
    if parsed.get("camera") and parsed["camera"] != "static":
        text += ", " + CAMERA_WORDS[parsed["camera"]][0][0]
    return text


def optimize_prompt(prompt: str, world_model: bool = True, negative_prompt: str | None = None) -> OptimizedPrompt:
    """world_model: the model knows the synthetic world's captions only (the embedded default): rewrite into
    its phrasing and add nothing it cannot read. Otherwise add quality, style and motion tags and a negative
    prompt built from the analysis."""
    a = analyze_text(prompt, zero_shot=not world_model)
    changes: list[str] = []
    steps, guidance = 25, 5.0
    fps = {"low": 8, "medium": 8, "high": 12}[a.motion_intensity]
    if world_model:
        if a.world:
            new = world_caption(a.world)
            if new != prompt:
                changes.append("rewritten in the model's training phrasing")
            prompt = new
        negative = negative_prompt or ""
    else:
        tags = [t for t in QUALITY_TAGS if t not in prompt.lower()]
        if a.style == "unspecified":
            tags.append("cinematic")
        if a.motion_intensity == "high":
            tags.append("fluid fast motion")
        elif a.motion_intensity == "low":
            tags.append("steady camera")
        if tags:
            prompt = f"{prompt}, {', '.join(tags)}"
            changes.append(f"added tags: {', '.join(tags)}")
        negatives = list(NEGATIVE_BASE)
        if a.style != "anime":
            negatives.append("cartoon")
        if a.motion_intensity == "low":
            negatives.append("shaky camera")
        if a.motion_intensity == "high":
            negatives.append("frozen frames")
            steps = 30
        negative = ", ".join(filter(None, [negative_prompt, *negatives]))
        changes.append("negative prompt from the analysis")
    seconds = 2.0 if a.motion_intensity != "low" else 3.0
    return OptimizedPrompt(prompt=prompt, negative_prompt=negative, analysis=a, changes=changes,
                           parameters={"num_inference_steps": steps, "guidance_scale": guidance, "fps": fps,
                                       "seconds": seconds})


def optimize_parts(bundle, prompt: str, negative: str | None) -> tuple[str, str, list[str]]:
    """The prompt optimizer for `bundle` on each "then" part (shots stay shots): (prompt, negative prompt,
    changes). A part the optimizer would make longer than the model reads stays as written. What the API and
    `t2v generate` do to a prompt by default."""
    from .planner import split_then

    limit = bundle.config.max_sequence_length
    fits = lambda text: len(bundle.tokenizer(text)["input_ids"]) <= limit  # noqa: E731
    out, changes, negatives = [], [], []
    for part in split_then(prompt):
        opt = optimize_prompt(part, bundle.config.vocabulary == "world", negative)
        if fits(opt.prompt):
            out.append(opt.prompt)
            changes += opt.changes
        else:
            out.append(part)
            changes.append(f"kept as written: optimized it would exceed {limit} tokens")
        negatives.append(opt.negative_prompt)
    negative_out = negatives[0] if negatives and fits(negatives[0]) else (negative or "")
    return ", then ".join(out), negative_out, list(dict.fromkeys(changes))
