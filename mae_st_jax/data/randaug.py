"""RandAugment for video clips (timm's "rand-m7-mstd0.5-inc1" as mae_st uses it), one draw per clip.

The ops, magnitudes, signs and on/off coin flips are drawn once per clip and the same transform is applied
to every frame (PySlowFast/mae_st apply one AugmentOp to the list of frames). Data-dependent ops
(AutoContrast, Equalize) use each frame's own histogram, as PIL does per image. Frames are uint8
[T, H, W, 3]; ops run per frame with PIL, like the reference.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
# timm's _RAND_INCREASING_TRANSFORMS (the "inc1" op set), in its order
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm's _RAND_TRANSFORMS (inc0): the same ops with the non-increasing magnitude rules
PLAIN_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OP_PROB = 0.5  # timm's rand_augment_ops default: each chosen op runs with probability 0.5
TRANSLATE_PCT = 0.45


@dataclasses.dataclass(frozen=True)
class Policy:
    magnitude: float = 7.0  # m
    num_ops: int = 2  # n
    magnitude_std: float = 0.5  # mstd (inf: uniform in [0, m])
    magnitude_max: float = MAX_LEVEL  # mmax
    increasing: bool = True  # inc
    # the geometric ops' fill colour: mae_st passes no img_mean to its rand_augment_transform, so its
    # ops fill with rand_augment.py's _FILL (128, 128, 128), not timm's round(255 * mean)
    fill: tuple[int, int, int] = (128, 128, 128)

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else PLAIN_OPS


def parse(spec: str) -> Policy | None:
    """'rand-m7-mstd0.5-inc1' -> Policy (keys m, n, mstd, mmax, inc, as timm); '' or 'none' -> None."""
    spec = (spec or "").strip()
    if spec.lower() in ("", "none"):
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand' (e.g. 'rand-m7-mstd0.5-inc1')")
    kw = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n)([0-9.]+|inf)", part)
        if not match:
            raise ValueError(f"RandAugment spec {spec!r}: unknown part {part!r} (use m, n, mstd, mmax, inc)")
        key, value = match.groups()
        kw[key] = float(value)
    policy = Policy(magnitude=kw.get("m", 7.0), num_ops=int(kw.get("n", 2)), magnitude_std=kw.get("mstd", 0.5),
                    magnitude_max=kw.get("mmax", MAX_LEVEL), increasing=bool(kw.get("inc", 0)))
    if policy.num_ops < 1 or not 0 <= policy.magnitude <= policy.magnitude_max:
        raise ValueError(f"RandAugment spec {spec!r}: need n >= 1 and 0 <= m <= mmax")
    return policy


def _negate(rng, v: float) -> float:
    return -v if rng.random() > 0.5 else v


def _level_args(rng, name: str, level: float):
    """timm's level -> argument rules (signs drawn here, once per clip)."""
    frac = level / MAX_LEVEL
    if name == "Rotate":
        return _negate(rng, frac * 30.0)
    if name in ("ShearX", "ShearY"):
        return _negate(rng, frac * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _negate(rng, frac * TRANSLATE_PCT)
    if name.endswith("Increasing") and name[:-len("Increasing")] in ("Color", "Contrast", "Brightness",
                                                                       "Sharpness"):
        return 1.0 + _negate(rng, frac * 0.9)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return frac * 1.8 + 0.1
    if name == "PosterizeIncreasing":
        return 4 - int(frac * 4)
    if name == "Posterize":
        return int(frac * 4)
    if name == "SolarizeIncreasing":
        return 256 - int(frac * 256)
    if name == "Solarize":
        return int(frac * 256)
    if name == "SolarizeAdd":
        return int(frac * 110)
    return None  # AutoContrast, Equalize, Invert


def sample(rng: np.random.Generator, policy: Policy) -> list[tuple[str, object]]:
    """The clip's transform: a list of (op name, argument) for the ops that fire (may be empty)."""
    chosen = rng.choice(len(policy.ops), policy.num_ops, replace=True)
    out = []
    for i in chosen:
        if rng.random() > OP_PROB:  # timm: `if self.prob < 1.0 and random.random() > self.prob: skip`
            continue
        level = policy.magnitude
        if policy.magnitude_std == float("inf"):
            level = rng.uniform(0, level)
        elif policy.magnitude_std > 0:
            level = rng.normal(level, policy.magnitude_std)
        level = float(np.clip(level, 0.0, policy.magnitude_max))
        name = policy.ops[int(i)]
        out.append((name, _level_args(rng, name, level)))
    return out


def _apply_one(img: Image.Image, name: str, arg, fill) -> Image.Image:
    affine = dict(resample=Image.BICUBIC, fillcolor=fill)  # mae_st: interpolation 'bicubic'
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, **affine)
    if name.startswith("Posterize"):
        return img if arg >= 8 else ImageOps.posterize(img, max(0, arg))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return img.point(lut * len(img.getbands()))
    if name.startswith("Color"):
        return ImageEnhance.Color(img).enhance(arg)
    if name.startswith("Contrast"):
        return ImageEnhance.Contrast(img).enhance(arg)
    if name.startswith("Brightness"):
        return ImageEnhance.Brightness(img).enhance(arg)
    if name.startswith("Sharpness"):
        return ImageEnhance.Sharpness(img).enhance(arg)
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, arg, 0, 0, 1, 0), **affine)
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, arg, 1, 0), **affine)
    if name == "TranslateXRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, arg * img.size[0], 0, 1, 0), **affine)
    if name == "TranslateYRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, arg * img.size[1]), **affine)
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply(frames: np.ndarray, ops: list[tuple[str, object]], fill=(128, 128, 128)) -> np.ndarray:
    """uint8 [T, H, W, 3] with the same ops applied to every frame (the input is returned if none fire)."""
    if not ops:
        return frames
    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        img = Image.fromarray(frame)
        for name, arg in ops:
            img = _apply_one(img, name, arg, tuple(fill))
        out[t] = np.asarray(img)
    return out


def rand_augment(rng: np.random.Generator, frames: np.ndarray, policy: Policy) -> np.ndarray:
    """Draw one transform for the clip from `rng` and apply it to all its frames."""
    return apply(frames, sample(rng, policy), policy.fill)
