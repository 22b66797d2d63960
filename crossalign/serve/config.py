"""The service's settings: one pydantic section, read by `crossalign serve` and `create_app`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from crossalign.config import CompileMode, CorpusConfig, ExtractConfig, Precision

_EXTRACT = ExtractConfig()
# Set for `crossalign serve` unless the environment says otherwise. Each request runs the query encoder (torch's
# OpenMP threads) and then LanceDB's search (its own threads); OpenMP's default keeps its threads spinning after
# every encoder call, and on 2 cores they starve the search: text -> image measured 321 ms at p50 against 50 ms
# with passive waiting (Flickr8k, MiniLM; benchmarks/serve.py sets the same for its in-process Searcher).
SERVE_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


class ServeConfig(BaseModel):
    """Where the service listens, what it accepts, and how it follows the tables."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Interface to bind: 127.0.0.1 unless told otherwise.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0: any free port).")
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="Largest query image upload.")
    max_upload_pixels: int = Field(
        default=CorpusConfig.model_fields["max_pixels"].default, ge=1,
        description="Most pixels a query image may declare (checked from its header, before decoding).")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; none: CORS off.")
    image_roots: list[Path] = Field(
        default_factory=list,
        description="Folders images may be read from; default each corpus's root (the folder its ingested "
        "files share) and the workspace's blob store.")
    refresh_seconds: float = Field(default=2.0, gt=0, description="How often the tables' versions are checked.")
    default_limit: int = Field(default=20, ge=1, description="Results per page when a request names none.")
    max_results: int = Field(default=1000, ge=1, description="Most results one request may reach (offset + limit).")
    thumbnail_sizes: tuple[int, ...] = Field(default=(96, 192, 256, 384), description="Thumbnail edges served.")
    cache_seconds: int = Field(default=3600, ge=0, description="HTTP max-age of images and thumbnails.")
    device: str = Field(default=_EXTRACT.device, description="Where query encoders run.")
    precision: Precision = Field(default=_EXTRACT.precision, description="Query encoders' precision.")
    normalisation: str | None = Field(default=None, description="Cross-modal scores; default the query bank's.")
    compile: CompileMode = Field(
        default="auto",
        description="torch.compile the text query encoders in the background after start (queries run eagerly "
        "until it is done): 'auto' does on the CPU where Inductor can build kernels.")
    autotune: bool = Field(default=True, description="When compiling, let Inductor time its GEMM kernels: a slower "
                           "first compile (about 2 minutes for the default encoders), faster queries.")
    access_log: bool = Field(default=True, description="Log one line per request.")
