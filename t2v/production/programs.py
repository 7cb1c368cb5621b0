"""Programme composers: whole programmes assembled into one mp4 from generated clips.

- education: title card, one clip per section with burned-in subtitles (and a WebVTT file), an espeak-ng
  voice-over muxed as an AAC audio track, a summary card;
- ad: the product clips with the brand name (and logo) overlaid, a call-to-action end card;
- news: a headline card, clips with a lower third, a ticker scrolling along the bottom.

A spec is a small YAML/JSON document (see `SPEC_KEYS`); `compose_program(kind, spec, clip_fn)` returns the
frames, the audio and the subtitle cues, `write_program` writes mp4 (+ .vtt). `clip_fn(prompt, seconds)` makes
each clip: the default model through `t2v.production.generate` from the CLI and the API.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError

KINDS = ("education", "ad", "news")
SPEC_KEYS = {
    "education": {"title": str, "sections": list, "summary": str},  # section: {prompt, text, seconds?}
    "ad": {"brand": str, "clips": list, "call_to_action": str, "logo": str},  # clip: {prompt, seconds?}
    "news": {"headline": str, "items": list, "ticker": str},  # item: {prompt, caption, seconds?}
}
ITEMS = {"education": "sections", "ad": "clips", "news": "items"}  # where each kind keeps its clips
REQUIRED = {"education": ("title", "sections"), "ad": ("brand", "clips", "call_to_action"),
            "news": ("headline", "items", "ticker")}
AUDIO_RATE = 22050
CARD_SECONDS = 2.0
# What one spec may ask for: clips, each clip's length, and the text drawn and spoken (a card, a caption).
MAX_CLIPS = 12
CLIP_SECONDS = (0.5, 10.0)
MAX_TEXT_CHARS = 500

ClipFn = Callable[[str, float], np.ndarray]  # (prompt, seconds) -> uint8 frames [T, H, W, 3] at the program fps


@dataclass
class Program:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    audio: np.ndarray | None = None  # int16 mono at AUDIO_RATE, as long as the video
    cues: list[tuple[float, float, str]] = field(default_factory=list)  # (start s, end s, text)


def check_spec(kind: str, spec: dict) -> None:
    if kind not in KINDS:
        raise InputError("kind", f"unknown program {kind!r}", ", ".join(KINDS))
    if not isinstance(spec, dict):
        raise InputError("spec", "must be a mapping")
    for key in REQUIRED[kind]:
        if key not in spec:
            raise InputError(key, "is required", f"{kind} specs have {', '.join(SPEC_KEYS[kind])}")
    for key, value in spec.items():
        if key not in SPEC_KEYS[kind]:
            raise InputError(key, f"is not a field of a {kind} spec", ", ".join(SPEC_KEYS[kind]))
        if not isinstance(value, SPEC_KEYS[kind][key]):
            raise InputError(key, f"must be a {SPEC_KEYS[kind][key].__name__}")
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise InputError(key, f"is {len(value)} characters long", f"at most {MAX_TEXT_CHARS}")
    items = spec[ITEMS[kind]]
    if not items or len(items) > MAX_CLIPS:
        raise InputError(ITEMS[kind], f"has {len(items)} entries", f"1 to {MAX_CLIPS}")
    lo, hi = CLIP_SECONDS
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise InputError(f"item {i}", "needs a prompt")
        seconds = item.get("seconds", 2)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not lo <= seconds <= hi:
            raise InputError(f"item {i}.seconds", f"{seconds}", f"{lo:g} to {hi:g}")


# --- drawing ----------------------------------------------------------------------------------------------

def _font(size: int):
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
                 "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"):
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def card(text: str, size: tuple[int, int], n: int, bg=(20, 30, 60), fg=(255, 255, 255)) -> np.ndarray:
    """n frames of a title / summary / end card: centred, wrapped text."""
    w, h = size
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    font = _font(max(10, h // 9))
    lines = _wrap(draw, text, font, int(w * 0.9))
    line_h = font.size + 4
    y = (h - line_h * len(lines)) // 2
    for line in lines:
        draw.text(((w - draw.textlength(line, font=font)) / 2, y), line, font=font, fill=fg)
        y += line_h
    return np.repeat(np.asarray(img)[None], n, axis=0)


def overlay_text(frames: np.ndarray, text: str, where: str = "bottom", band=(0, 0, 0), fg=(255, 255, 255),
                 scroll: float | None = None) -> np.ndarray:
    """Burn text into every frame: a band at the bottom (subtitles, lower thirds), the top (brand), or a ticker
    scrolling `scroll` pixels per frame."""
    out = frames.copy()
    h, w = frames.shape[1:3]
    font = _font(max(8, h // 14))
    band_h = font.size + 6
    for i in range(len(out)):
        img = Image.fromarray(out[i])
        draw = ImageDraw.Draw(img)
        y0 = 0 if where == "top" else h - band_h
        draw.rectangle([0, y0, w, y0 + band_h], fill=band)
        if scroll is None:
            lines = _wrap(draw, text, font, w - 6)[:1]
            x = (w - draw.textlength(lines[0], font=font)) / 2 if lines else 0
            draw.text((x, y0 + 3), lines[0] if lines else "", font=font, fill=fg)
        else:
            span = draw.textlength(text, font=font) + w
            x = w - (i * scroll) % span
            draw.text((x, y0 + 3), text, font=font, fill=fg)
        out[i] = np.asarray(img)
    return out


def paste_logo(frames: np.ndarray, logo_path: str) -> np.ndarray:
    logo = Image.open(logo_path).convert("RGBA")
    h, w = frames.shape[1:3]
    side = max(8, h // 5)
    logo.thumbnail((side, side))
    out = frames.copy()
    for i in range(len(out)):
        img = Image.fromarray(out[i]).convert("RGBA")
        img.alpha_composite(logo, (w - logo.width - 3, 3))
        out[i] = np.asarray(img.convert("RGB"))
    return out


# --- speech ----------------------------------------------------------------------------------------------------

def speak(text: str, seconds: float) -> np.ndarray:
    """espeak-ng's voice for `text`, as int16 mono at AUDIO_RATE, padded or cut to `seconds`."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "voice.wav"
        subprocess.run([exe, "-s", "160", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path)) as wav:
            rate, data = wav.getframerate(), np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    if rate != AUDIO_RATE:  # espeak-ng writes 22050 Hz; resample anything else linearly
        t = np.arange(int(len(data) * AUDIO_RATE / rate)) * rate / AUDIO_RATE
        data = np.interp(t, np.arange(len(data)), data).astype(np.int16)
    n = int(round(seconds * AUDIO_RATE))
    return np.pad(data[:n], (0, max(0, n - len(data))))


# --- the composers -----------------------------------------------------------------------------------------------

def compose_program(kind: str, spec: dict, clip_fn: ClipFn, fps: float = 8.0,
                    size: tuple[int, int] = (128, 128), voice: bool = True) -> Program:
    check_spec(kind, spec)
    n_card = int(round(CARD_SECONDS * fps))
    parts: list[np.ndarray] = []
    audio: list[np.ndarray] = []
    cues: list[tuple[float, float, str]] = []

    def add(frames: np.ndarray, narration: str | None = None, cue: str | None = None) -> None:
        start = sum(len(p) for p in parts) / fps
        parts.append(frames)
        seconds = len(frames) / fps
        if cue:
            cues.append((start, start + seconds, cue))
        audio.append(speak(narration, seconds) if (voice and narration) else np.zeros(int(round(seconds * AUDIO_RATE)),
                                                                                         np.int16))

    def clip(item: dict) -> np.ndarray:
        frames = clip_fn(item["prompt"], float(item.get("seconds", 2)))
        if frames.shape[1:3] != (size[1], size[0]):
            frames = np.stack([np.asarray(Image.fromarray(f).resize(size)) for f in frames])
        return frames

    if kind == "education":
        add(card(spec["title"], size, n_card), narration=spec["title"])
        for section in spec["sections"]:
            text = section.get("text", "")
            add(overlay_text(clip(section), text) if text else clip(section), narration=text, cue=text or None)
        if spec.get("summary"):
            add(card(spec["summary"], size, n_card, bg=(30, 60, 30)), narration=spec["summary"])
    elif kind == "ad":
        for item in spec["clips"]:
            frames = overlay_text(clip(item), spec["brand"], where="top", band=(200, 30, 30))
            add(paste_logo(frames, spec["logo"]) if spec.get("logo") else frames)
        add(card(f"{spec['brand']}: {spec['call_to_action']}", size, n_card, bg=(200, 30, 30)),
            narration=spec["call_to_action"], cue=spec["call_to_action"])
    else:  # news
        add(card(spec["headline"], size, n_card, bg=(120, 0, 0)), narration=spec["headline"], cue=spec["headline"])
        for item in spec["items"]:
            frames = overlay_text(clip(item), item.get("caption", ""), where="bottom", band=(0, 40, 120))
            add(frames, narration=item.get("caption"), cue=item.get("caption"))
        frames = np.concatenate(parts)
        ticker = overlay_text(frames, spec["ticker"], where="top", band=(0, 0, 0), fg=(255, 220, 0), scroll=4.0)
        return Program(frames=ticker, fps=fps, audio=np.concatenate(audio) if voice else None, cues=cues)
    return Program(frames=np.concatenate(parts), fps=fps, audio=np.concatenate(audio) if voice else None, cues=cues)


def webvtt(cues: list[tuple[float, float, str]]) -> str:
    def ts(s: float) -> str:
        h, rem = divmod(s, 3600)
        m, sec = divmod(rem, 60)
        return f"{int(h):02d}:{int(m):02d}:{sec:06.3f}"

    return "WEBVTT\n\n" + "\n".join(f"{i + 1}\n{ts(a)} --> {ts(b)}\n{text}\n" for i, (a, b, text) in enumerate(cues))


def write_program(program: Program, path: str | Path) -> Path:
    """mp4 (H.264 + AAC when there is audio) and, beside it, a .vtt with the subtitle cues."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(program.fps).limit_denominator(1001)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        video = out.add_stream("libx264", rate=rate)
        h, w = program.frames.shape[1:3]
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = out.add_stream("aac", rate=AUDIO_RATE, layout="mono") if program.audio is not None else None
        for i, f in enumerate(program.frames):
            frame = av.VideoFrame.from_ndarray(f, "rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if audio is not None:
            step = 1024
            for i in range(0, len(program.audio), step):
                chunk = program.audio[i:i + step][None]
                frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
                frame.sample_rate, frame.pts = AUDIO_RATE, i
                out.mux(audio.encode(frame))
            out.mux(audio.encode())
    tmp.replace(path)
    if program.cues:
        path.with_suffix(".vtt").write_text(webvtt(program.cues))
    return path
