"""The exception a source raises for one unreadable video (the loader skips it and counts it)."""


class BadVideo(Exception):
    """One video that cannot be read or decoded; the message says which and why."""


class DataError(RuntimeError):
    """The data cannot feed the run: too many unreadable videos, or no batch for too long."""


class FrameCountChanged(BadVideo):
    """The video holds fewer frames than its header said: its info now gives the real count, so a
    clip sampled again from it fits (the loader counts this one as skipped; the test and validation
    views sample again)."""
