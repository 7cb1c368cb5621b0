"""Video files with PyAV: H.264 mp4 (yuv420p, faststart), VP9 WebM and animated GIF; read back; probe; PNG
thumbnails."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .errors import InputError

# extension -> (container format, codec, pixel format, container options)
FORMATS = {
    ".mp4": ("mp4", "libx264", "yuv420p", {"movflags": "+faststart"}),
    ".webm": ("webm", "libvpx-vp9", "yuv420p", {}),
    ".gif": ("gif", "gif", "pal8", {}),
}


def _ext(path_or_ext: str) -> str:
    ext = os.path.splitext(str(path_or_ext))[1].lower() or str(path_or_ext).lower()
    return ext if ext.startswith(".") else "." + ext


def _format(path_or_ext: str) -> tuple[str, str, str, dict]:
    ext = _ext(path_or_ext)
    if ext not in FORMATS:
        raise InputError("output", f"unknown video format {ext!r}", ", ".join(FORMATS))
    return FORMATS[ext]


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise InputError("frames", f"expected uint8 [T, H, W, 3] with T ≥ 1, got {frames.dtype} {frames.shape}")
    return frames


def _encode_to_file(path: str, frames, fps: float, fmt: str, crf: int) -> None:
    frames = _check_frames(frames)
    container_fmt, codec, pix_fmt, options = _format(fmt)
    t, h, w, _ = frames.shape
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise InputError("frames", f"{w}x{h}: {codec} with yuv420p needs an even width and height")
    rate = Fraction(fps).limit_denominator(1001)
    # A real file, not a buffer: faststart rewrites the file to move the index (moov) to the front.
    with av.open(path, mode="w", format=container_fmt, options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium"}
        elif codec == "libvpx-vp9":
            stream.options = {"crf": str(crf + 12), "b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"}
        # GIF stores delays in centiseconds; the other formats count frames at the exact rate. The muxer keeps
        # its own finer stream time base: forcing 1/fps on an mp4 stream breaks B-frame timestamps past ~40
        # frames ("pts < dts").
        if container_fmt == "gif":
            stream.time_base = frame_base = Fraction(1, 100)
            pts = lambda i: round(i * 100 / rate)  # noqa: E731
        else:
            frame_base, pts = 1 / rate, (lambda i: i)
        to_frame = _palette_frames(frames) if pix_fmt == "pal8" else lambda f: av.VideoFrame.from_ndarray(f, "rgb24")
        for i, frame in enumerate(frames):
            vf = to_frame(frame)
            vf.pts = pts(i)
            vf.time_base = frame_base
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _palette_frames(frames: np.ndarray):
    """GIF is 256-colour: one adaptive palette for the whole clip (no flicker between frames), via Pillow."""
    from PIL import Image

    step = max(1, len(frames) // 16)
    mosaic = Image.fromarray(np.concatenate(list(frames[::step]), axis=0))
    palette_img = mosaic.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    rgb = np.array(palette_img.getpalette()[: 256 * 3], np.uint8).reshape(-1, 3)
    argb = np.zeros((256, 4), np.uint8)
    argb[:, 0] = 255
    argb[: len(rgb), 1:] = rgb

    def to_frame(frame):
        idx = np.asarray(Image.fromarray(frame).quantize(palette=palette_img, dither=Image.Dither.NONE))
        return av.VideoFrame.from_ndarray((np.ascontiguousarray(idx), argb), format="pal8")

    return to_frame


def write_video(path: str | os.PathLike, frames, fps: float, crf: int = 18) -> Path:
    """Write frames to a local file named by its extension (.mp4, .webm, .gif), atomically: a failure
    leaves no partial file behind."""
    path = Path(path)
    fmt = path.suffix
    _format(fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=fmt)
    os.close(fd)
    try:
        _encode_to_file(tmp, frames, fps, fmt, crf)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a video is an ordinary file others may read
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def encode_video(frames, fps: float, fmt: str = ".mp4", crf: int = 18) -> bytes:
    """uint8 [T, H, W, 3] frames -> the bytes of a video file in `fmt` (.mp4, .webm, .gif)."""
    with tempfile.TemporaryDirectory(prefix="t2v-video-") as tmp:
        return write_video(Path(tmp) / f"video{_ext(fmt)}", frames, fps, crf).read_bytes()


def png_bytes(frame) -> bytes:
    """One uint8 [H, W, 3] frame -> the bytes of a PNG (a video's thumbnail)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame)).save(buf, format="PNG")
    return buf.getvalue()


def read_video(source) -> np.ndarray:
    """A video file (path, bytes or file object) -> uint8 [T, H, W, 3]."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with av.open(source if not isinstance(source, Path) else str(source)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no video frames decoded")
    return np.stack(frames)


@dataclass
class VideoInfo:
    format: str
    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float


def probe(source) -> VideoInfo:
    """Codec, size, frame rate and frame count (counted by decoding, not trusted from the header)."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with av.open(source if not isinstance(source, Path) else str(source)) as container:
        stream = container.streams.video[0]
        n = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        return VideoInfo(
            format=container.format.name, codec=stream.codec_context.name, pix_fmt=stream.codec_context.pix_fmt or "",
            width=stream.codec_context.width, height=stream.codec_context.height, fps=fps, num_frames=n,
            duration=n / fps if fps else 0.0,
        )
