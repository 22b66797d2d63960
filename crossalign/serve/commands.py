"""`crossalign serve` and `crossalign classify`, registered on the main command (crossalign.cli imports this)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from crossalign.cli import app
from crossalign.cli_common import WORKSPACE, Device_, Precision_, Workspace_, friendly
from crossalign.serve.config import SERVE_ENVIRONMENT, ServeConfig

SERVE = ServeConfig()
MB = 2**20


@app.command()
@friendly
def serve(
    workspace: Workspace_ = WORKSPACE,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every interface; think first).")] = SERVE.host,
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed).")] = SERVE.port,
    max_upload_mb: Annotated[float, typer.Option(help="Largest query image upload, in MB (2^20 bytes).")] = (
        SERVE.max_upload_bytes / MB),
    max_upload_pixels: Annotated[int, typer.Option(help="Most pixels a query image may have.")] = (
        SERVE.max_upload_pixels),
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        help="Allow this origin by CORS (repeatable); CORS is off without it.")] = None,
    image_root: Annotated[Optional[list[Path]], typer.Option(
        help="Serve images only from inside this folder (repeatable); default each corpus's root.")] = None,
    refresh_seconds: Annotated[float, typer.Option(help="How often to look for new table versions.")] = (
        SERVE.refresh_seconds),
    device: Device_ = SERVE.device, precision: Precision_ = SERVE.precision,
    normalise: Annotated[Optional[str], typer.Option(
        "--normalise", help="Cross-modal scores: inverted_softmax, dynamic or none (default: as search).")] = None,
    access_log: Annotated[bool, typer.Option(help="Log one line per request.")] = SERVE.access_log,
    compile: Annotated[str, typer.Option(
        help="torch.compile the text query encoders in the background: auto (on the CPU where a C++ compiler is "
        "found), on, off.")] = SERVE.compile,
    autotune: Annotated[bool, typer.Option(
        help="When compiling, time Inductor's GEMM kernels (a slower first compile, faster queries).")] = (
        SERVE.autotune),
) -> None:
    """Serve the tables: a JSON API (docs at /docs) and a search page at /, answering from the latest versions."""
    for name, value in SERVE_ENVIRONMENT.items():  # before torch loads its OpenMP runtime
        os.environ.setdefault(name, value)
    import uvicorn

    from crossalign.serve.app import create_app
    from crossalign.workspace import Workspace

    config = ServeConfig(host=host, port=port, max_upload_bytes=int(max_upload_mb * MB),
                         max_upload_pixels=max_upload_pixels, cors_origins=cors_origin or [],
                         image_roots=image_root or [], refresh_seconds=refresh_seconds, device=device,
                         precision=precision, normalisation=normalise, access_log=access_log, compile=compile,
                         autotune=autotune)
    listener = _listen(config.host, config.port)  # a taken port fails now, before the encoders load
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        web = create_app(Workspace(workspace), config)
    except BaseException:
        listener.close()
        raise
    bound_host, bound_port = listener.getsockname()[:2]
    pool = web.state.pool
    typer.echo(f"serving {Workspace(workspace).root} (mapper {pool.current.mapper_id}, {pool.current.rows['images']} "
               f"images) on http://{bound_host}:{bound_port}/  (API docs: /docs)", err=True)
    server = uvicorn.Server(uvicorn.Config(web, log_level="info", access_log=config.access_log,
                                           timeout_graceful_shutdown=10))
    server.run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port.

    Raises:
        ValueError: the address cannot be bound (taken, or not this machine's), in one line.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that name it, and without it every response on a
    # kept-alive connection waited ~40 ms (Nagle's algorithm against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@app.command()
@friendly
def classify(
    workspace: Workspace_ = WORKSPACE,
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated labels: \"dog,cat,bird\".")] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="A file of labels, one per line.")] = None,
    template: Annotated[Optional[list[str]], typer.Option(
        help="Prompt template with {} for the label (repeatable: the prompts' mean is used). Default: "
        "'a photo of a {}.'")] = None,
    split: Annotated[Optional[str], typer.Option(help="Only images of this split.")] = None,
    corpus_name: Annotated[Optional[str], typer.Option("--corpus", help="Only images of this corpus.")] = None,
    truth: Annotated[Optional[Path], typer.Option(
        help="A captions.jsonl (or its corpus folder) whose records carry `label`: print the top-1 accuracy.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Device_ = SERVE.device, precision: Precision_ = SERVE.precision,
) -> None:
    """Zero-shot labels: each image's best label, score and top 3, written to <workspace>/labels/zeroshot.parquet."""
    from crossalign.align.classify import DEFAULT_TEMPLATE, accuracy_against, classify_images, parse_labels
    from crossalign.workspace import Workspace

    file_text = labels_file.read_text(encoding="utf-8-sig") if labels_file is not None else None
    names = parse_labels(labels, file_text)
    ws = Workspace(workspace)
    summary = classify_images(ws, names, template or [DEFAULT_TEMPLATE], split, corpus_name, device, precision)
    result = summary.to_dict()
    if truth is not None:
        result["accuracy"], result["compared"] = accuracy_against(ws, truth)
    if as_json:
        typer.echo(json.dumps(result))
        return
    width = max(len(name) for name in summary.counts)
    for name, count in summary.counts.items():
        typer.echo(f"{name:<{width}}  {count:>7}")
    typer.echo(f"{summary.images} images labelled by mapper {summary.mapper_id}: {summary.path}")
    if truth is not None:
        typer.echo(f"zero-shot top-1 accuracy: {result['accuracy']:.3f} on {result['compared']} images "
                   f"(true labels from {truth})")
