"""The FastAPI app: a JSON API over `Searcher` (OpenAPI at /docs), images by id, and the web page at /.

Every error a request can cause answers with its status and one line of JSON, `{"error": "..."}`; anything
unexpected is logged with its traceback here and answered as a one-line 500, never a traceback.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from crossalign.align import MapperMismatchError
from crossalign.align.classify import DEFAULT_TEMPLATE, classify_images
from crossalign.corpus.probe import ItemRejected, probe_image
from crossalign.search import QueryError
from crossalign.serve.batching import QUERY_ENCODER
from crossalign.serve.config import ServeConfig
from crossalign.serve.images import ImageFile, ImageNotFound, ImageStore
from crossalign.serve.page import PAGE_HTML
from crossalign.serve.queries import LabelIndex, Page, image_record, image_search, similar_images, text_search
from crossalign.serve.state import TABLES, SearcherPool, UnknownMapperError
from crossalign.store import IMAGES_TABLE, StoreMismatchError, mapper_versions
from crossalign.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)

Target = Literal["images", "captions"]
Mode = Literal["vector", "fts", "hybrid"]
Split = Annotated[str | None, Query(max_length=100, description="Only results of this split.")]
Corpus = Annotated[str | None, Query(max_length=200, description="Only results of this corpus.")]
Mapper = Annotated[str | None, Query(max_length=100, description="Search an older mapper's vectors (see /api/tables).")]
Label = Annotated[str | None, Query(max_length=200, description="Only images with this zero-shot label.")]
Limit = Annotated[int | None, Query(ge=1, description="Results per page (offset + limit: at most max_results).")]
Offset = Annotated[int, Query(ge=0, description="Skip this many results (paging).")]
Captions = Annotated[bool, Query(description="Attach up to 5 captions to each image hit.")]
STATUS = {QueryError: 400, StoreMismatchError: 400, UnknownMapperError: 404, ImageNotFound: 404,
          WorkspaceError: 409, MapperMismatchError: 409}


class ServeError(Exception):
    """A request the service refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def create_app(workspace: Workspace | Path | str, config: ServeConfig | None = None) -> FastAPI:
    """The service over `workspace`'s tables; the Searcher is built here, once (the watcher thread starts with
    the app and keeps it on the tables' latest versions).

    Raises:
        WorkspaceError, StoreMismatchError: the tables cannot be searched.
    """
    config = config or ServeConfig()
    workspace = workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
    if not workspace.lancedb_uri.is_dir():  # before connecting, which would create it
        raise WorkspaceError(f"no tables in {workspace.lancedb_uri}: run `crossalign run` first")
    pool, labels = SearcherPool(workspace, config), LabelIndex(workspace)
    store = ImageStore(workspace, config.image_roots)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        pool.start()
        yield
        pool.stop()

    app = FastAPI(title="crossalign", lifespan=lifespan, summary="Search images and captions in one embedding space.")
    app.state.pool, app.state.config = pool, config
    _add_error_handlers(app)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"])

    def page(limit: int | None, offset: int, split: str | None, corpus: str | None, label: str | None,
             captions: bool = False) -> Page:
        limit = limit or config.default_limit
        if offset + limit > config.max_results:
            raise ServeError(400, f"offset + limit is {offset + limit}; at most {config.max_results} results are "
                                  "served")
        return Page(limit, offset, split or None, corpus or None, label or None, captions)

    def answer(snapshot: Any, hits: list[dict], **query: Any) -> dict[str, Any]:
        return {"query": {k: v for k, v in query.items() if v is not None}, "mapper_id": snapshot.mapper_id,
                "normalisation": snapshot.searcher.normalisation, "versions": snapshot.versions, "hits": hits}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML)

    @app.get("/health", summary="Liveness, and the table versions the service answers from")
    def health() -> dict[str, Any]:
        current = pool.current
        return {"status": "ok", "mapper_id": current.mapper_id, "versions": current.versions, "rows": current.rows,
                "normalisation": current.searcher.normalisation, "loaded_at": current.loaded_at,
                "last_check": pool.last_check, "reload_error": pool.last_error,
                "text_queries": {"encoded": QUERY_ENCODER.texts, "encoder_calls": QUERY_ENCODER.batches,
                                 "cached": QUERY_ENCODER.cached},
                "query_compile": pool.compiler.status()}

    @app.get("/api/tables", summary="Tables, row counts, mapper versions and zero-shot labels")
    def tables() -> dict[str, Any]:
        current = pool.current
        return {"tables": {name: {"rows": current.rows[name], "version": current.versions[name]} for name in TABLES},
                "current_mapper": current.mapper_id, "notice": current.searcher.notice,
                "mappers": [v.__dict__ for v in mapper_versions(workspace)],
                "corpora": sorted(store_corpora(current)), "splits": sorted(store_splits(current)),
                "labels": {"counts": labels.refresh().counts(), **labels.metadata}}

    @app.get("/api/search/text", summary="Text -> images (normalised scores) or -> captions (vector, fts, hybrid)")
    def search_text(
        q: Annotated[str, Query(max_length=2000, description="The text query.")], target: Target = "images",
        mode: Mode = "vector", limit: Limit = None, offset: Offset = 0, split: Split = None, corpus: Corpus = None,
        mapper: Mapper = None, label: Label = None, captions: Captions = False,
    ) -> dict[str, Any]:
        snapshot = pool.get(mapper)
        hits = text_search(snapshot, labels, q, target, mode, page(limit, offset, split, corpus, label, captions))
        return answer(snapshot, hits, q=q, target=target, mode=mode, offset=offset, label=label)

    @app.post("/api/search/image", summary="An uploaded image -> captions (normalised scores) or -> similar images",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                  "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def search_image(
        request: Request, target: Target = "captions", limit: Limit = None, offset: Offset = 0, split: Split = None,
        corpus: Corpus = None, mapper: Mapper = None, label: Label = None, captions: Captions = False,
    ) -> dict[str, Any]:
        data = await _read_upload(request, config.max_upload_bytes)
        try:
            probe_image(data, "the upload", config.max_upload_pixels)
        except ItemRejected as err:
            raise ServeError(413 if err.reason == "too_many_pixels" else 415,
                             _upload_message(err, config.max_upload_pixels)) from None
        requested = page(limit, offset, split, corpus, label, captions)
        snapshot = pool.get(mapper)
        hits = await run_in_threadpool(image_search, snapshot, labels, data, target, requested)
        return answer(snapshot, hits, target=target, offset=offset, label=label, bytes=len(data))

    @app.get("/api/images/{image_id}", summary="One image: its row, captions and label")
    def image_info(image_id: str, mapper: Mapper = None) -> dict[str, Any]:
        return image_record(pool.get(mapper), labels, image_id)

    @app.get("/api/images/{image_id}/similar", summary="More like this: images nearest to a stored image")
    def similar(image_id: str, limit: Limit = None, offset: Offset = 0, split: Split = None, corpus: Corpus = None,
                mapper: Mapper = None, label: Label = None, captions: Captions = False) -> dict[str, Any]:
        snapshot = pool.get(mapper)
        hits = similar_images(snapshot, labels, image_id, page(limit, offset, split, corpus, label, captions))
        return answer(snapshot, hits, image_id=image_id, offset=offset, label=label)

    @app.get("/images/{image_id}", summary="The image file, by id", response_class=Response)
    def image_file(image_id: str, request: Request) -> Response:
        return _cached(request, store.read(pool.current.tables[IMAGES_TABLE], image_id), config.cache_seconds)

    @app.get("/images/{image_id}/thumbnail", summary="A JPEG thumbnail, by id", response_class=Response)
    def thumbnail(image_id: str, request: Request, size: Annotated[int, Query(ge=16, le=1024)] = 256) -> Response:
        if size not in config.thumbnail_sizes:
            size = min(config.thumbnail_sizes, key=lambda s: (s < size, abs(s - size)))  # the nearest served size
        return _cached(request, store.thumbnail(pool.current.tables[IMAGES_TABLE], image_id, size),
                       config.cache_seconds)

    @app.get("/api/labels", summary="Zero-shot labels: counts per label, and the images of one label")
    def labels_listing(label: Label = None, limit: Limit = None, offset: Offset = 0) -> dict[str, Any]:
        index = labels.refresh()
        result: dict[str, Any] = {"counts": index.counts(), **index.metadata}
        if label is not None:
            chosen = sorted(index.ids.get(label, ()), key=lambda i: -index.by_id[i]["score"])
            result["images"] = [{"id": i, **index.by_id[i], "thumbnail": f"/images/{i}/thumbnail"}
                                for i in chosen[offset:offset + (limit or config.default_limit)]]
        return result

    @app.post("/api/classify", summary="Zero-shot labels for every image (as `crossalign classify`)")
    def classify(
        labels_: Annotated[list[str], Body(alias="labels", description="Label names.")],
        templates: Annotated[list[str], Body(description="Prompt templates, each with {}.")] = [DEFAULT_TEMPLATE],  # noqa: B006
        split: Annotated[str | None, Body(max_length=100)] = None,
        corpus: Annotated[str | None, Body(max_length=200)] = None,
    ) -> dict[str, Any]:
        with QUERY_ENCODER.lock:  # the text encoder is the one the searches share
            summary = classify_images(workspace, labels_, templates, split, corpus, config.device, config.precision)
        labels.refresh()
        return {k: v for k, v in summary.to_dict().items() if k != "path"}

    return app


def store_corpora(snapshot: Any) -> set[str]:
    return _distinct(snapshot, "corpus")


def store_splits(snapshot: Any) -> set[str]:
    return _distinct(snapshot, "split")


def _distinct(snapshot: Any, column: str) -> set[str]:
    table = snapshot.tables[IMAGES_TABLE]
    return set(table.search().select([column]).limit(None).to_arrow().column(column).unique().to_pylist())


async def _read_upload(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes. A larger one is read on (and dropped) up to 4x the limit, so that
    a browser still receives the 413 instead of a reset connection; beyond that the connection is cut."""
    declared = request.headers.get("content-length", "")
    chunks, size = [], 0
    if not (declared.isdigit() and int(declared) > 4 * limit):
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 4 * limit:
                break
    if size > limit or (declared.isdigit() and int(declared) > limit):
        total = int(declared) if declared.isdigit() else size
        raise ServeError(413, f"the upload is {_mb(total)} MB, over the upload limit of {_mb(limit)} MB")
    if size == 0:
        raise ServeError(400, "no image in the request body: POST the image file's bytes")
    return b"".join(chunks)


def _mb(size: int) -> str:
    return f"{round(size / 2**20, 2):g}"


def _upload_message(err: ItemRejected, max_pixels: int) -> str:
    if err.reason == "too_many_pixels":
        return f"the upload is over the pixel limit of {max_pixels:,} pixels: {err.message.split(': ', 1)[-1]}"
    return f"the upload is not an image: {err.message.split(': ', 1)[-1]}"


def _cached(request: Request, image: ImageFile, max_age: int) -> Response:
    headers = {"ETag": image.etag, "Cache-Control": f"public, max-age={max_age}"}
    if request.headers.get("if-none-match") == image.etag:
        return Response(status_code=304, headers=headers)
    return Response(image.data, media_type=image.media_type, headers=headers)


def _error(status: int, message: str) -> JSONResponse:
    line = " ".join(str(message).split())[:500] or "error"
    return JSONResponse({"error": line}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, err: ServeError) -> JSONResponse:
        return _error(err.status, err.message)

    for kind, status in STATUS.items():
        def handler(_: Request, err: Exception, status: int = status) -> JSONResponse:
            return _error(status, str(err).splitlines()[0] if str(err) else type(err).__name__)

        app.add_exception_handler(kind, handler)

    @app.exception_handler(ValueError)
    async def value_error(_: Request, err: ValueError) -> JSONResponse:
        return _error(400, str(err).splitlines()[0] if str(err) else "invalid request")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
        return _error(422, f"invalid {where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = "not found: " + request.url.path[:200] if err.status_code == 404 else err.detail
        return _error(err.status_code, message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(err).__name__}); the service log has the details")
