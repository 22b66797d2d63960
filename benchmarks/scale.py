"""Scale: every stage at 1M and 10M items, each in a fresh process: items/s, peak RSS, Prefect tasks, commit cost.

    python benchmarks/scale.py [--sizes 1000000,10000000] [--ingest-size 1000000] [--workspace DIR] [--keep]
    python benchmarks/scale.py --quick          # 10k and 100k items, ingest of 100k: for development

The corpus and the encoders are synthetic (`benchmarks/synthetic.py`, which says how they are made):
N items are N image-caption pairs, `--captions-per-image` (5) captions per image, written straight into
the canonical corpus tables; the encoders give 64-d hash-seeded features, the image one from the image
id in each linked file's name (files are opened by the product's image path, never decoded), the text
one its image's feature plus noise. So what is measured is the orchestration, storage and training
paths, not a model. At 10M items the image side is 2M images: the image path, even without decoding,
costs PIL opens and thread hand-offs (about 7,000 images/s here, against 30,000 captions/s), so
`--captions-per-image 1` (10M images) would add some 20 minutes on this machine.

Per size, in a fresh workspace, each stage runs in a fresh process (this script with `--stage`),
which reports its wall time and its peak RSS (`VmHWM`: the process's own; the Prefect API server that
the extract flow starts runs in a process of its own and is not counted):

- write: the synthetic corpus tables (harness, not product: reported, not in the maxima);
- extract: the `extract` flow (plan, one Prefect task per unit of work on the thread runner, shard
  commits). Tasks per modality are counted as the library calls the shard tasks make (retries
  included). Commit times per shard are `ShardWriter.commit_seconds` as the flow's summaries carry them
  (`commit_s`: time holding the manifest lock); where the summaries have none, this harness times each
  `ShardWriter._commit` call itself (lock wait included) and says so. Early = median of shards 6-15,
  late = median of the last 10 (modalities with under 30 shards give none);
- train: `fit_mapper` on the train split, selected on dev (both directions' recall printed beside chance);
- embed: `embed_corpus` (LanceDB tables, the ANN index, the full-text index).

Ingest runs once, at `--ingest-size`: `ingest_corpus` on a raw corpus of distinct tiny PNGs embedded in
Parquet (`write_synthetic_raw_corpus`), each stored as a blob by ingest.

The last line is machine-readable: `items=<largest size> peak_rss_mb_max=<every product stage, every size>
rss_growth_1m_to_10m=<the stage with the largest peak at the largest size: its peak there over its peak at
the smallest size> commit_late_over_early=<largest size, worst modality> tasks=<largest size, most of one
modality> train_rss_mb=<train at the largest size>` ("nan" where a stage failed or has too few shards).

Items/s counts what each stage handles, over the stage's own time (imports and process start aside):
ingest and write, captions; extract, feature rows of both modalities (the flow's time, after the
Prefect server is up); train, pairs of the training split (loading, steps, selection, query bank);
embed, rows written to both tables (index builds included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = "synthetic"
PRODUCT_STAGES = ("ingest", "extract", "train", "embed")
SIZE_STAGES = ("write", "extract", "train", "embed")
EARLY = slice(5, 15)  # shards 6 to 15: around the 10th
LATE_SHARDS = 10
MIN_SHARDS = 30


# --- the stages, each run in a fresh process ----------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _synthetic():
    sys.path.insert(0, str(HERE))
    import synthetic

    return synthetic


def stage_write(p: dict[str, Any]) -> dict[str, Any]:
    from crossalign.workspace import Workspace

    corpus = _synthetic().write_synthetic_corpus(Workspace(p["workspace"]), CORPUS, p["items"],
                                                 captions_per_image=p["captions_per_image"])
    return {"items": corpus.captions, "images": corpus.images, "seconds": corpus.seconds,
            "splits": corpus.splits, "image_splits": corpus.image_splits}


def stage_write_raw(p: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    _synthetic().write_synthetic_raw_corpus(Path(p["root"]), p["items"], captions_per_image=p["captions_per_image"])
    return {"items": p["items"], "seconds": round(time.perf_counter() - start, 2)}


def stage_ingest(p: dict[str, Any]) -> dict[str, Any]:
    from crossalign.config import CorpusConfig
    from crossalign.corpus import ingest_corpus
    from crossalign.workspace import Workspace

    start = time.perf_counter()
    summary = ingest_corpus(CorpusConfig(root=p["root"], name=CORPUS, format="parquet"), Workspace(p["workspace"]))
    return {"items": summary.captions, "images": summary.images, "rejected": summary.rejected,
            "seconds": round(time.perf_counter() - start, 2)}


class _Counting:
    """Counts the extraction library calls the flow's shard tasks make (one per task run), per modality, and
    times each `ShardWriter._commit` (in commit order, per features directory)."""

    def __init__(self) -> None:
        import flows.tasks as flow_tasks
        from crossalign.extract import shards

        self.calls = {"image": 0, "text": 0}
        self.commits: list[tuple[str, float]] = []
        self.lock = threading.Lock()
        for modality in self.calls:
            name = f"extract_{modality}_features"
            setattr(flow_tasks, name, self._counted(modality, getattr(flow_tasks, name)))
        original = shards.ShardWriter._commit

        def timed_commit(writer: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(writer, *args, **kwargs)
            finally:
                with self.lock:
                    self.commits.append((Path(writer.directory).name, time.perf_counter() - start))

        shards.ShardWriter._commit = timed_commit

    def _counted(self, modality: str, call: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.calls[modality] += 1
            return call(*args, **kwargs)

        return counted


def commit_ratio(times: list[float]) -> dict[str, Any]:
    """Median commit time of shards 6-15 and of the last 10, and their ratio (None with under 30 shards)."""
    if len(times) < MIN_SHARDS:
        return {"shards": len(times), "early_ms": None, "late_ms": None, "ratio": None}
    early, late = statistics.median(times[EARLY]), statistics.median(times[-LATE_SHARDS:])
    return {"shards": len(times), "early_ms": round(1000 * early, 2), "late_ms": round(1000 * late, 2),
            "ratio": round(late / early, 3) if early > 0 else None}


def stage_extract(p: dict[str, Any]) -> dict[str, Any]:
    from prefect import flow

    from crossalign.config import CorpusConfig, ExtractConfig, PipelineConfig, RunnerConfig
    from crossalign.workspace import Workspace
    from flows.extract import extract_flow

    @flow(name="scale-warm-up")
    def warm_up() -> None:
        """Nothing: starts the ephemeral Prefect API server before the timed flow."""

    start = time.perf_counter()
    warm_up()
    warm_up_s = time.perf_counter() - start

    image_encoder, text_encoder = _synthetic().register_synthetic_encoders()
    workspace = Workspace(p["workspace"])
    counting = _Counting()
    config = PipelineConfig(
        workspace=workspace.root, corpus=CorpusConfig(root=workspace.corpus_dir(CORPUS), name=CORPUS),
        extract=ExtractConfig(image_encoder=image_encoder, text_encoder=text_encoder, device="cpu", compile="off",
                              shard_size=p["shard_size"], image_batch_size=p["image_batch_size"]),
        runner=RunnerConfig(kind="threads", max_workers=p["max_workers"]),
    )
    start = time.perf_counter()
    summaries = extract_flow(config)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"seconds": round(seconds, 2), "items": sum(s["encoded"] for s in summaries),
                           "warm_up_s": round(warm_up_s, 1), "modalities": {}}
    for summary in summaries:
        modality = summary["modality"]
        directory = workspace.features_dir(CORPUS, summary["encoder"]).name
        harness = [t for name, t in counting.commits if name == directory]
        product = summary.get("commit_s") or []
        source = ("ShardWriter.commit_seconds" if product
                  else "harness timing of ShardWriter._commit (lock wait included)")
        out["modalities"][modality] = {
            "encoded": summary["encoded"], "already_done": summary["already_done"], "failed": summary["failed"],
            "items_per_s": summary["items_per_s"],
            # no call counted while items were encoded: the shard tasks no longer call what is wrapped
            "tasks": counting.calls[modality] or (None if summary["encoded"] else 0),
            "commits": commit_ratio(product or harness), "commit_source": source,
            "harness_commits": commit_ratio(harness),
        }
    return out


def stage_train(p: dict[str, Any]) -> dict[str, Any]:
    from crossalign.align import fit_mapper
    from crossalign.config import QueryBankConfig, TrainConfig
    from crossalign.workspace import Workspace

    image_encoder, text_encoder = _synthetic().register_synthetic_encoders()
    config = TrainConfig(dim=p["dim"], steps=p["steps"], eval_every=p["eval_every"],
                         warmup_steps=min(100, p["steps"] // 5))
    start = time.perf_counter()
    summary = fit_mapper(Workspace(p["workspace"]), CORPUS, image_encoder, text_encoder, config,
                         QueryBankConfig(size=p["bank"]))
    metrics = summary.metrics
    keys = ("t2i_r1", "i2t_r1", "t2i_r10", "rsum", "rsum_raw", "images", "captions")
    return {"seconds": round(time.perf_counter() - start, 2), "items": p["train_items"], "best_step": summary.best_step,
            "metrics": {k: metrics[k] for k in keys if k in metrics}}


def stage_embed(p: dict[str, Any]) -> dict[str, Any]:
    from crossalign.store import embed_corpus
    from crossalign.workspace import Workspace

    _synthetic().register_synthetic_encoders()
    start = time.perf_counter()
    summary = embed_corpus(Workspace(p["workspace"]), CORPUS, metric="cosine")
    return {"seconds": round(time.perf_counter() - start, 2), "items": summary.images + summary.captions,
            "images": summary.images, "captions": summary.captions, "index": summary.index,
            "normaliser_seconds": summary.normaliser_seconds}


STAGES = {"write": stage_write, "write-raw": stage_write_raw, "ingest": stage_ingest, "extract": stage_extract,
          "train": stage_train, "embed": stage_embed}


def run_child_stage(name: str, params: dict[str, Any], result: Path) -> None:
    """In the child: run stage `name`, then write its result with this process's peak RSS to `result`."""
    out = STAGES[name](params)
    out["peak_rss_mb"] = peak_rss_mb()
    result.write_text(json.dumps(out))


# --- the driver ---------------------------------------------------------------------------------------------


def child_env(base: Path) -> dict[str, str]:
    """This environment, offline for Prefect, with its own Prefect home (an ephemeral API server per flow run)."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_HOME": str(base / "prefect-home"),
           "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore", "TQDM_DISABLE": "1"}
    env.pop("PREFECT_API_URL", None)  # never someone's server: the ephemeral one
    return env


def run_stage(base: Path, tag: str, name: str, params: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run stage `name` in a fresh process; its result, or {"error": ...} with the tail of its log."""
    (base / "logs").mkdir(parents=True, exist_ok=True)
    log, result = base / "logs" / f"{tag}-{name}.log", base / "logs" / f"{tag}-{name}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--stage-params", json.dumps(params),
               "--stage-result", str(result)]
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(base),
                                  timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - start
    if code != 0 or not result.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        return {"error": f"exit {code} after {wall:.0f} s; log {log}:\n{tail}", "wall_s": round(wall, 1)}
    return json.loads(result.read_text()) | {"wall_s": round(wall, 1)}


def describe(name: str, r: dict[str, Any]) -> str:
    """One line for a stage's result."""
    if "error" in r:
        return f"{name}: FAILED {r['error']}"
    rate = r["items"] / r["seconds"] if r.get("seconds") else 0.0
    line = (f"{name}: {r['items']:,} items in {r['seconds']:.1f} s ({rate:,.0f} items/s; process {r['wall_s']:.0f} s), "
            f"peak RSS {r['peak_rss_mb']:,.0f} MB")
    if name == "extract":
        line += f" (Prefect server start before it: {r['warm_up_s']} s)"
        for modality, m in r["modalities"].items():
            c = m["commits"]
            commits = (f"commit early {c['early_ms']} ms, late {c['late_ms']} ms (x{c['ratio']})" if c["ratio"]
                       else "too few shards for early/late")
            h = m["harness_commits"]
            if h["ratio"] and m["commits"] != h:
                commits += f"; harness timing, lock wait included: {h['early_ms']} / {h['late_ms']} ms (x{h['ratio']})"
            line += (f"\n    {modality}: {m['encoded']:,} encoded ({m['items_per_s']:,.0f}/s), {m['failed']} failed, "
                     f"{m['tasks'] if m['tasks'] is not None else '? (uncounted)'} Prefect tasks, {c['shards']} "
                     f"shards; {commits} [{m['commit_source']}]")
    elif name == "train":
        m = r["metrics"]
        images = m.get("images") or 0
        chance = f", chance R@1 {100 / images:.3f}" if images else ""
        line += (f"\n    dev: t2i R@1 {m.get('t2i_r1')}, i2t R@1 {m.get('i2t_r1')}, rsum {m.get('rsum')} "
                 f"(raw {m.get('rsum_raw')}) over {int(images):,} images{chance}; best step {r['best_step']}")
    elif name == "embed":
        line += f"\n    rows: {r['images']:,} images, {r['captions']:,} captions; index {r['index']}"
    elif name in ("write", "ingest") and "images" in r:
        line += f"; {r['images']:,} images" + (f", splits {r['splits']}" if "splits" in r else "")
    return line


def _fmt(value: float | None) -> str:
    if value is None:
        return "nan"
    return f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def last_line(sizes: list[int], results: dict[tuple[int, str], dict[str, Any]]) -> str:
    """The machine-readable summary (see the module's docstring)."""
    ok = {key: r for key, r in results.items() if "error" not in r}
    peaks = [r["peak_rss_mb"] for (_, stage), r in ok.items() if stage in PRODUCT_STAGES]
    large, small = sizes[-1], sizes[0]
    at_large = {stage: r for (size, stage), r in ok.items() if size == large and stage in SIZE_STAGES[1:]}
    growth = None
    if at_large and len(sizes) > 1:
        stage = max(at_large, key=lambda s: at_large[s]["peak_rss_mb"])
        if (small, stage) in ok:
            growth = at_large[stage]["peak_rss_mb"] / ok[small, stage]["peak_rss_mb"]
    extract = at_large.get("extract", {}).get("modalities", {})
    ratios = [m["commits"]["ratio"] for m in extract.values() if m["commits"]["ratio"] is not None]
    counted = [m["tasks"] for m in extract.values()]
    tasks = None if None in counted or not counted else max(counted)
    train = at_large.get("train", {}).get("peak_rss_mb")
    return (f"items={large} peak_rss_mb_max={_fmt(max(peaks) if peaks else None)} "
            f"rss_growth_1m_to_10m={_fmt(growth)} commit_late_over_early={_fmt(max(ratios) if ratios else None)} "
            f"tasks={_fmt(tasks)} train_rss_mb={_fmt(train)}")


def run_size(base: Path, size: int, args: argparse.Namespace, results: dict) -> None:
    """Write, extract, train and embed a synthetic corpus of `size` items in a fresh workspace."""
    workspace = base / f"n{size}"
    shutil.rmtree(workspace, ignore_errors=True)
    params = {"workspace": str(workspace), "items": size, "captions_per_image": args.captions_per_image,
              "shard_size": args.shard_size, "image_batch_size": args.image_batch_size,
              "max_workers": args.max_workers, "dim": args.dim, "steps": args.steps,
              "eval_every": args.eval_every, "bank": args.bank}
    for stage in SIZE_STAGES:
        r = results[size, stage] = run_stage(base, f"n{size}", stage, params, args.stage_timeout)
        print(f"n={size:,} {describe(stage, r)}", flush=True)
        if "error" in r:
            break
        if stage == "write":
            params["train_items"] = r["splits"].get("train", 0)
    if not args.keep:
        shutil.rmtree(workspace, ignore_errors=True)


def run_ingest(base: Path, size: int, args: argparse.Namespace, results: dict) -> None:
    """Ingest a raw synthetic corpus of `size` items (distinct tiny PNGs embedded in Parquet)."""
    root, workspace = base / f"raw{size}", base / f"ingest{size}"
    params = {"root": str(root), "workspace": str(workspace), "items": size,
              "captions_per_image": args.captions_per_image}
    r = run_stage(base, f"n{size}", "write-raw", params, args.stage_timeout)
    print(f"n={size:,} {describe('write-raw', r)}", flush=True)
    if "error" not in r:
        r = results[size, "ingest"] = run_stage(base, f"n{size}", "ingest", params, args.stage_timeout)
        print(f"n={size:,} {describe('ingest', r)}", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(workspace, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="items (captions) per run, comma-separated")
    parser.add_argument("--ingest-size", type=int, default=1_000_000, help="items of the ingest run (0: none)")
    parser.add_argument("--quick", action="store_true",
                        help="development: sizes 10000,100000, ingest 100000, shards of 1,024 rows")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=None, help="rows per feature shard (default: the product's)")
    parser.add_argument("--image-batch-size", type=int, default=256, help="images per batch of the synthetic encoder")
    parser.add_argument("--max-workers", type=int, default=2, help="shard tasks at once (Prefect thread runner)")
    parser.add_argument("--dim", type=int, default=64, help="joint dimension of the mapper")
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--bank", type=int, default=2000, help="query-bank size per modality")
    parser.add_argument("--stage-timeout", type=float, default=3600, help="seconds before a stage is killed")
    parser.add_argument("--workspace", type=Path, default=None, help="where the runs go (default: a new dir in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces and raw corpora")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--stage-params", help=argparse.SUPPRESS)
    parser.add_argument("--stage-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.ingest_size = "10000,100000", 100_000
        args.shard_size = args.shard_size or 1024
    if args.shard_size is None:
        from crossalign.config import ExtractConfig

        args.shard_size = ExtractConfig().shard_size
    return args


def main() -> None:
    args = parse_args()
    if args.stage:
        run_child_stage(args.stage, json.loads(args.stage_params), args.stage_result)
        return
    sizes = sorted(int(n) for n in args.sizes.split(","))
    if args.workspace:
        args.workspace.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="crossalign-scale-", dir=args.workspace))
    print(f"scale: sizes {sizes}, ingest {args.ingest_size or 'none'}, {args.captions_per_image} captions per image, "
          f"shards of {args.shard_size}, images in batches of {args.image_batch_size}, {args.max_workers} shard tasks "
          f"at once; mapper dim {args.dim}, {args.steps} steps, query bank {args.bank}; under {base}", flush=True)
    results: dict[tuple[int, str], dict[str, Any]] = {}
    start = time.perf_counter()
    try:
        if args.ingest_size:
            run_ingest(base, args.ingest_size, args, results)
        for size in sizes:
            run_size(base, size, args, results)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nall stages in {time.perf_counter() - start:.0f} s; peak RSS per stage (MB), items/s:")
    order = {stage: n for n, stage in enumerate(("ingest", *SIZE_STAGES))}
    for (size, stage), r in sorted(results.items(), key=lambda item: (item[0][0], order[item[0][1]])):
        if "error" not in r:
            rate = r["items"] / r["seconds"] if r.get("seconds") else 0.0
            print(f"  {size:>10,} {stage:<8} {r['peak_rss_mb']:>8,.0f} MB {rate:>12,.0f} items/s")
        else:
            print(f"  {size:>10,} {stage:<8} FAILED")
    if len(sizes) > 1:
        print(f"(rss_growth_1m_to_10m and the maxima compare {sizes[0]:,} with {sizes[-1]:,} items)")
    print(last_line(sizes, results))


if __name__ == "__main__":
    main()
