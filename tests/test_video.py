"""PyAV video files: write, probe, read back."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from t2v.errors import InputError
from t2v.video import encode_video, probe, read_video, write_video


def moving_square(t=17, h=64, w=96):
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[:] = (20, 30, 90)
    for i in range(t):
        x = 4 + 4 * i
        frames[i, 20:40, x:x + 20] = (230, 40, 40)
    return frames


@pytest.mark.parametrize("ext, codec, fmt", [(".mp4", "h264", "mp4"), (".webm", "vp9", "webm"), (".gif", "gif", "gif")])
def test_round_trip_and_probe(tmp_path, ext, codec, fmt):
    frames = moving_square()
    path = write_video(tmp_path / f"v{ext}", frames, fps=8)
    info = probe(path)
    assert info.codec == codec and fmt in info.format
    assert (info.width, info.height, info.num_frames) == (96, 64, 17)
    assert path.stat().st_mode & 0o777 == 0o644  # an ordinary file, not mkstemp's private 0600
    # GIF stores centisecond delays: 8 fps is 12 cs per frame.
    assert info.fps == pytest.approx(8, rel=0.05 if ext == ".gif" else 1e-6)
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4
    # The red square is still where it was drawn.
    assert back[10, 30, 4 + 40 + 10, 0] > 180 and back[10, 30, 4 + 40 + 10, 2] < 90


def test_mp4_is_h264_yuv420p_with_faststart_and_exact_fps(tmp_path):
    ntsc = Fraction(24000, 1001)
    path = write_video(tmp_path / "v.mp4", moving_square(t=24), fps=ntsc)
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # index first: plays while downloading
    info = probe(data)
    assert info.pix_fmt == "yuv420p"
    assert info.fps == pytest.approx(float(ntsc), rel=1e-9)
    assert info.duration == pytest.approx(24 / float(ntsc), rel=1e-9)
    assert probe(write_video(tmp_path / "w.mp4", moving_square(t=3), fps=12.5)).fps == 12.5


@pytest.mark.parametrize("ext", [".mp4", ".webm"])
@pytest.mark.parametrize("fps", [8, Fraction(24000, 1001)])
def test_long_clips_keep_every_frame_and_the_exact_duration(ext, fps):
    # Past x264's 40-frame lookahead, B-frame timestamps need the muxer's own time base (a 10 s clip at 8 fps
    # once failed with "pts < dts").
    frames = np.concatenate([moving_square(t=17)] * 5)[:81]
    info = probe(encode_video(frames, fps, ext))
    assert info.num_frames == 81 and info.fps == pytest.approx(float(fps), rel=1e-6)
    assert info.duration == pytest.approx(81 / float(fps), rel=1e-3)


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".gif"])
def test_encode_to_bytes_matches_file(tmp_path, ext):
    frames = moving_square(t=5)
    data = encode_video(frames, 8, ext)
    path = write_video(tmp_path / f"v{ext}", frames, fps=8)
    # The same stream as the file write_video makes: the same header facts and the same pixels.
    assert probe(data) == probe(path)
    if ext == ".gif":
        assert data == path.read_bytes()
    else:
        # Not bit for bit: with libx264 (even on one thread), once the process has decoded a video, two
        # encodes of the same frames can differ (measured here: up to 26 levels at a pixel of a 32x32 clip, about a
        # level on average), and Matroska writes random UIDs. The pixels are the same up to that.
        assert np.abs(read_video(data).astype(float) - read_video(path).astype(float)).mean() < 3


def test_bad_frames_and_formats_leave_no_file(tmp_path):
    with pytest.raises(InputError, match="output.*mp4, .webm, .gif"):
        write_video(tmp_path / "v.avi", moving_square(), fps=8)
    with pytest.raises(InputError, match="even width and height"):
        write_video(tmp_path / "odd.mp4", moving_square(h=63), fps=8)
    with pytest.raises(InputError, match="uint8"):
        write_video(tmp_path / "f.mp4", moving_square().astype(np.float32), fps=8)
    assert list(tmp_path.iterdir()) == []
