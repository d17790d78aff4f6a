"""Synthetic labelled videos of moving shapes on smooth backgrounds, rendered on demand per frame."""

from __future__ import annotations

import dataclasses

import numpy as np

_SHAPES = ("square", "disk", "triangle", "ring")
_CARDINAL = ((1, 0), (-1, 0), (0, 1), (0, -1))  # (dx, dy) in image coordinates: right, left, down, up
_DIAGONAL = ((1, 1), (-1, -1), (-1, 1), (1, -1))  # down-right, up-left, down-left, up-right
# Class k -> (shape, direction). The first 8 are {square, disk} x cardinal directions, then
# {triangle, ring} x cardinal, then all four shapes x diagonal directions.
CLASSES = (
    tuple((s, d) for d in _CARDINAL for s in _SHAPES[:2])
    + tuple((s, d) for d in _CARDINAL for s in _SHAPES[2:])
    + tuple((s, d) for d in _DIAGONAL for s in _SHAPES)
)
SHAPES, DIRECTIONS = _SHAPES, _CARDINAL + _DIAGONAL
# 'orientation' labels: the background gradient's axis (mod 180 degrees) in bins centred on these angles
ORIENTATIONS = ("horizontal", "diagonal_down", "vertical", "diagonal_up")  # 0, 45, 90, 135 degrees
LABEL_BY = ("class", "shape", "direction", "orientation")
MIN_CONTRAST = 80.0  # minimum RGB distance between a shape colour and every background colour


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # frames in the whole video
    fps: float
    label: int
    name: str


@dataclasses.dataclass(frozen=True)
class _Sprite:
    kind: str
    radius: float  # half side for squares, radius for round shapes, circumradius for triangles
    color: np.ndarray  # float32 [3]
    pos: np.ndarray  # (x, y) at frame 0, pixels
    vel: np.ndarray  # (dx, dy) pixels per frame


def _coverage(kind: str, r: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape at pixel offsets dx [T, 1, Bx], dy [T, By, 1] from its centre."""
    if kind == "square":
        return np.clip(r + 0.5 - np.abs(dx), 0, 1) * np.clip(r + 0.5 - np.abs(dy), 0, 1)
    if kind == "triangle":  # pointing up; inradius r / 2, outward edge normals at 90, -30, -150 degrees
        c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
        inside = np.minimum(np.minimum(-dy, dx * c + dy * s), -dx * c + dy * s) + r / 2
        return np.clip(inside + 0.5, 0, 1)
    dist = np.sqrt(dx * dx + dy * dy)
    alpha = np.clip(r + 0.5 - dist, 0, 1)
    if kind == "ring":
        alpha = alpha * np.clip(dist - 0.55 * r + 0.5, 0, 1)
    return alpha


def orientation_bin(angle: float) -> int:
    """Index in ORIENTATIONS of a gradient along `angle` (radians; image coordinates, y down): the axis
    mod 180 degrees, rounded to the nearest multiple of 45 degrees."""
    return int(np.floor(np.mod(angle, np.pi) / (np.pi / 4) + 0.5)) % len(ORIENTATIONS)


def _window(center: np.ndarray, radius: float, n: int) -> np.ndarray:
    """Pixel indices [T, B] (mod n) of a window covering every pixel a shape of this radius can touch."""
    size = min(int(2 * radius) + 4, n)
    return np.mod(np.floor(center - radius - 1).astype(np.int64)[:, None] + np.arange(size), n)


class SyntheticVideos:
    """Deterministic procedural video source: class k = (shape kind, motion direction), see CLASSES.

    num_distractors (0-2) adds smaller shapes with class-independent motion under the main shape.
    radius / speed: ranges of the main shape's size and speed (pixels per frame), as fractions of the
    shorter side. label_by: what `info().label` reports: the class index ('class'), the shape kind
    ('shape': index in SHAPES), the motion direction ('direction': index in DIRECTIONS) or the axis of
    the background gradient ('orientation': index in ORIENTATIONS, the angle mod 180 degrees rounded
    to the nearest multiple of 45; gradient backgrounds only); videos are drawn from the first
    num_classes classes either way.
    """

    def __init__(self, num_videos: int, num_classes: int = 8, num_frames: int = 64, height: int = 64,
                 width: int = 64, fps: float = 30.0, seed: int = 0, num_distractors: int = 0,
                 radius: tuple[float, float] = (0.075, 0.15), speed: tuple[float, float] = (0.015, 0.04),
                 label_by: str = "class", background: str = "gradient"):
        if num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        if not 2 <= num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in [2, {len(CLASSES)}], got {num_classes}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if height < 16 or width < 16:
            raise ValueError(f"height and width must be >= 16, got {height}x{width}")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not 0 <= num_distractors <= 2:
            raise ValueError(f"num_distractors must be in [0, 2], got {num_distractors}")
        self.num_videos, self.num_classes, self.num_frames = num_videos, num_classes, num_frames
        self.height, self.width, self.fps, self.seed = height, width, float(fps), seed
        self.num_distractors = num_distractors
        for name, (lo, hi), top in (("radius", radius, 0.5), ("speed", speed, 0.5)):
            if not 0 < lo <= hi <= top:
                raise ValueError(f"{name} range must satisfy 0 < low <= high <= {top} (fractions of the shorter "
                                 f"side), got {(lo, hi)}")
        self.radius, self.speed = (float(radius[0]), float(radius[1])), (float(speed[0]), float(speed[1]))
        if label_by not in LABEL_BY:
            raise ValueError(f"label_by must be one of {LABEL_BY}, got {label_by!r}")
        self.label_by = label_by
        if background not in ("gradient", "plain"):
            raise ValueError(f"background must be 'gradient' or 'plain', got {background!r}")
        if label_by == "orientation" and background == "plain":
            raise ValueError("label_by='orientation' needs gradient backgrounds (a plain one has no orientation)")
        self.background = background

    def __len__(self) -> int:
        return self.num_videos

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self.num_videos:
            raise IndexError(f"video index {index} out of range [0, {self.num_videos})")
        return int(index)

    def label(self, index: int) -> int:
        """The label_by label of video `index` (see the class docstring)."""
        cls = self.class_index(index)
        if self.label_by == "shape":
            return SHAPES.index(CLASSES[cls][0])
        if self.label_by == "direction":
            return DIRECTIONS.index(CLASSES[cls][1])
        if self.label_by == "orientation":
            return orientation_bin(self._layout(index)[2])
        return cls

    def class_index(self, index: int) -> int:
        """Class of video `index`: a seeded permutation of the classes per block of num_classes videos."""
        index = self._check_index(index)
        block_rng = np.random.default_rng([self.seed, 1, index // self.num_classes])
        return int(block_rng.permutation(self.num_classes)[index % self.num_classes])

    def info(self, index: int) -> VideoInfo:
        return VideoInfo(self.num_frames, self.fps, self.label(index), f"synthetic_{self._check_index(index):06d}")

    def _layout(self, index: int):
        """Per-video random background (two gradient end colours) and sprites (main shape last)."""
        rng = np.random.default_rng([self.seed, 0, index])
        side = min(self.height, self.width)
        size = np.array([self.width, self.height], np.float64)
        bg0, bg1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        if self.background == "plain":  # one colour: the gradient's end colours made equal
            bg1 = bg0

        def contrasting_color():
            seg = bg1 - bg0
            for _ in range(1000):
                color = rng.uniform(0, 255, 3)
                t = np.clip(np.dot(color - bg0, seg) / max(np.dot(seg, seg), 1e-9), 0, 1)
                if np.linalg.norm(color - (bg0 + t * seg)) >= MIN_CONTRAST:
                    return color.astype(np.float32)
            raise RuntimeError("could not find a contrasting colour")  # practically unreachable

        sprites = []
        for _ in range(self.num_distractors):  # smaller shapes with class-independent motion
            theta = rng.uniform(0, 2 * np.pi)
            speed = rng.uniform(0.01, 0.03) * side
            sprites.append(_Sprite(str(rng.choice(_SHAPES[:2])), rng.uniform(0.04, 0.06) * side,
                                   contrasting_color(), rng.uniform(0, 1, 2) * size,
                                   speed * np.array([np.cos(theta), np.sin(theta)])))
        kind, direction = CLASSES[self.class_index(index)]
        radius = rng.uniform(*self.radius) * side * (1.2 if kind == "triangle" else 1.0)
        speed = rng.uniform(*self.speed) * side  # default ~1-2.6 px/frame at 64x64
        vel = speed * np.array(direction, np.float64) / np.linalg.norm(direction)
        sprites.append(_Sprite(kind, radius, contrasting_color(), rng.uniform(0, 1, 2) * size, vel))
        return bg0, bg1, angle, sprites

    def centers(self, index: int, frame_indices) -> np.ndarray:
        """(x, y) pixel centre of the main shape in each requested frame (positions wrap around the borders)."""
        t = self._check_frames(frame_indices).astype(np.float64)
        main = self._layout(self._check_index(index))[3][-1]
        return np.mod(main.pos + t[:, None] * main.vel, [self.width, self.height])

    def _check_frames(self, frame_indices) -> np.ndarray:
        t = np.asarray(frame_indices)
        if t.ndim != 1 or not (t.size == 0 or np.issubdtype(t.dtype, np.integer)):
            raise ValueError(f"frame_indices must be a 1-D integer array, got dtype {t.dtype} shape {t.shape}")
        if t.size and (t.min() < 0 or t.max() >= self.num_frames):
            raise ValueError(f"frame indices must be in [0, {self.num_frames}), got {t.min()}..{t.max()}")
        return t.astype(np.int64)

    def frames(self, index: int, frame_indices) -> np.ndarray:
        """Render only the requested frames: uint8 [len(frame_indices), height, width, 3]."""
        index = self._check_index(index)
        t = self._check_frames(frame_indices).astype(np.float32)
        h, w = self.height, self.width
        bg0, bg1, angle, sprites = self._layout(index)
        # Smooth linear gradient along a random direction, normalised to [0, 1] across the frame.
        proj = np.cos(angle) * (np.arange(w) + 0.5) / w + np.sin(angle) * (np.arange(h)[:, None] + 0.5) / h
        g = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-6)
        bg = (bg0 + g[..., None] * (bg1 - bg0) + 0.5).astype(np.uint8)
        out = np.broadcast_to(bg, (len(t), h, w, 3)).copy()
        for s in sprites:  # composite each shape inside a (wrapping) window around it only
            cx = (s.pos[0] + t * s.vel[0]).astype(np.float32)
            cy = (s.pos[1] + t * s.vel[1]).astype(np.float32)
            xi, yi = _window(cx, s.radius, w), _window(cy, s.radius, h)
            # Signed toroidal offsets of pixel centres from the shape centre, so shapes wrap around the borders.
            dx = np.mod(xi + 0.5 - cx[:, None] + w / 2, w) - w / 2
            dy = np.mod(yi + 0.5 - cy[:, None] + h / 2, h) - h / 2
            alpha = _coverage(s.kind, s.radius, dx[:, None, :], dy[:, :, None])[..., None]
            sel = (np.arange(len(t))[:, None, None], yi[:, :, None], xi[:, None, :])
            patch = out[sel].astype(np.float32)
            patch += alpha * (s.color - patch)
            out[sel] = (patch + 0.5).astype(np.uint8)
        return out


def from_config(config, num_videos: int) -> SyntheticVideos:
    """The synthetic source config.data describes, holding `num_videos` videos (frames at model.img_size)."""
    d, m = config.data, config.model
    return SyntheticVideos(num_videos=num_videos, num_classes=d.get("synthetic_classes", 0) or d.num_classes,
                           num_frames=d.video_frames, label_by=d.get("synthetic_label", "class"),
                           background=d.get("synthetic_background", "gradient"),
                           height=m.img_size, width=m.img_size, fps=d.video_fps, seed=config.seed,
                           radius=tuple(d.get("synthetic_radius", (0.075, 0.15))),
                           speed=tuple(d.get("synthetic_speed", (0.015, 0.04))))
