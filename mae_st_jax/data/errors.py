"""The exception a source raises for one unreadable video (the loader skips it and counts it), and the
helpers the readers share for it."""

import threading
import weakref

from absl import logging


class BadVideo(Exception):
    """One video that cannot be read or decoded; the message says which and why."""


class DataError(RuntimeError):
    """The data cannot feed the run: too many unreadable videos, or no batch for too long."""


class FrameCountChanged(BadVideo):
    """The video holds fewer frames than its header said: its info now gives the real count, so a
    clip sampled again from it fits (the loader counts this one as skipped; the test and validation
    views sample again)."""


def sampled_again_if_shorter(read, *args):
    """read(*args), once more when the file proved shorter than its header said (FrameCountChanged:
    the source's info now holds the real length, so sampling again fits)."""
    try:
        return read(*args)
    except FrameCountChanged:
        return read(*args)


_warned = weakref.WeakKeyDictionary()  # source -> videos of it already named in a warning
_warned_lock = threading.Lock()


def warn_once(source, video: int, message: str, *args) -> None:
    """logging.warning(message, *args) the first time `video` of `source` proves unreadable in this
    process, whichever reader found it (training loader, validation, test views); later finds are
    counted by their callers, not logged again."""
    with _warned_lock:
        try:
            seen = _warned.setdefault(source, set())
        except TypeError:  # a source that takes no weak reference: warned every time
            seen = set()
        if video in seen:
            return
        seen.add(video)
    logging.warning(message, *args)


logging.ABSLLogger.register_frame_to_skip(__file__, "warn_once")  # the log line names the caller's file
