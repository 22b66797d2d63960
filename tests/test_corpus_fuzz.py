"""Generated hostile corpora: ingest never raises, its ledger balances, and nothing outside the root is read.

A seeded generator builds corpora in six formats from real JPEG/PNG/WebP files with random byte-level
corruptions, garbage lines and rows, hostile path strings (`..`, absolute, NUL bytes, very long,
non-UTF-8 bytes) and symlinks pointing inside and outside the root (loops and dangling ones too).
Outside the root lies a sentinel: a real image and a text token. Every file the process opens while
ingesting is recorded with an audit hook, and the sentinel's bytes and token must appear in no table
and no blob.

Normal suite: 3,000 generated records (a few seconds). Long mode: CROSSALIGN_FUZZ_RECORDS=10000 (or more).
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile
import time
import traceback
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from conftest import draw_picture

from crossalign.config import CorpusConfig
from crossalign.corpus import ingest_corpus
from crossalign.corpus.folder import CorpusConfigError
from crossalign.workspace import Workspace

RECORDS = int(os.environ.get("CROSSALIGN_FUZZ_RECORDS", "3000"))
SEED = int(os.environ.get("CROSSALIGN_FUZZ_SEED", "16"))
PER_ROUND = 120
FORMATS = ("jsonl", "csv", "tsv", "coco", "flickr", "webdataset")
TOKEN = "SENTINEL-7f3c9e-never-inside"

_opened: list[str] = []
_watch = {"outside": None}


def _audit(event: str, args: tuple) -> None:
    """Record every file opened (by path) under the watched outside folder."""
    if event != "open" or _watch["outside"] is None or isinstance(args[0], int):
        return
    path = os.fsdecode(args[0])
    if os.path.realpath(os.path.abspath(path)).startswith(_watch["outside"]):
        _opened.append(path)


sys.addaudithook(_audit)


def image_bytes(index: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    draw_picture(index)[0].save(buffer, format=fmt)
    return buffer.getvalue()


def corrupt(data: bytes, rng: random.Random) -> bytes:
    """One random byte-level corruption: flips, truncation, insertion, deletion, zeroed range, junk tail."""
    data = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        data = data[: rng.randrange(len(data))]
    elif kind == 2:
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 200))
    elif kind == 3:
        at = rng.randrange(len(data))
        del data[at: at + rng.randint(1, 200)]
    elif kind == 4:
        at = rng.randrange(len(data))
        data[at: at + rng.randint(1, 500)] = bytes(min(500, len(data) - at))
    elif kind == 5:
        data += rng.randbytes(rng.randint(1, 500))
    else:
        data[16: 16 + rng.randint(1, 64)] = rng.randbytes(rng.randint(1, 64))  # inside the header
    return bytes(data)


def make_outside(base: Path) -> tuple[Path, bytes]:
    outside = base / "outside"
    outside.mkdir()
    sentinel = image_bytes(99, "PNG")
    (outside / "sentinel.png").write_bytes(sentinel)
    (outside / "sentinel.txt").write_text(TOKEN)
    (outside / "captions.jsonl").write_text(json.dumps({"image": "sentinel.png", "captions": [TOKEN]}) + "\n")
    return outside, sentinel


def make_files(root: Path, outside: Path, rng: random.Random) -> list[str]:
    """Real, corrupted and special files and symlinks under `root/images`; returns their relative paths."""
    images = root / "images"
    images.mkdir(parents=True)
    paths = []
    for index in range(6):
        fmt, suffix = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][index % 3]
        data = image_bytes(rng.randrange(40), fmt)
        (images / f"ok{index}.{suffix}").write_bytes(data)
        paths.append(f"images/ok{index}.{suffix}")
        for copy in range(3):
            (images / f"bad{index}_{copy}.{suffix}").write_bytes(corrupt(data, rng))
            paths.append(f"images/bad{index}_{copy}.{suffix}")
    links = {"in.jpg": "ok0.jpg", "out.png": str(outside / "sentinel.png"), "up.png": "../../outside/sentinel.png",
             "loop_a.jpg": "loop_b.jpg", "loop_b.jpg": "loop_a.jpg", "self.jpg": "self.jpg",
             "dangling.jpg": "nowhere.jpg", "passwd.jpg": "/etc/passwd", "outdir": str(outside)}
    for name, target in links.items():
        (images / name).symlink_to(target)
        paths.append(f"images/{name}")
    paths += ["images/outdir/sentinel.png", "images/outdir/sentinel.txt"]
    (images / "dir.jpg").mkdir()
    os.mkfifo(images / "fifo.jpg")
    (images / "empty.png").write_bytes(b"")
    return paths + ["images/dir.jpg", "images/fifo.jpg", "images/empty.png"]


def hostile_path(rng: random.Random, outside: Path) -> str:
    return rng.choice([
        "..", "../outside/sentinel.png", "images/../../outside/sentinel.png", str(outside / "sentinel.png"),
        "/etc/passwd", "/dev/zero", "images/\x00ok0.jpg", "a" * rng.randint(256, 5000), "images/" + "b" * 300,
        "images/caf\udce9.jpg", "", ".", "images/", "~/x.jpg", "images/./ok1.png", "images/ok0.jpg/x",
        "images/../images/ok2.webp", "\\\\server\\share\\x.jpg", "file:///etc/passwd", "images/ok0.jpg\n",
    ])


def caption(rng: random.Random) -> object:
    return rng.choice([
        "a dog runs on the grass", "  spaced\tout\r\ncaption ", "bell\x07 and nul\x00 inside", "", "   ",
        "x" * rng.randint(1000, 3000), "caf\udce9 latin-1", "emoji 🐕 and accents é", 42, None, ["nested"],
        "\u202eright-to-left\u202c", "line\u2028separator", "\ufeffBOM inside", TOKEN[:6],
    ])


def garbage_line(rng: random.Random) -> bytes:
    return rng.choice([
        lambda: rng.randbytes(rng.randint(1, 200)).replace(b"\n", b" "),
        lambda: b'{"image": "images/ok0.jpg", "captions": ["unterminated',
        lambda: b"[" * rng.randint(100, 5000),
        lambda: b'{"image": 7, "captions": {}}',
        lambda: b'"just a string"',
        lambda: b'\xef\xbb\xbf{"image": "images/ok1.png"}',
        lambda: b'{"image": "images/ok0.jpg", "captions": "one", "split": {"a": [1]}}',
        lambda: b'{"image": "images/ok0.jpg", "captions": ["\\ud800 lone surrogate"], "split": "\\u0000"}',
        lambda: b'a,"b,c\r',
        lambda: b'"quoted"trailing,x,y,z,w',
    ])()


def pick_path(rng: random.Random, paths: list[str], outside: Path) -> str:
    return hostile_path(rng, outside) if rng.random() < 0.3 else rng.choice(paths)


def write_jsonl(root: Path, rng: random.Random, paths: list[str], outside: Path, n: int) -> None:
    lines = []
    for _ in range(n):
        if rng.random() < 0.2:
            lines.append(garbage_line(rng))
            continue
        record = {"image": pick_path(rng, paths, outside),
                  "captions": [caption(rng) for _ in range(rng.randint(0, 4))],
                  "split": rng.choice(["train", "dev", "test", None, "", "x\x00y", "\udce9"])}
        lines.append(json.dumps(record).encode("utf-8", errors="surrogateescape"))
    newline = rng.choice([b"\n", b"\r\n"])
    (root / "captions.jsonl").write_bytes(rng.choice([b"", b"\xef\xbb\xbf"]) + newline.join(lines) + newline)
    if rng.random() < 0.2:  # the captions file itself a link out: refused as a config error, never read
        (root / "captions.jsonl").unlink()
        (root / "captions.jsonl").symlink_to(outside / "captions.jsonl")


def write_table(root: Path, rng: random.Random, paths: list[str], outside: Path, n: int, sep: str) -> None:
    rows = [f"image{sep}caption{sep}split".encode()]
    for _ in range(n):
        if rng.random() < 0.2:
            rows.append(garbage_line(rng))
            continue
        text = caption(rng)
        text = text if isinstance(text, str) else ""
        fields = [pick_path(rng, paths, outside), text, rng.choice(["train", "dev", ""])]
        quoted = [f'"{f.replace(chr(34), chr(34) * 2)}"' if rng.random() < 0.5 else f for f in fields]
        rows.append(sep.join(quoted).encode("utf-8", errors="surrogateescape"))
    suffix = "tsv" if sep == "\t" else "csv"
    (root / f"captions.{suffix}").write_bytes(rng.choice([b"", b"\xef\xbb\xbf"]) + b"\r\n".join(rows) + b"\r\n")


def write_coco(root: Path, rng: random.Random, paths: list[str], outside: Path, n: int) -> None:
    images, annotations = [], []
    for number in range(n // 2):
        entry = {"id": rng.choice([number, number, number, str(number), None, [1]]),
                 "file_name": pick_path(rng, paths, outside).removeprefix("images/")}
        images.append(entry if rng.random() > 0.05 else "not an object")
    for number in range(n - n // 2):
        annotations.append({"id": rng.choice([number, number, 0]), "caption": caption(rng),
                            "image_id": rng.choice([rng.randrange(n // 2 + 1), 10**9, None, "x"])})
    text = json.dumps({"images": images, "annotations": annotations})
    data = text.encode("utf-8", errors="surrogateescape") if rng.random() > 0.05 else rng.randbytes(300)
    (root / "captions_train2017.json").write_bytes(rng.choice([b"", b"\xef\xbb\xbf"]) + data)
    (root / "train2017").symlink_to("images")


def write_flickr(root: Path, rng: random.Random, paths: list[str], outside: Path, n: int) -> None:
    lines, names = [], []
    for number in range(n):
        if rng.random() < 0.15:
            lines.append(garbage_line(rng))
            continue
        name = pick_path(rng, paths, outside).removeprefix("images/").replace("\t", " ").replace("\n", " ")
        names.append(name)
        text = caption(rng)
        lines.append(f"{name}#{number % 5}\t{text if isinstance(text, str) else ''}".replace("\n", " ")
                     .encode("utf-8", errors="surrogateescape"))
    (root / "Flickr8k.token.txt").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    for split in ("train", "dev", "test"):
        listed = [name for name in names if rng.random() < 0.3 and "\n" not in name]
        (root / f"Flickr_8k.{split}Images.txt").write_bytes(
            "\n".join(listed).encode("utf-8", errors="surrogateescape"))


def write_webdataset(root: Path, rng: random.Random, paths: list[str], outside: Path, n: int) -> None:
    inside = os.path.realpath(root)  # the shards hold corpus files only (the reader never sees the outside)
    files = [p for p in paths if (root / p).is_file() and os.path.realpath(root / p).startswith(inside)]
    for shard in range(max(1, n // 40)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key in range(40):
                name = rng.choice([f"{shard:03d}{key:05d}", "../escape", "/abs/x", f"k\udce9{key}"])
                data = (root / rng.choice(files)).read_bytes()
                for suffix, payload in ((".jpg", data), (".txt", f"{caption(rng)}\n{caption(rng)}".encode(
                        "utf-8", errors="surrogateescape")), (".json", garbage_line(rng))):
                    info = tarfile.TarInfo(name + suffix)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                if rng.random() < 0.05:
                    link = tarfile.TarInfo(f"link{key}.jpg")
                    link.type, link.linkname = tarfile.SYMTYPE, str(outside / "sentinel.png")
                    tar.addfile(link)
        data = buffer.getvalue()
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        (root / f"{shard:05d}.tar").write_bytes(data)


WRITERS = {"jsonl": write_jsonl, "coco": write_coco, "flickr": write_flickr, "webdataset": write_webdataset,
           "csv": lambda *a: write_table(*a, sep=","), "tsv": lambda *a: write_table(*a, sep="\t")}


def check_round(workspace: Workspace, corpus: str, summary, sentinel: bytes) -> list[str]:
    """What is wrong with one ingest's output (an empty list when nothing is)."""
    problems = []
    for kind, row in summary.accounting.items():
        if row["in"] != row["accepted"] + row["merged"] + row["rejected"]:
            problems.append(f"ledger {kind}: {row}")
    images = pq.read_table(workspace.images_table(corpus)).to_pylist()
    captions = pq.read_table(workspace.captions_table(corpus)).to_pylist()
    rejects = pq.read_table(workspace.rejects_table(corpus)).to_pylist()
    if (len(images), len(captions), len(rejects)) != (summary.images, summary.captions, summary.rejected):
        problems.append("table rows differ from the summary")
    if summary.accounting.get("image", {}).get("accepted", 0) != len(images):
        problems.append("image rows differ from the ledger")
    sentinel_sha = __import__("hashlib").sha256(sentinel).hexdigest()
    if any(row["sha256"] == sentinel_sha for row in images):
        problems.append("the outside sentinel image is in the images table")
    cells = [str(v) for row in captions + rejects for v in row.values()]
    if any(TOKEN in cell for cell in cells):
        problems.append("the outside sentinel token is in a table")
    if any("object at 0x" in row["message"] for row in rejects):
        problems.append("a reject message shows a Python repr")
    blobs = workspace.corpus_dir(corpus) / "blobs"
    if blobs.is_dir() and any(p.read_bytes() == sentinel for p in blobs.iterdir()):
        problems.append("the outside sentinel is a blob")
    return problems


def run_generated(base: Path, total: int, seed: int) -> dict:
    outside, sentinel = make_outside(base)
    _watch["outside"] = os.path.realpath(outside)
    stats = {"rounds": 0, "records": 0, "crashes": 0, "violations": 0, "outside_reads": 0, "seconds": 0.0,
             "refused_corpora": 0}
    reasons: Counter[str] = Counter()
    ledger: Counter[str] = Counter()
    failures: list[str] = []
    start = time.perf_counter()
    round_number = 0
    while stats["records"] < total:
        rng = random.Random(seed * 1_000_003 + round_number)
        fmt = FORMATS[round_number % len(FORMATS)]
        root = base / f"round{round_number:05d}"
        paths = make_files(root, outside, rng)
        n = min(PER_ROUND, total - stats["records"])
        WRITERS[fmt](root, rng, paths, outside, n)
        workspace = Workspace(base / "ws")
        _opened.clear()
        try:
            summary = ingest_corpus(CorpusConfig(root=root, name=f"r{round_number}", format=fmt), workspace)
            problems = check_round(workspace, f"r{round_number}", summary, sentinel)
            reasons.update(summary.rejects_by_reason)
            ledger.update({f"{kind}_{key}": n for kind, row in summary.accounting.items() for key, n in row.items()})
        except CorpusConfigError as err:  # expected only where the generator linked a corpus file out
            problems = [] if "outside the corpus root" in str(err) else [f"config error: {err}"]
            stats["refused_corpora"] += not problems
        except Exception:
            stats["crashes"] += 1
            failures.append(f"round {round_number} ({fmt}): {traceback.format_exc(limit=-3)}")
            problems = []
        if problems:
            stats["violations"] += len(problems)
            failures.append(f"round {round_number} ({fmt}): {problems}")
        if _opened:
            stats["outside_reads"] += len(_opened)
            failures.append(f"round {round_number} ({fmt}) opened outside the root: {_opened[:3]}")
        stats["records"] += n
        stats["rounds"] += 1
        round_number += 1
        _remove_tree(root)
    _watch["outside"] = None
    stats["seconds"] = round(time.perf_counter() - start, 1)
    stats["failures"] = failures[:5]
    return {**stats, "ledger": dict(ledger), "rejects_by_reason": dict(reasons.most_common())}


def _remove_tree(root: Path) -> None:
    import shutil

    shutil.rmtree(root)  # FIFOs and symlinks are removed, never followed


def test_the_audit_hook_sees_a_read_outside(tmp_path):
    """The control for the outside-read check: opening the sentinel is recorded."""
    outside, _ = make_outside(tmp_path)
    _watch["outside"], _opened[:] = os.path.realpath(outside), []
    try:
        (tmp_path / "link.png").symlink_to(outside / "sentinel.png")
        (tmp_path / "link.png").read_bytes()
        assert _opened == [str(tmp_path / "link.png")]
    finally:
        _watch["outside"] = None


def test_generated_hostile_corpora_never_crash_balance_and_stay_inside_the_root(tmp_path):
    stats = run_generated(tmp_path, RECORDS, SEED)

    print(f"\ngenerated-input ingest: {stats}")  # the long mode's figures, with -s
    assert stats["records"] >= RECORDS
    assert (stats["crashes"], stats["violations"], stats["outside_reads"]) == (0, 0, 0), stats["failures"]
    # The generator reaches the cases it is for: each of these reasons occurs (3,000 records suffice).
    expected = {"unreadable_path", "path_outside_root", "missing_file", "not_an_image", "undecodable", "bad_record",
                "caption_not_utf8", "caption_not_text", "empty_caption", "unsafe_tar_member", "unknown_image_id"}
    assert expected <= set(stats["rejects_by_reason"]), stats["rejects_by_reason"]
    assert stats["ledger"]["image_accepted"] > 0 and stats["ledger"]["caption_accepted"] > 0
