"""Resolving media paths from records without ever leaving the media root.

Records come from third-party JSONL files, so a path is untrusted: absolute paths, `..` components and
symbolic links that resolve outside the root are refused with `PathEscape`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath


class PathEscape(ValueError):
    """A media path points outside the media root."""


def resolve_media_path(root: Path, relative: str) -> Path:
    """`root / relative`, fully resolved, after checking it stays inside `root`.

    The file need not exist; callers check existence separately (missing media is a different error).
    """
    if not relative or "\x00" in relative:
        raise PathEscape(f"invalid media path {relative!r}")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise PathEscape(f"absolute media path {relative!r}")
    if ".." in posix.parts or ".." in windows.parts:
        raise PathEscape(f"media path {relative!r} contains '..'")
    return ensure_inside(root, root / relative)


def ensure_inside(root: Path, path: Path) -> Path:
    """`path` resolved (following links); PathEscape if that lands outside `root`."""
    real_root = root.resolve()
    real = path.resolve()
    if not real.is_relative_to(real_root):
        raise PathEscape(f"media path {path} resolves to {real}, outside the media root {real_root}")
    return real
