"""The small files a run writes beside its checkpoints (config.json, metrics.jsonl, figures, eval
outputs), on local disk or at a URL such as gs://BUCKET/run (through tf.io.gfile, imported only for
URLs, so local use stays free of TensorFlow)."""

import contextlib
import io
import os


def is_url(path: str) -> bool:
    return "://" in str(path)


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


def makedirs(path: str) -> None:
    if is_url(path):
        _gfile().makedirs(str(path))
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _gfile().exists(str(path)) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(str(path)) if is_url(path) else os.path.isdir(path)


def remove(path: str) -> None:
    if is_url(path):
        _gfile().remove(str(path))
    else:
        os.remove(path)


@contextlib.contextmanager
def open_file(path: str, mode: str = "r"):
    """open() for local paths, tf.io.gfile.GFile for URLs (append included: GCS rewrites the object)."""
    if is_url(path):
        gfile = _gfile()
        if mode.startswith("w") and gfile.exists(str(path)):
            gfile.remove(str(path))  # not every filesystem behind gfile truncates on "w" (ram:// appends)
        with gfile.GFile(str(path), mode) as f:
            yield f
    else:
        with open(path, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            yield f


def write_text(path: str, text: str) -> None:
    with open_file(path, "w") as f:
        f.write(text)


def read_text(path: str) -> str:
    with open_file(path, "r") as f:
        return f.read()


def save_npy(path: str, array) -> None:
    import numpy as np
    buffer = io.BytesIO()
    np.save(buffer, array)
    with open_file(path, "wb") as f:
        f.write(buffer.getvalue())


def save_image(path: str, image, **kwargs) -> None:
    """A PIL image (or GIF frames with save_all=...) to `path`, the format from its extension."""
    buffer = io.BytesIO()
    image.save(buffer, format=os.path.splitext(str(path))[1].lstrip(".").upper().replace("JPG", "JPEG"), **kwargs)
    with open_file(path, "wb") as f:
        f.write(buffer.getvalue())
