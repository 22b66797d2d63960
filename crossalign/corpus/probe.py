"""One item at a time, safely: read an image file inside the corpus root, probe its bytes, clean a caption.

Every failure here is the item's, never the ingest's: each raises `ItemRejected` with a stable reason
code and a message in words that names the item, and ingest turns it into a reject row.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import unicodedata
import warnings
from pathlib import Path

from PIL import Image

from crossalign.imaging import normalisation_steps

# Characters that are never part of a caption: C0/C1 controls other than ordinary whitespace.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f]")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or a lone JSON surrogate


class ItemRejected(Exception):
    """One corpus item (an image entry or a caption) cannot be used: `reason` is its reject code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason, self.message = reason, message


def printable(text: object, limit: int = 300) -> str:
    """`text` as valid UTF-8 for a table cell: undecodable bytes shown as escapes, cut to `limit` characters."""
    text = str(text).encode("utf-8", errors="backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_file_inside(root: Path, relative: str) -> tuple[Path, bytes]:
    """The real path and the bytes of the regular file `relative` names under `root` (itself resolved).

    Nothing outside `root` is opened: the path is resolved (symlinks followed) and checked before the
    open, and the open refuses a final symlink, so a link swapped in afterwards is not followed either.

    Raises:
        ItemRejected: `path_outside_root`, `path_not_utf8`, `missing_file` or `unreadable_path`
            (symlink loop, permission denied, name too long, a directory, FIFO or device, any OSError).
    """
    if _SURROGATE.search(relative):
        raise ItemRejected("path_not_utf8", f"{printable(relative)}: the image path is not valid UTF-8")
    if "\x00" in relative:
        raise ItemRejected("unreadable_path", f"{printable(relative)}: the image path contains a NUL byte")
    if os.path.isabs(relative):
        raise ItemRejected("path_outside_root", f"{printable(relative)}: absolute path, outside the corpus root "
                                                f"{root}")
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError) as err:  # Python 3.11 raises RuntimeError for a symlink loop
        raise ItemRejected("unreadable_path", f"{printable(relative)}: {_os_cause(err)}") from err
    if not path.is_relative_to(root):
        raise ItemRejected("path_outside_root", f"{printable(relative)}: resolves to {printable(path)}, outside the "
                                                f"corpus root {root}")
    return path, _read_regular_file(path, relative)


def _read_regular_file(path: Path, relative: str) -> bytes:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses anything not a regular file.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as err:
        raise ItemRejected("missing_file", f"{printable(relative)}: no file at {printable(path)}") from err
    except (OSError, ValueError) as err:
        raise ItemRejected("unreadable_path", f"{printable(relative)}: {_os_cause(err)}") from err
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ItemRejected("unreadable_path", f"{printable(relative)}: {_file_kind(mode)}, not an image file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    except OSError as err:
        raise ItemRejected("unreadable_path", f"{printable(relative)}: {_os_cause(err)}") from err
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _os_cause(err: BaseException) -> str:
    """The cause of an OS error in words, without Python reprs."""
    if isinstance(err, RuntimeError) or getattr(err, "errno", None) == errno.ELOOP:
        return "symlink loop (or a symlink where a file must be)"
    if isinstance(err, ValueError):
        return f"invalid path ({err})"
    if getattr(err, "errno", None) is not None:
        return os.strerror(err.errno).lower()
    return clean_message(err)


def clean_message(err: BaseException) -> str:
    """An exception's message with object reprs removed; its class name when it has no message."""
    text = _OBJECT_REPR.sub("the file", str(err)).strip()
    return printable(text or type(err).__name__, 200)


def probe_image(data: bytes, name: str, max_pixels: int) -> tuple[int, int, str, list[str]]:
    """Check an image cheaply: header, pixel count, then a reduced-size decode (JPEG draft mode).

    Returns:
        (width, height, format, the normalisation steps it will need).

    Raises:
        ItemRejected: `empty_file`, `not_an_image`, `too_many_pixels` (the limit in the message) or
            `undecodable`.
    """
    name = printable(name)
    if not data:
        raise ItemRejected("empty_file", f"{name}: the file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        match = _PIL_PIXELS.search(str(err))
        declared = f"{int(match.group(1)):,} pixels" if match else "more pixels than PIL allows"
        raise ItemRejected("too_many_pixels", f"{name}: the header declares {declared}, over the limit "
                                              f"max_pixels={max_pixels:,} (or PIL's own bomb limit)") from err
    except Exception as err:  # any failure to identify untrusted bytes is this item's, never the ingest's
        declared = _png_declared_size(data)
        if declared and declared[0] * declared[1] > max_pixels:  # a bare bomb header PIL will not even open
            raise ItemRejected("too_many_pixels", f"{name}: the PNG header declares {declared[0]}x{declared[1]} = "
                                                  f"{declared[0] * declared[1]:,} pixels, over the limit "
                                                  f"max_pixels={max_pixels:,}") from err
        raise ItemRejected("not_an_image", f"{name}: not an image format this build can read "
                                           f"({_pil_cause(err)})") from err
    with img:
        width, height = img.size
        if width * height > max_pixels:  # before any pixel is decoded
            raise ItemRejected("too_many_pixels", f"{name}: {width}x{height} = {width * height:,} pixels, over "
                                                  f"the limit max_pixels={max_pixels:,}")
        try:
            image_format, steps = img.format or "unknown", normalisation_steps(img)
            img.draft("RGB", (64, 64))  # decode at reduced size: catches truncation cheaply
            img.load()
        except Exception as err:  # PIL raises many types on corrupt data (OSError, SyntaxError, struct.error...)
            raise ItemRejected("undecodable", f"{name}: {img.format or 'image'} data cannot be decoded "
                                              f"({_pil_cause(err)})") from err
    return width, height, image_format, steps


def _png_declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, when `data` starts like a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _pil_cause(err: BaseException) -> str:
    text = str(err)
    if text.startswith("cannot identify image file"):
        return "no known image header"
    return clean_message(err)


def clean_caption(text: object, max_chars: int) -> tuple[str, list[str]]:
    """A caption ready for the table, and the repairs it needed (`caption_control_chars_replaced`,
    `caption_truncated`).

    Unicode NFC; control characters (NUL, BEL, ...) replaced by spaces; runs of whitespace (tabs,
    newlines) become one space; longer than `max_chars` is cut.

    Raises:
        ItemRejected: `caption_not_text`, `caption_not_utf8` or `empty_caption`.
    """
    if not isinstance(text, str):
        raise ItemRejected("caption_not_text", f"caption is not text but {type(text).__name__}")
    if _SURROGATE.search(text):
        raise ItemRejected("caption_not_utf8", "caption is not valid UTF-8")
    repairs = []
    text = unicodedata.normalize("NFC", text)
    if _CONTROL.search(text):
        text = _CONTROL.sub(" ", text)
        repairs.append("caption_control_chars_replaced")
    text = " ".join(text.split())
    if not text:
        raise ItemRejected("empty_caption", "caption is empty")
    if len(text) > max_chars:
        text = text[:max_chars]
        repairs.append("caption_truncated")
    return text, repairs
