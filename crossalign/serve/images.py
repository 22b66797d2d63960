"""Images by id: looked up in the `images` table, read only from inside an allowed root, thumbnailed on the fly.

No request string becomes a path. An id must be 32 hex digits before it is looked up (as an SQL literal);
the path comes from the table's row, and is resolved (symlinks followed) and checked to lie inside one
of the roots allowed for the row's corpus before it is opened; the open itself refuses a final symlink
and anything but a regular file. The allowed roots are the workspace's blob store of the corpus and the
corpus root: the folder its ingested files share (ingest resolved every file inside the root it was
given, and the workspace does not record that root itself), or the roots the service was told.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from crossalign.store.schema import CORPUS_COLUMN, ID_COLUMN
from crossalign.store.tables import quote
from crossalign.workspace import Workspace

logger = logging.getLogger(__name__)
IMAGE_ID = re.compile(r"[0-9a-f]{32}")  # ingest's content-derived ids (sha256, first 32 hex digits)
THUMBNAIL_CACHE_ENTRIES = 4096
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
               "BMP": "image/bmp", "TIFF": "image/tiff"}


class ImageNotFound(LookupError):
    """No image with that id, or its file cannot be served (gone, or outside the allowed roots)."""


@dataclass(frozen=True)
class ImageFile:
    """An image's bytes as read from disk, with what HTTP caching needs."""

    image_id: str
    data: bytes
    media_type: str
    etag: str


def check_image_id(image_id: str) -> str:
    """`image_id` if it has the form of an image id.

    Raises:
        ImageNotFound: anything else (paths, `..`, encoded slashes...), named in the message.
    """
    if not IMAGE_ID.fullmatch(image_id):
        raise ImageNotFound(f"unknown image id {image_id[:80]!r}: ids are 32 hexadecimal digits")
    return image_id


class ImageStore:
    """Serves the images of one workspace's tables (see the module)."""

    def __init__(self, workspace: Workspace, roots: list[Path] | None = None) -> None:
        self.workspace = workspace
        self._explicit = [Path(root).resolve() for root in roots or []]
        self._inferred: dict[str, tuple[float, list[Path]]] = {}  # corpus -> (images.parquet mtime, roots)
        self._thumbnails: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def roots(self, corpus: str) -> list[Path]:
        """The folders images of `corpus` may be read from."""
        blobs = (self.workspace.corpus_dir(corpus) / "blobs").resolve()
        return [blobs, *(self._explicit or self._corpus_roots(corpus))]

    def _corpus_roots(self, corpus: str) -> list[Path]:
        table = self.workspace.images_table(corpus)
        try:
            mtime = table.stat().st_mtime
        except OSError:
            return []
        cached = self._inferred.get(corpus)
        if cached is None or cached[0] != mtime:
            import pyarrow.parquet as pq

            blobs = self.workspace.corpus_dir(corpus) / "blobs"
            folders = {str(Path(uri).parent) for uri in pq.read_table(table, columns=["uri"]).column("uri").to_pylist()
                       if not Path(uri).is_relative_to(blobs)}
            roots = [Path(os.path.commonpath(sorted(folders))).resolve()] if folders else []
            cached = self._inferred[corpus] = (mtime, roots)
        return cached[1]

    def lookup(self, table: Any, image_id: str) -> tuple[str, str]:
        """(uri, corpus) of `image_id` in the `images` table.

        Raises:
            ImageNotFound: a malformed or unknown id.
        """
        rows = (table.search().where(f"{ID_COLUMN} = {quote(check_image_id(image_id))}")
                .select(["uri", CORPUS_COLUMN]).limit(1).to_list())
        if not rows:
            raise ImageNotFound(f"unknown image id {image_id!r}: no such image in the tables")
        return rows[0]["uri"], rows[0][CORPUS_COLUMN]

    def read(self, table: Any, image_id: str) -> ImageFile:
        """The bytes of image `image_id`.

        Raises:
            ImageNotFound: unknown id, a file gone, or one that resolves outside the allowed roots.
        """
        uri, corpus = self.lookup(table, image_id)
        path = self._inside_roots(Path(uri), corpus, image_id)
        data, info = _read_regular_file(path, image_id)
        with Image.open(io.BytesIO(data)) as img:
            media_type = MEDIA_TYPES.get(img.format or "", "application/octet-stream")
        return ImageFile(image_id, data, media_type, f'"{image_id}-{info.st_size}-{int(info.st_mtime)}"')

    def thumbnail(self, table: Any, image_id: str, size: int) -> ImageFile:
        """A JPEG of image `image_id` fitted into `size` x `size` pixels (cached in memory)."""
        original = self.read(table, image_id)
        key = (image_id, size, original.etag)
        with self._lock:
            data = self._thumbnails.get(key)
            if data is not None:
                self._thumbnails.move_to_end(key)
        if data is None:
            data = _thumbnail(original.data, size)
            with self._lock:
                self._thumbnails[key] = data
                while len(self._thumbnails) > THUMBNAIL_CACHE_ENTRIES:
                    self._thumbnails.popitem(last=False)
        return ImageFile(image_id, data, "image/jpeg", original.etag[:-1] + f'-t{size}"')

    def _inside_roots(self, path: Path, corpus: str, image_id: str) -> Path:
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise ImageNotFound(f"image {image_id}: its file is gone") from None
        if not any(real.is_relative_to(root) for root in self.roots(corpus)):
            logger.warning("refused image %s: %s resolves to %s, outside the corpus root and blob store",
                           image_id, path, real)
            raise ImageNotFound(f"image {image_id}: its file is outside the corpus root; not served")
        return real


def _read_regular_file(path: Path, image_id: str) -> tuple[bytes, os.stat_result]:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        raise ImageNotFound(f"image {image_id}: its file cannot be opened") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageNotFound(f"image {image_id}: its path is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read(), info
    finally:
        os.close(fd)


def _thumbnail(data: bytes, size: int) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
        return out.getvalue()
