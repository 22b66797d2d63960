"""Hostile corpora: every bad path, file, line or row is one reject with a reason, and the rest goes in.

Each case is built from real files (real images via PIL, real symlinks, FIFOs and directories) and
ingested through the library (the CLI where the user-facing path matters).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import draw_picture, write_picture, write_records, write_tiny_corpus

from crossalign.config import CorpusConfig
from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.corpus.accounting import IngestAccountingError, Ledger
from crossalign.corpus.formats import detect_format
from crossalign.workspace import Workspace

CORPUS = "tiny"
TINY_IMAGES, TINY_CAPTIONS = 12, 28


def rejects(workspace: Workspace, corpus: str = CORPUS) -> list[dict]:
    return pq.read_table(workspace.rejects_table(corpus)).to_pylist()


def assert_balanced(summary) -> None:
    """The ledger the summary prints: every kind's records in = accepted + merged + rejected."""
    assert summary.accounting, "no accounting in the summary"
    for kind, row in summary.accounting.items():
        assert row["in"] == row["accepted"] + row["merged"] + row["rejected"], (kind, row)
    assert summary.accounting["image"]["accepted"] == summary.images
    assert summary.accounting["caption"]["accepted"] == summary.captions


def append_image_record(root: Path, image: str, caption: str = "a broken picture") -> None:
    write_records(root, [{"image": image, "captions": [caption], "split": "train"}], mode="a")


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring `width` x `height` (8-bit RGB), and nothing else."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


# --- paths -----------------------------------------------------------------------------------------------


def _symlink_loop(root: Path) -> list[str]:
    (root / "images/a.jpg").symlink_to("b.jpg")
    (root / "images/b.jpg").symlink_to("a.jpg")
    return ["images/a.jpg", "images/b.jpg"]


def _self_link(root: Path) -> list[str]:
    (root / "images/self.jpg").symlink_to("self.jpg")
    return ["images/self.jpg"]


def _directory(root: Path) -> list[str]:
    (root / "images/folder.jpg").mkdir()
    return ["images/folder.jpg"]


def _fifo(root: Path) -> list[str]:
    os.mkfifo(root / "images/pipe.jpg")
    return ["images/pipe.jpg"]


def _name_too_long(root: Path) -> list[str]:
    return ["images/" + "x" * 300 + ".jpg"]


def _nul_byte(root: Path) -> list[str]:
    return ["images/pic\x00000.jpg"]


def _path_through_a_file(root: Path) -> list[str]:
    return ["images/pic000.jpg/inside.jpg"]


@pytest.mark.parametrize(("make", "cause"), [
    (_symlink_loop, "symlink loop"),
    (_self_link, "symlink loop"),
    (_directory, "a directory"),
    (_fifo, "a FIFO"),
    (_name_too_long, "file name too long"),
    (_nul_byte, "NUL byte"),
    (_path_through_a_file, "not a directory"),
])
def test_unreadable_path_is_a_reject_naming_file_and_cause(tiny_corpus, workspace, make, cause):
    sources = make(tiny_corpus)
    for source in sources:
        append_image_record(tiny_corpus, source)

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    rows = rejects(workspace)
    assert [(r["kind"], r["reason"]) for r in rows] == [("image", "unreadable_path")] * len(sources)
    for row, source in zip(rows, sources):
        assert cause in row["message"], row["message"]
        assert source.split("/")[-1][:20].replace("\x00", "\\x00") in row["message"] or "\x00" in source
        assert "(its 1 caption not ingested)" in row["message"]
    assert (summary.images, summary.captions) == (TINY_IMAGES, TINY_CAPTIONS)
    assert summary.accounting["caption"]["rejected"] == len(sources)
    assert_balanced(summary)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: permission denied cannot be produced")
def test_permission_denied_is_an_unreadable_path(tiny_corpus, workspace):
    (tiny_corpus / "images/secret.jpg").write_bytes((tiny_corpus / "images/pic000.jpg").read_bytes()[:100])
    (tiny_corpus / "images/secret.jpg").chmod(0)
    append_image_record(tiny_corpus, "images/secret.jpg")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert [(r["reason"], "permission denied" in r["message"]) for r in rejects(workspace)] == [
        ("unreadable_path", True)]
    assert summary.images == TINY_IMAGES


def test_symlink_inside_the_root_is_followed(tiny_corpus, workspace):
    (tiny_corpus / "images/alias.jpg").symlink_to("pic000.jpg")
    append_image_record(tiny_corpus, "images/alias.jpg", "the red circle again")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert summary.rejected == 0 and summary.images == TINY_IMAGES
    assert summary.normalised_by_reason == {"duplicate_image_merged": 1}
    assert "the red circle again" in read_captions(workspace, CORPUS).column("text").to_pylist()
    assert_balanced(summary)


# --- text encodings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_jsonl_with_a_byte_order_mark_keeps_its_first_record(tiny_corpus, workspace, newline):
    lines = (tiny_corpus / "captions.jsonl").read_text().splitlines()
    (tiny_corpus / "captions.jsonl").write_bytes(b"\xef\xbb\xbf" + newline.join(lines).encode() + newline.encode())

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert (summary.images, summary.captions, summary.rejected) == (TINY_IMAGES, TINY_CAPTIONS, 0)
    assert_balanced(summary)


@pytest.mark.parametrize(("fmt", "sep", "newline"), [("csv", ",", "\r\n"), ("tsv", "\t", "\n"), ("csv", ",", "\n")])
def test_table_with_a_byte_order_mark_reads_its_header(tmp_path, fmt, sep, newline):
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=2, n_dev=1)
    rows = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]
    (corpus / "captions.jsonl").unlink()
    text = newline.join([sep.join(["image", "caption", "split"])]
                        + [sep.join([r["image"], c, r["split"]]) for r in rows for c in r["captions"]]) + newline
    (corpus / f"captions.{fmt}").write_bytes(b"\xef\xbb\xbf" + text.encode())
    workspace = Workspace(tmp_path / "ws")

    # format auto: captions.csv / captions.tsv found
    summary = ingest_corpus(CorpusConfig(root=corpus, name="t"), workspace)

    assert (summary.images, summary.captions, summary.rejected) == (3, sum(len(r["captions"]) for r in rows), 0)
    assert summary.splits == {"train": 2, "dev": 1}
    assert_balanced(summary)


# --- images ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rest", [b"", b"\x00\x00\x00\x00IEND\xaeB`\x82"], ids=["header-only", "with-iend"])
def test_header_declaring_sixty_thousand_squared_pixels_is_too_many_pixels(tiny_corpus, workspace, rest):
    (tiny_corpus / "images/bomb.png").write_bytes(png_header(60_000, 60_000) + rest)
    append_image_record(tiny_corpus, "images/bomb.png")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    [row] = rejects(workspace)
    assert (row["source"], row["reason"]) == ("images/bomb.png", "too_many_pixels")
    assert "3,600,000,000 pixels" in row["message"] and "max_pixels=40,000,000" in row["message"]
    assert summary.images == TINY_IMAGES


def test_real_twelve_thousand_squared_png_is_too_many_pixels_with_the_configured_limit(tiny_corpus, workspace):
    from PIL import Image

    Image.new("L", (12_000, 12_000)).save(tiny_corpus / "images/huge.png")
    append_image_record(tiny_corpus, "images/huge.png")
    limit = CorpusConfig(root=tiny_corpus, max_pixels=50_000_000).max_pixels

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS, max_pixels=limit), workspace)

    [row] = rejects(workspace)
    assert row["reason"] == "too_many_pixels"
    assert "images/huge.png" in row["message"] and "max_pixels=50,000,000" in row["message"]
    assert summary.rejects_by_reason == {"too_many_pixels": 1}


def test_image_rejects_name_the_file_and_no_python_repr(tiny_corpus, workspace):
    (tiny_corpus / "images/notes.jpg").write_text("a shopping list\n" * 20)
    data = (tiny_corpus / "images/pic001.png").read_bytes()
    (tiny_corpus / "images/cut.png").write_bytes(data[: len(data) // 2])
    for name in ("notes.jpg", "cut.png"):
        append_image_record(tiny_corpus, f"images/{name}")

    ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    rows = rejects(workspace)
    assert [r["reason"] for r in rows] == ["not_an_image", "undecodable"]
    for row in rows:
        assert row["source"] in row["message"]
        assert "object at 0x" not in row["message"] and "<_io" not in row["message"], row["message"]


# --- captions -------------------------------------------------------------------------------------------


def test_control_characters_in_captions_are_replaced_and_recorded(tiny_corpus, workspace):
    record = write_picture(tiny_corpus, 20, "train")
    record["captions"] = ["a dog\x00on the\x07beach", "a\tdog\x1b[31m in red", "a plain caption"]
    write_records(tiny_corpus, [record], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    texts = read_captions(workspace, CORPUS).column("text").to_pylist()[-3:]
    assert texts == ["a dog on the beach", "a dog [31m in red", "a plain caption"]
    assert summary.normalised_by_reason == {"caption_control_chars_replaced": 2}
    assert summary.normalised == 2 and summary.rejected == 0


# --- table, Flickr and COCO records ---------------------------------------------------------------------


def test_malformed_csv_rows_are_bad_records_and_the_other_rows_go_in(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=4, n_dev=0)
    (corpus / "captions.jsonl").unlink()
    (corpus / "captions.csv").write_text(
        "image,caption,split\n"
        "images/pic000.jpg,a red circle,train\n"
        "images/pic001.png,too,many,fields,here\n"
        'images/pic001.png,"an open quote that never closes,train\n'
        "images/pic002.jpg,a blue triangle,train\n"
        'images/pic003.png,"a quoted, fine caption",train\n'
        'images/pic000.jpg,"a quote left open at the end\n')
    workspace = Workspace(tmp_path / "ws")

    summary = ingest_corpus(CorpusConfig(root=corpus, name="csv"), workspace)

    assert [(r["source"], r["reason"]) for r in rejects(workspace, "csv")] == [
        ("captions.csv:3", "bad_record"), ("captions.csv:4", "bad_record"), ("captions.csv:7", "bad_record")]
    messages = [r["message"] for r in rejects(workspace, "csv")]
    assert "5 fields, the header 3" in messages[0]
    assert "unterminated quote" in messages[1] and "unterminated quote" in messages[2]
    assert read_captions(workspace, "csv").column("text").to_pylist() == [
        "a red circle", "a blue triangle", "a quoted, fine caption"]
    assert summary.accounting["record"] == {"in": 3, "accepted": 0, "merged": 0, "rejected": 3}
    assert_balanced(summary)


def write_flickr8k_original(root: Path, listed: dict[str, list[int]], unlisted: list[int]) -> None:
    """Flickr8k as distributed: Flicker8k_Dataset/, Flickr8k.token.txt and the three split lists (with BOMs)."""
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    token_lines = []
    for index in [i for ids in listed.values() for i in ids] + unlisted:
        draw_picture(index)[0].save(root / "Flicker8k_Dataset" / f"{index}.jpg", format="JPEG")
        token_lines += [f"{index}.jpg#{n}\tA picture number {index} , caption {n} ." for n in range(5)]
    (root / "Flickr8k.token.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(token_lines).encode() + b"\r\n")
    for split, ids in listed.items():
        (root / f"Flickr_8k.{split}Images.txt").write_bytes(
            b"\xef\xbb\xbf" + "".join(f"{i}.jpg\r\n" for i in ids).encode())


def test_flickr8k_original_layout_keeps_unlisted_images_out_of_train(tmp_path):
    root = tmp_path / "Flickr8k"
    write_flickr8k_original(root, {"train": [0, 1, 2], "dev": [3], "test": [4]}, unlisted=[5, 6])
    workspace = Workspace(tmp_path / "ws")

    summary = ingest_corpus(CorpusConfig(root=root, name="f8k"), workspace)

    assert summary.splits == {"train": 3, "dev": 1, "test": 1, "unlisted": 2}
    assert (summary.images, summary.captions, summary.rejected) == (7, 35, 0)
    assert read_captions(workspace, "f8k").column("text").to_pylist()[0] == "A picture number 0 , caption 0 ."
    assert_balanced(summary)
    other = ingest_corpus(CorpusConfig(root=root, name="f8k-extra", unlisted_split="restval"), workspace)
    assert other.splits["restval"] == 2 and "unlisted" not in other.splits


def test_flickr_lines_without_a_tab_are_bad_records(tmp_path):
    root = tmp_path / "Flickr8k"
    write_flickr8k_original(root, {"train": [0]}, unlisted=[])
    with (root / "Flickr8k.token.txt").open("a") as token:
        token.write("0.jpg#5 a caption without its tab\n")

    summary = ingest_corpus(CorpusConfig(root=root, name="f8k"), Workspace(tmp_path / "ws"))

    assert summary.rejects_by_reason == {"bad_record": 1} and summary.captions == 5
    assert_balanced(summary)


def test_coco_annotations_of_unknown_or_missing_images_are_rejects(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    draw_picture(1)[0].save(root / "train2017" / "1.jpg", format="JPEG")
    data = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "A red square."},
                            {"id": 11, "image_id": 99, "caption": "An image the file lacks."},
                            {"id": 12, "caption": "No image id at all."}]}
    (root / "captions_train2017.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    workspace = Workspace(tmp_path / "ws")

    summary = ingest_corpus(CorpusConfig(root=root, name="coco"), workspace)

    assert [(r["source"], r["reason"]) for r in rejects(workspace, "coco")] == [
        ("captions_train2017.json:annotation 12", "no_image_id"),
        ("captions_train2017.json:image #2", "bad_record"),
        ("captions_train2017.json:image 99", "unknown_image_id")]
    assert (summary.images, summary.captions) == (1, 1)
    assert_balanced(summary)


def test_broken_tar_shard_is_a_reject_and_the_other_shards_go_in(tmp_path):
    import tarfile

    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for name, payload in (("000000001.jpg", _jpeg(1)), ("000000001.txt", b"a picture"),
                              ("000000002.jpg", _jpeg(2)), ("000000002.txt", b"another picture")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    good = (root / "00000.tar").read_bytes()
    (root / "00001.tar").write_bytes(good[:1536])  # cut inside the first member's data
    (root / "00002.tar").write_bytes(b"this is no tar at all" * 40)

    summary = ingest_corpus(CorpusConfig(root=root, name="wds"), Workspace(tmp_path / "ws"))

    assert summary.images == 2 and summary.rejects_by_reason.get("bad_shard") == 2
    assert_balanced(summary)


def _jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    draw_picture(index)[0].save(buffer, format="JPEG")
    return buffer.getvalue()


# --- detection and the ledger ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_auto_detects_a_captions_table_when_exactly_one_layout_fits(tmp_path, fmt):
    (tmp_path / f"captions.{fmt}").write_text("image,caption\n")
    assert detect_format(tmp_path, CorpusConfig(root=tmp_path)) == fmt
    (tmp_path / "captions.tsv" if fmt == "csv" else tmp_path / "captions.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="several formats fit .*csv, tsv"):
        detect_format(tmp_path, CorpusConfig(root=tmp_path))


def test_ledger_that_does_not_balance_fails_loudly():
    ledger = Ledger()
    ledger.read("image", 3)
    ledger.outcome("accepted", "image", 2)
    with pytest.raises(IngestAccountingError, match="a bug in crossalign.*'image'"):
        ledger.check()
    ledger.outcome("rejected", "image")
    assert ledger.check() == {"image": {"in": 3, "accepted": 2, "merged": 0, "rejected": 1}}


def test_cli_ingest_of_a_hostile_csv_corpus_prints_the_accounting(prefect_backend, tmp_path):
    """`crossalign ingest` on a folder with captions.csv (BOM, CRLF, a bad row, a symlink loop): exit 0."""
    from typer.testing import CliRunner

    from crossalign.cli import app

    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=3, n_dev=1)
    (corpus / "captions.jsonl").unlink()
    (corpus / "images/loop.jpg").symlink_to("loop.jpg")
    lines = ["image,caption,split", "images/pic000.jpg,a red circle,train", "images/pic001.png,a,b,c,d",
             "images/loop.jpg,a loop,train", "images/pic002.jpg,a blue triangle,train",
             "images/pic003.png,a green square,dev"]
    (corpus / "captions.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")

    result = CliRunner().invoke(app, ["ingest", "--corpus", str(corpus), "--workspace", str(tmp_path / "ws")])

    assert result.exit_code == 0, result.output
    # the summary follows the log lines (and may be followed by more of them)
    summary, _ = json.JSONDecoder().raw_decode(result.output[result.output.index('{\n  "corpus"'):])
    assert summary["rejects_by_reason"] == {"bad_record": 1, "unreadable_path": 1}
    assert (summary["images"], summary["captions"]) == (3, 3)
    assert summary["accounting"] == {"image": {"in": 4, "accepted": 3, "merged": 0, "rejected": 1},
                                     "caption": {"in": 4, "accepted": 3, "merged": 0, "rejected": 1},
                                     "record": {"in": 1, "accepted": 0, "merged": 0, "rejected": 1}}
    assert read_images(Workspace(tmp_path / "ws"), "corpus").num_rows == 3


@pytest.mark.parametrize("name", ["captions.jsonl", "Flickr8k.token.txt"])
def test_corpus_file_linked_outside_the_root_is_refused_unread(tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / name).write_text('{"image": "x.jpg", "captions": ["outside"]}\n')
    root = tmp_path / "corpus"
    root.mkdir()
    (root / name).symlink_to(outside / name)

    with pytest.raises(ValueError, match="outside the corpus root"):
        ingest_corpus(CorpusConfig(root=root, name="c"), Workspace(tmp_path / "ws"))
