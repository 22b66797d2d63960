"""The `crossalign` command: builds the same `PipelineConfig` the flows take, and shows people the results.

Every error a user can cause ends in one line on stderr and exit code 2, never a traceback: not from the
CLI, nor from Prefect's records of a failed run, which stay in the run's logs (`--debug` shows both).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional, get_args

import typer

from crossalign.cli_common import (
    CORPUS,
    EXTRACT,
    QUERYBANK,
    RETRAIN,
    RUNNER,
    STORE,
    TRAIN,
    WORKSPACE,
    BatchSize_,
    Compile_,
    Corpus_,
    DaskAddress_,
    DaskResources_,
    Decode_,
    Device_,
    Dim_,
    EvalSplit,
    Format,
    Heads_,
    ImageEncoder_,
    InputDropout_,
    Loss_,
    Lr_,
    Normalise_,
    Precision_,
    Runner_,
    Steps_,
    TextEncoder_,
    TrainSplit,
    Workspace_,
    console,
    friendly,
    preflight,
    run_flow,
)
from crossalign.cli_common import (
    dask_resources as parse_resources,
)
from crossalign.config import (
    CorpusConfig,
    ExtractConfig,
    Metric,
    PipelineConfig,
    QueryBankConfig,
    RunnerConfig,
    StoreConfig,
    TrainConfig,
)

app = typer.Typer(
    name="crossalign", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Align images and text in one embedding space: ingest, extract, train, embed, search.",
)

@app.callback()
def _console_options(
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks on the console: of an error, and Prefect's records of a failed run (which "
        "its run logs always keep); so does PREFECT_LOGGING_LEVEL=DEBUG.")] = False,
) -> None:
    console["debug"] = debug or os.environ.get("PREFECT_LOGGING_LEVEL", "").upper() == "DEBUG"


def _config(corpus: Path, workspace: Path, fmt: str = CORPUS.format, train_split: str = TRAIN.train_split,
            eval_split: str = TRAIN.eval_split, **sections: Any) -> PipelineConfig:
    return PipelineConfig(
        workspace=workspace, corpus=CorpusConfig(root=corpus, format=fmt),
        extract=ExtractConfig(**sections.get("extract", {})),
        train=TrainConfig(train_split=train_split, eval_split=eval_split, **sections.get("train", {})),
        store=StoreConfig(**sections.get("store", {})),
        **{k: v for k, v in sections.items() if k not in {"extract", "train", "store"}},
    )


@app.command()
@friendly
def run(
    corpus: Corpus_, workspace: Workspace_ = WORKSPACE, train_split: TrainSplit = TRAIN.train_split,
    eval_split: EvalSplit = TRAIN.eval_split, fmt: Format = CORPUS.format, steps: Steps_ = TRAIN.steps,
    loss: Loss_ = TRAIN.loss, lr: Lr_ = TRAIN.lr, input_dropout: InputDropout_ = TRAIN.input_dropout,
    dim: Dim_ = TRAIN.dim, heads: Heads_ = TRAIN.heads, batch_size: BatchSize_ = TRAIN.batch_size,
    retrain: Annotated[bool, typer.Option(help="Train a new mapper even if a compatible one exists.")] = RETRAIN,
    query: Annotated[Optional[list[str]], typer.Option(help="Sample text query to show (repeatable).")] = None,
    image_encoder: ImageEncoder_ = EXTRACT.image_encoder, text_encoder: TextEncoder_ = EXTRACT.text_encoder,
    device: Device_ = EXTRACT.device, precision: Precision_ = EXTRACT.precision,
    compile: Compile_ = EXTRACT.compile, decode: Decode_ = EXTRACT.decode,
    runner: Runner_ = RUNNER.kind, dask_address: DaskAddress_ = RUNNER.dask_address,
    dask_resources: DaskResources_ = "",
    normalise: Normalise_ = QUERYBANK.method,
) -> None:
    """Run the whole pipeline as the Prefect `pipeline` flow, then print the metrics and sample searches."""
    extract = {"device": device, "precision": precision, "image_encoder": image_encoder, "text_encoder": text_encoder,
               "compile": compile, "decode": decode}
    config = _config(corpus, workspace, fmt, train_split, eval_split, extract=extract,
                     train={"steps": steps, "loss": loss, "lr": lr, "input_dropout": input_dropout, "dim": dim,
                            "heads": heads, "batch_size": batch_size},
                     retrain=retrain, queries=query or [], querybank=QueryBankConfig(method=normalise),
                     runner=RunnerConfig(kind=runner, dask_address=dask_address,
                                         dask_resources=parse_resources(dask_resources)))
    preflight(config)
    from flows.pipeline import pipeline

    _print_run(run_flow(pipeline, config), config)


def _print_run(result: dict[str, Any], config: PipelineConfig) -> None:
    from crossalign.align import metrics_table
    from crossalign.corpus.accounting import accounting_line

    ingest = result["ingest"]
    typer.echo(f"\ningested {ingest['images']} images ({ingest['added']} new, {ingest['removed']} gone since the last "
               f"run), {ingest['captions']} captions, {ingest['normalised']} normalised, {ingest['rejected']} rejected")
    typer.echo(f"splits {ingest['splits']}; records: {accounting_line(ingest['accounting'])}")
    for s in result["extract"]:
        typer.echo(f"extracted {s['encoder']}: {s['encoded']} new ({s['items_per_s']}/s, {s['precision']}), "
                   f"{s['already_done']} already done, {s['failed']} failed")
    typer.echo(f"\nmapper: {result['mapper']['reason']}")
    typer.echo(f"\nretrieval on {config.train.eval_split} (mapper {result['metrics']['mapper_id']}):")
    typer.echo(metrics_table(result["metrics"]))
    typer.echo("\nsample text -> image searches:")
    for sample in result["samples"]:
        typer.echo(f"  {sample['query']!r}")
        for hit in sample["hits"]:
            typer.echo(f"    {hit['rank']}. {hit['score']:.3f}  {hit['uri']}")
    embedded = result["embed"]
    typer.echo(f"\ntables: {embedded['lancedb_uri']} (images: {embedded['images_in_table']} rows, "
               f"captions: {embedded['captions_in_table']} rows; query-bank normalisers computed for "
               f"{embedded['normalised_rows']} rows in {embedded['normaliser_seconds']:.1f} s)")


@app.command()
@friendly
def evaluate(
    corpus: Corpus_, workspace: Workspace_ = WORKSPACE,
    split: Annotated[str, typer.Option(help="Corpus split to evaluate on.")] = TRAIN.eval_split,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    fmt: Format = CORPUS.format, normalise: Normalise_ = QUERYBANK.method,
) -> None:
    """Evaluate the workspace's current mapper on a corpus split (ingesting and extracting what is missing).

    The metrics are those search gives (`--normalise`); the raw cosine ones follow with a `_raw` suffix.
    """
    from crossalign.align import current_mapper, evaluate_current_mapper, metrics_table
    from crossalign.corpus import ingest_corpus
    from crossalign.extract import extract_image_features, extract_text_features
    from crossalign.workspace import Workspace

    _log_to_stderr()
    ws = Workspace(workspace)
    mapper = current_mapper(ws).config()
    corpus_config = CorpusConfig(root=corpus, format=fmt)
    ingest_corpus(corpus_config, ws)
    encoders = ExtractConfig(image_encoder=mapper["image_encoder"]["encoder"],
                             text_encoder=mapper["text_encoder"]["encoder"])
    extract_image_features(ws, corpus_config.corpus_name, encoders, split=split)
    extract_text_features(ws, corpus_config.corpus_name, encoders, split=split)
    metrics = evaluate_current_mapper(ws, corpus_config.corpus_name, split, normalise)
    typer.echo(json.dumps(metrics) if as_json else metrics_table(metrics))


Target = Annotated[Optional[str], typer.Option(
    "--in", help="Table to search: images or captions (default: images for a text query, captions for an image).")]


@app.command()
@friendly
def search(
    query: Annotated[Optional[str], typer.Argument(help="Text query (or use --image).", show_default=False)] = None,
    workspace: Workspace_ = WORKSPACE,
    text: Annotated[Optional[str], typer.Option("--text", "-t", help="Text query (same as the argument).")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", "-i", help="Query by this image file.")] = None,
    target: Target = None,
    mode: Annotated[str, typer.Option(
        help="Text queries over captions: vector, fts (full text, BM25) or hybrid (both, fused by rank).")] = "vector",
    limit: Annotated[int, typer.Option("--limit", "-k", min=1, help="Number of results.")] = 5,
    split: Annotated[Optional[str], typer.Option(help="Only results of this split.")] = None,
    corpus_name: Annotated[Optional[str], typer.Option("--corpus", help="Only results of this corpus.")] = None,
    mapper: Annotated[Optional[str], typer.Option(help="Search an older mapper's vectors (see `tables list`).")] = (
        STORE.mapper_id),
    normalise: Normalise_ = QUERYBANK.method,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per hit.")] = False,
) -> None:
    """Search the tables: text -> image, image -> text, image -> image (--in images) or text -> text (--in captions).

    Prints rank, score and path or caption; exits 1 when nothing is found.
    """
    from crossalign.search import QueryError, Searcher

    if text is not None and query is not None:
        raise QueryError("give the text query once: as the argument or with --text")
    text = text if text is not None else query
    if (text is None) == (image is None):
        raise QueryError("give exactly one query: a text (argument or --text) or --image FILE")
    target = target or ("images" if text is not None else "captions")
    if target not in ("images", "captions"):
        raise QueryError(f"unknown table {target!r} for --in: use images or captions")
    if mode != "vector" and (text is None or target != "captions"):
        raise QueryError(f"--mode {mode} searches caption text: use it with a text query and --in captions")
    searcher = Searcher(workspace, mapper_id=mapper, normalisation=normalise)
    if searcher.notice:
        typer.secho(f"notice: {searcher.notice}", err=True)
    filters = {"split": split, "corpus": corpus_name}
    if text is not None and target == "images":
        hits = searcher.text_to_image(text, limit, **filters)
    elif text is not None:
        hits = searcher.text_to_text(text, limit, mode=mode, **filters)
    elif target == "images":
        hits = searcher.image_to_image(image, limit, **filters)
    else:
        hits = searcher.image_to_text(image, limit, **filters)
    if not hits:
        where = ", ".join(f"{k} {v!r}" for k, v in filters.items() if v)
        typer.secho(f"no results in {target}" + (f" for {where}" if where else ""), err=True)
        raise typer.Exit(1)
    for hit in hits:
        if as_json:
            typer.echo(json.dumps(hit.to_dict()))
        else:
            typer.echo(f"{hit.rank:>3}  {hit.score:.3f}  {hit.uri if hit.uri is not None else hit.text}")


tables_app = typer.Typer(no_args_is_help=True, help="The LanceDB tables: mapper versions, compaction, cleanup.")
app.add_typer(tables_app, name="tables")


@tables_app.command("list")
@friendly
def tables_list(
    workspace: Workspace_ = WORKSPACE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every mapper whose vectors the tables hold, and which one is current."""
    from crossalign.store import mapper_versions
    from crossalign.workspace import Workspace

    versions = mapper_versions(Workspace(workspace))
    if not versions:
        raise FileNotFoundError(f"no tables in {Workspace(workspace).lancedb_uri}: run `crossalign run` first")
    for v in versions:
        if as_json:
            typer.echo(json.dumps(v.__dict__))
        else:
            typer.echo(f"{v.table:<9} {v.mapper_id}  version {v.version:<4} {v.rows:>9} rows"
                       + ("  (current)" if v.current else ""))


@tables_app.command("cleanup")
@friendly
def tables_cleanup(workspace: Workspace_ = WORKSPACE) -> None:
    """Compact the tables and delete every old version, older mappers' vectors included."""
    from crossalign.store import cleanup_tables
    from crossalign.workspace import Workspace

    report = cleanup_tables(Workspace(workspace))
    if not report:
        raise FileNotFoundError(f"no tables in {Workspace(workspace).lancedb_uri}: run `crossalign run` first")
    for table, r in report.items():
        dropped = ", ".join(r["dropped_mappers"]) or "none"
        typer.echo(f"{table}: {r['versions_before']} versions -> {r['versions_after']}; vectors dropped of: {dropped}")


@app.command()
@friendly
def ingest(corpus: Corpus_, workspace: Workspace_ = WORKSPACE, fmt: Format = CORPUS.format) -> None:
    """Ingest a corpus into the workspace's canonical tables (the `ingest` flow)."""
    from flows.ingest import ingest_flow

    config = _config(corpus, workspace, fmt)
    preflight(config, "ingest")
    typer.echo(json.dumps(run_flow(ingest_flow, config), indent=2, default=str))


@app.command()
@friendly
def extract(
    corpus: Corpus_, workspace: Workspace_ = WORKSPACE, fmt: Format = CORPUS.format,
    image_encoder: ImageEncoder_ = EXTRACT.image_encoder, text_encoder: TextEncoder_ = EXTRACT.text_encoder,
    device: Device_ = EXTRACT.device, precision: Precision_ = EXTRACT.precision,
    compile: Compile_ = EXTRACT.compile, decode: Decode_ = EXTRACT.decode,
    runner: Runner_ = RUNNER.kind, dask_address: DaskAddress_ = RUNNER.dask_address,
    dask_resources: DaskResources_ = "",
) -> None:
    """Extract the image and caption features the workspace lacks (the `extract` flow)."""
    from flows.extract import extract_flow

    extract = {"device": device, "precision": precision, "image_encoder": image_encoder, "text_encoder": text_encoder,
               "compile": compile, "decode": decode}
    config = _config(corpus, workspace, fmt, extract=extract,
                     runner=RunnerConfig(kind=runner, dask_address=dask_address,
                                         dask_resources=parse_resources(dask_resources)))
    preflight(config, "extract")
    typer.echo(json.dumps(run_flow(extract_flow, config), indent=2, default=str))


@app.command()
@friendly
def train(
    corpus: Corpus_, workspace: Workspace_ = WORKSPACE, train_split: TrainSplit = TRAIN.train_split,
    eval_split: EvalSplit = TRAIN.eval_split, fmt: Format = CORPUS.format,
    image_encoder: Annotated[str, typer.Option(help="Whose cached image features to train on.")] = (
        EXTRACT.image_encoder),
    text_encoder: Annotated[str, typer.Option(help="Whose cached caption features to train on.")] = (
        EXTRACT.text_encoder),
    steps: Steps_ = TRAIN.steps, loss: Loss_ = TRAIN.loss, lr: Lr_ = TRAIN.lr,
    input_dropout: InputDropout_ = TRAIN.input_dropout, dim: Dim_ = TRAIN.dim, heads: Heads_ = TRAIN.heads,
    batch_size: BatchSize_ = TRAIN.batch_size, normalise: Normalise_ = QUERYBANK.method,
) -> None:
    """Train a new mapper on cached features and make it current (the `train` flow)."""
    from flows.train import train_flow

    config = _config(corpus, workspace, fmt, train_split, eval_split,
                     extract={"image_encoder": image_encoder, "text_encoder": text_encoder},
                     train={"steps": steps, "loss": loss, "lr": lr, "input_dropout": input_dropout, "dim": dim,
                            "heads": heads, "batch_size": batch_size},
                     querybank=QueryBankConfig(method=normalise))
    preflight(config, "train")
    typer.echo(json.dumps(run_flow(train_flow, config), indent=2, default=str))


@app.command()
@friendly
def embed(
    corpus: Corpus_, workspace: Workspace_ = WORKSPACE, fmt: Format = CORPUS.format,
    mapper: Annotated[Optional[str], typer.Option(help="Embed with this mapper (default: the current one).")] = (
        STORE.mapper_id),
    metric: Annotated[str, typer.Option(help=", ".join(get_args(Metric)) + ": the index and search distance.")] = (
        STORE.metric),
) -> None:
    """Write a mapper's joint vectors to LanceDB (the `embed` flow); another mapper gets its own table version."""
    from flows.embed import embed_flow

    config = _config(corpus, workspace, fmt, store={"metric": metric, "mapper_id": mapper})
    preflight(config, "embed")
    typer.echo(json.dumps(run_flow(embed_flow, config), indent=2, default=str))


@app.command("fashion-mnist")
@friendly
def fashion_mnist(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the corpus to.")],
    train: Annotated[int, typer.Option(help="Training images (from the Fashion-MNIST train set).")] = 2000,
    dev: Annotated[int, typer.Option(help="Dev images (from the Fashion-MNIST test set).")] = 500,
) -> None:
    """Write a demo corpus (PNG images + captions.jsonl) from the Debian package dataset-fashion-mnist."""
    from crossalign.corpus.fashion_mnist import write_fashion_mnist_corpus

    root = write_fashion_mnist_corpus(out, n_train=train, n_dev=dev)
    typer.echo(f"corpus written to {root} ({train} train + {dev} dev images)")


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("LANCE_LOG", "error")  # LanceDB's Rust warnings are for developers, not search users
    app()


if __name__ == "__main__":
    main()
import crossalign.serve.commands  # noqa: E402, F401  (registers `serve` and `classify`)
