"""Real videos + a WebVid-style captions CSV -> the same parquet shards as the synthetic world.

The CSV has at least `videoid` and `name` (the caption), as WebVid's does (`videoid,contentUrl,duration,
page_dir,name`). Each video is found as `<dir>/<page_dir>/<videoid>.<ext>` or `<dir>/<videoid>.<ext>`,
resampled to the target fps, centre-cropped and resized, and cut to its first `num_frames` frames.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .shards import shard_name, write_manifest, write_shard

log = logging.getLogger(__name__)
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


@dataclass
class IngestSpec:
    num_frames: int = 17
    fps: float = 8.0
    width: int = 128
    height: int = 128
    shards: int = 1


def read_captions(csv_path: str | Path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"videoid", "name"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: a captions CSV needs the columns videoid and name (WebVid layout), "
                         f"found {', '.join(rows[0])}")
    return rows


def find_video(videos: Path, row: dict) -> Path | None:
    for folder in (videos / row.get("page_dir", ""), videos):
        for ext in VIDEO_EXTS:
            path = folder / f"{row['videoid']}{ext}"
            if path.is_file():
                return path
    return None


def resample_clip(path: Path, spec: IngestSpec) -> np.ndarray:
    """uint8 [num_frames, height, width, 3]: frames at times k / fps, centre-cropped to the target aspect."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, times = [], []
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            frames.append(frame)
            times.append(frame.time)
            if frame.time > (spec.num_frames - 1) / spec.fps + 1.0:
                break
    if not frames:
        raise ValueError("no decodable frames")
    times = np.array(times) - times[0]
    wanted = np.arange(spec.num_frames) / spec.fps
    if times[-1] + 1e-6 < wanted[-1] - 0.5 / spec.fps:
        raise ValueError(f"too short: {times[-1]:.2f} s, need {wanted[-1]:.2f} s at {spec.fps:g} fps")
    picks = [int(np.argmin(np.abs(times - t))) for t in wanted]
    out = []
    for i in picks:
        img = frames[i].to_image()
        w, h = img.size
        target = spec.width / spec.height
        cw, ch = (min(w, round(h * target)), min(h, round(w / target)))
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((spec.width, spec.height), Image.Resampling.LANCZOS)
        out.append(np.asarray(img.convert("RGB")))
    return np.stack(out)


def ingest(videos: str | Path, captions_csv: str | Path, out_uri: str, spec: IngestSpec) -> dict:
    """Convert every captioned video that exists and decodes; the others are logged and counted."""
    from .. import storage
    from ..video import encode_video

    videos = Path(videos)
    rows, skipped = [], []
    for entry in read_captions(captions_csv):
        path = find_video(videos, entry)
        if path is None:
            skipped.append((entry["videoid"], "file not found"))
            continue
        try:
            clip = resample_clip(path, spec)
        except Exception as e:  # a broken or too-short file: skip it, keep the rest
            skipped.append((entry["videoid"], str(e)))
            continue
        rows.append(dict(key=str(entry["videoid"]), video=encode_video(clip, spec.fps, ".mp4"),
                         caption=entry["name"], num_frames=spec.num_frames, fps=spec.fps, width=spec.width,
                         height=spec.height, scene=None, source="webvid"))
    for videoid, why in skipped:
        log.warning("ingest: skipped video %s: %s", videoid, why)
    shards = {}
    for i in range(spec.shards):
        name = shard_name(i, spec.shards)
        shards[name] = write_shard(storage.join(out_uri, name), rows[i::spec.shards])
    write_manifest(out_uri, shards, {"source": "webvid", "skipped": [list(s) for s in skipped]})
    return {"rows": len(rows), "skipped": skipped, "shards": shards}
