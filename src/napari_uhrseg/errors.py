"""Errors a user can cause. Each message says what went wrong and what to do about it."""


class UhrsegError(Exception):
    """Base class: the message is meant for the user, as is."""


class UnsupportedImageError(UhrsegError, ValueError):
    """The file cannot be opened as an image pyramid (format, shape, dtype or corruption)."""


class CheckpointError(UhrsegError, ValueError):
    """A checkpoint is damaged, or belongs to another method, class list or backbone."""


class ExportError(UhrsegError, OSError):
    """An export could not be written; the previous file, if any, is untouched."""


class DeviceError(UhrsegError, ValueError):
    """The device asked for does not exist on this machine (or is not a device name)."""


class Cancelled(UhrsegError):
    """A long job was cancelled by the user; finished work is kept."""
