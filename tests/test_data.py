"""Sharded video-text parquet and streaming, locally and against a real S3 endpoint, through real Ray."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import av
import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from t2v import storage
from t2v.data.ingest import IngestSpec, ingest
from t2v.data.shards import ROWS_PER_GROUP, SCHEMA, WorldSpec, read_manifest, write_manifest, write_shard, write_world
from t2v.data.stream import dataset, iter_batches, skipped
from t2v.video import probe, read_video
from t2v.world import Scene, render, split_of


def shard_rows(uri):
    """Every row of every shard, read straight from parquet (no t2v streaming code)."""
    fs, _ = storage.arrow_filesystem(uri)
    rows = []
    for entry in read_manifest(uri)["shards"]:
        _, path = storage.arrow_filesystem(storage.join(uri, entry["name"]))
        with fs.open_input_file(path) as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def test_world_shards_hold_what_the_schema_says(tmp_path):
    out = str(tmp_path / "world")
    write_world(out, WorldSpec(clips=12, shards=3, seed=1), parallel=False)
    manifest = read_manifest(out)
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 4]
    table = pq.read_table(tmp_path / "world" / "shard-00000-of-00003.parquet")
    assert table.schema.equals(SCHEMA)
    rows = shard_rows(out)
    assert len({r["key"] for r in rows}) == 12
    for r in rows:
        scene = Scene.from_json(r["scene"])
        assert split_of(scene) == "train" and r["source"] == "world/train"
        frames = read_video(r["video"])
        assert frames.shape == (17, 128, 128, 3) == (r["num_frames"], r["height"], r["width"], 3)
        assert np.abs(frames.astype(int) - render(scene).astype(int)).mean() < 6  # its scene, up to H.264 loss
        assert r["caption"] and r["latents"] is None
    # Deterministic per (seed, shard): shards can be made anywhere, in any order.
    write_world(str(tmp_path / "again"), WorldSpec(clips=12, shards=3, seed=1), parallel=False)
    assert [r["caption"] for r in shard_rows(str(tmp_path / "again"))] == [r["caption"] for r in rows]


def test_row_groups_are_sized_for_streaming(tmp_path):
    rows = [dict(key=f"k{i}", video=b"x", caption="c", num_frames=1, fps=8.0, width=2, height=2, source="t")
            for i in range(ROWS_PER_GROUP * 2 + 5)]
    write_shard(str(tmp_path / "s.parquet"), rows)
    meta = pq.ParquetFile(tmp_path / "s.parquet").metadata
    assert meta.num_row_groups == 3 and meta.row_group(0).num_rows == ROWS_PER_GROUP


def test_s3_world_streams_back_through_ray_data(ray_local, s3_bucket):
    uri = f"s3://{s3_bucket}/world"
    write_world(uri, WorldSpec(clips=24, shards=3, seed=2), parallel=True)  # Ray tasks, one per shard
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {"world/manifest.json", "world/shard-00002-of-00003.parquet"} <= keys
    expected = {r["key"]: r for r in shard_rows(uri)}
    got = {}
    for batch in dataset(uri, batch_size=5).iter_batches(batch_size=7, batch_format="numpy"):
        assert batch["video"].dtype == np.uint8 and batch["video"].shape[1:] == (17, 128, 128, 3)
        for key, cap, video in zip(batch["key"], batch["caption"], batch["video"]):
            got[key] = (cap, video)
    assert set(got) == set(expected)
    for key, (cap, video) in got.items():
        assert cap.encode() == expected[key]["caption"].encode()  # byte-identical
        assert np.array_equal(video, read_video(expected[key]["video"]))
    assert skipped(uri) == []


def test_corrupt_video_is_skipped_counted_and_named(ray_local, s3_bucket):
    uri = f"s3://{s3_bucket}/broken"
    spec = WorldSpec(clips=6, shards=1, seed=3)
    write_world(uri, spec, parallel=False)
    rows = shard_rows(uri)
    rows[2]["video"] = rows[2]["video"][:300]  # truncated mp4: header only
    write_shard(storage.join(uri, "shard-00000-of-00001.parquet"), rows)
    keys = [k for b in dataset(uri).iter_batches(batch_format="numpy") for k in b["key"]]
    assert sorted(keys) == sorted(r["key"] for i, r in enumerate(rows) if i != 2)
    bad = skipped(uri)
    assert len(bad) == 1 and bad[0][0] == "shard-00000-of-00001.parquet:2"
    # The plain loop agrees.
    plain_skips = []
    plain = [k for b in iter_batches(uri, skipped=plain_skips) for k in b["key"]]
    assert sorted(plain) == sorted(keys) and [k for k, _ in plain_skips] == [bad[0][0]]


def test_missing_shard_is_a_clear_error(tmp_path, s3_bucket):
    out = str(tmp_path / "w")
    write_world(out, WorldSpec(clips=4, shards=2), parallel=False)
    (tmp_path / "w" / "shard-00001-of-00002.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="missing: shard-00001-of-00002.parquet"):
        next(iter_batches(out))
    with pytest.raises(FileNotFoundError, match="missing: shard-00001-of-00002.parquet"):
        dataset(out)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        dataset(f"s3://{s3_bucket}/nothing")


def test_decode_resizes_and_cuts_frames(tmp_path):
    out = str(tmp_path / "w")
    write_world(out, WorldSpec(clips=3, shards=1, width=64, height=64, num_frames=9), parallel=False)
    batch = next(iter_batches(out, num_frames=5, width=32, height=48))
    assert batch["video"].shape == (3, 5, 48, 32, 3)


def _write_video(path, n, fps, w, h):
    """A real clip whose frame index is readable from its pixels (brightness = 8 * index)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = np.full((h, w, 3), min(255, 8 * i), np.uint8)
            frame[:, : w // 4] = (200, 0, 0)  # a red left edge, to check the crop keeps the centre
            for p in s.encode(av.VideoFrame.from_ndarray(frame, "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_ingest_webvid_csv(tmp_path):
    videos = tmp_path / "videos"
    (videos / "page1").mkdir(parents=True)
    _write_video(videos / "page1" / "1001.mp4", n=90, fps=30, w=320, h=180)  # 3 s of 16:9 at 30 fps
    _write_video(videos / "1002.mp4", n=50, fps=24, w=128, h=128)
    _write_video(videos / "1003.mp4", n=5, fps=24, w=64, h=64)  # too short for 17 frames at 8 fps
    (videos / "1004.mp4").write_bytes(b"not a video")
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerow(["1001", "https://example.invalid/1001.mp4", "PT00H00M03S", "page1", "Aerial view of a harbour, 4k"])
        w.writerow(["1002", "", "PT00H00M02S", "", "Close-up: café au lait being poured"])
        w.writerow(["1003", "", "PT00H00M00S", "", "too short"])
        w.writerow(["1004", "", "PT00H00M01S", "", "corrupt"])
        w.writerow(["1005", "", "PT00H00M01S", "", "missing"])
    out = str(tmp_path / "shards")
    result = ingest(videos, tmp_path / "results.csv", out, IngestSpec(num_frames=17, fps=8, width=64, height=64,
                                                                     shards=2))
    assert result["rows"] == 2
    assert {v for v, _ in result["skipped"]} == {"1003", "1004", "1005"}
    assert "too short" in dict(result["skipped"])["1003"]
    rows = {r["key"]: r for r in shard_rows(out)}
    assert rows["1002"]["caption"] == "Close-up: café au lait being poured" and rows["1001"]["scene"] is None
    info = probe(rows["1001"]["video"])
    assert (info.num_frames, info.width, info.height, info.fps) == (17, 64, 64, 8.0)
    frames = read_video(rows["1001"]["video"])
    # 8 fps from 30 fps: frame k is source frame round(k * 30 / 8) (brightness 8 per source frame).
    right = frames[:, 32, 60, 1].astype(int)
    assert abs(right[4] - 8 * 15) < 8 and abs(right[8] - 8 * 30) < 12
    # Centre crop of 16:9 to 1:1 keeps x in [70, 250) of 320: of the red band x < 80 only ~3.5 of 64 columns.
    assert frames[0, 32, 1, 0] > 150 and frames[0, 32, 8, 0] < 100


def test_cli_data_world_without_ray(tmp_path):
    r = subprocess.run([shutil.which("t2v"), "data", "world", "--out", str(tmp_path / "w"), "--clips", "4",
                        "--shards", "2", "--split", "heldout", "--size", "64", "--no-ray"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "4 clips (heldout) in 2 shards" in r.stdout
    rows = shard_rows(str(tmp_path / "w"))
    assert all(split_of(Scene.from_json(x["scene"])) == "heldout" and x["width"] == 64 for x in rows)
    bad = subprocess.run([shutil.which("t2v"), "data", "world", "--out", str(tmp_path / "x"), "--clips", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "clips:" in bad.stderr


def test_manifest_round_trip(tmp_path):
    write_manifest(str(tmp_path), {"a.parquet": 3}, {"source": "x"})
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == [{"name": "a.parquet", "rows": 3}]
