"""Generated video clips for the tests: moving shapes over a photo, written with OpenCV's VideoWriter."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

CLIP_FRAMES, CLIP_FPS, CLIP_SIZE = 30, 10.0, (96, 128)  # CLIP_SIZE: (H, W)
CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "FFV1"}


def make_clip(path: Path, photo: np.ndarray, frames: int = CLIP_FRAMES, fps: float = CLIP_FPS,
              size: tuple[int, int] = CLIP_SIZE) -> Path:
    """A clip of a circle and a box moving over photo (resized to size (H, W)); the codec follows the extension."""
    height, width = size
    background = cv2.resize(cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), (width, height), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*CODECS[path.suffix]), fps,
                             (width, height))
    assert writer.isOpened()
    for i in range(frames):
        frame = background.copy()
        cv2.circle(frame, ((10 + 3 * i) % width, (30 + i) % height), 14 * height // 96, (0, 0, 255), -1)
        x = (width - 20 - 2 * i) % width
        cv2.rectangle(frame, (x, 60 * height // 96), (x + 20, 90 * height // 96), (255, 200, 0), -1)
        writer.write(frame)
    writer.release()
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a file as RGB, read sequentially with plain OpenCV (the reference)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def rotate_mp4(path: Path, out: Path) -> Path:
    """Copy an MP4 with its track's display matrix set to a 90° clockwise rotation (as phones record)."""
    data = bytearray(path.read_bytes())
    box = data.find(b"tkhd")
    assert box > 0 and data[box + 4] == 0  # version 0 track header
    matrix = box + 4 + 4 + 20 + 8 + 8  # version/flags, times/ids/duration, reserved, layer/group/volume/reserved
    assert struct.unpack_from(">9i", data, matrix) == (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    struct.pack_into(">9i", data, matrix, 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    out.write_bytes(bytes(data))
    return out
