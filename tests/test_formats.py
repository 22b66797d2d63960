"""Every corpus format reads into the same canonical tables; detection and format errors are explicit."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import draw_picture, write_tiny_corpus
from pydantic import ValidationError

from crossalign.config import CorpusConfig
from crossalign.corpus import ingest_corpus, read_captions, read_images
from crossalign.corpus.folder import CorpusConfigError
from crossalign.corpus.formats import detect_format
from crossalign.workspace import Workspace

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def picture_bytes(index: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    draw_picture(index)[0].save(buffer, format=fmt)
    return buffer.getvalue()


def tables(workspace: Workspace, corpus: str) -> tuple[dict[str, str], set[tuple[str, str, str]]]:
    """({image_id: split}, {(caption_id, image_id, text)}) of an ingested corpus."""
    images = read_images(workspace, corpus).to_pylist()
    captions = read_captions(workspace, corpus).to_pylist()
    return ({r["image_id"]: r["split"] for r in images},
            {(r["caption_id"], r["image_id"], r["text"]) for r in captions})


def write_webdataset(root: Path, samples: list[tuple[str, bytes, list[str], str]], per_shard: int = 3) -> None:
    """Shards `00000.tar` ... holding key.jpg + key.txt + key.json, as img2dataset writes them."""
    root.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for key, data, captions, split in samples[start:start + per_shard]:
                for suffix, payload in ((".jpg", data), (".txt", "\n".join(captions).encode()),
                                        (".json", json.dumps({"key": key, "split": split}).encode())):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def reference(tmp_path: Path) -> tuple[Path, Workspace]:
    """The tiny corpus in the jsonl layout, ingested: the tables every other format must reproduce."""
    corpus = write_tiny_corpus(tmp_path / "jsonl", n_train=4, n_dev=2)
    workspace = Workspace(tmp_path / "ws")
    ingest_corpus(CorpusConfig(root=corpus, name="ref"), workspace)
    return corpus, workspace


def records(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt, sep", [("csv", ","), ("tsv", "\t")])
def test_table_with_one_caption_per_row(reference, tmp_path, fmt, sep):
    corpus, workspace = reference
    rows = [{"img": r["image"], "text": c, "subset": r["split"]} for r in records(corpus) for c in r["captions"]]
    (corpus / f"captions.{fmt}").write_text(pd.DataFrame(rows).to_csv(sep=sep, index=False))
    ingest_corpus(CorpusConfig(root=corpus, name=fmt, captions_file=f"captions.{fmt}", image_column="img",
                               caption_column="text", split_column="subset"), workspace)
    assert tables(workspace, fmt) == tables(workspace, "ref")


def test_parquet_with_a_list_of_captions_per_image(reference):
    corpus, workspace = reference
    pd.DataFrame(records(corpus)).to_parquet(corpus / "captions.parquet")
    ingest_corpus(CorpusConfig(root=corpus, name="pq", captions_file="captions.parquet", caption_column="captions"),
                  workspace)
    assert tables(workspace, "pq") == tables(workspace, "ref")


def test_parquet_with_embedded_image_bytes(reference, tmp_path):
    corpus, workspace = reference
    rows = [{"image": {"bytes": (corpus / r["image"]).read_bytes(), "path": r["image"]},
             "text": r["captions"], "split": r["split"]} for r in records(corpus)]
    (tmp_path / "hf").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "hf" / "train-00000.parquet")
    assert detect_format(tmp_path / "hf", CorpusConfig(root=tmp_path / "hf")) == "parquet"
    ingest_corpus(CorpusConfig(root=tmp_path / "hf", name="hf", caption_column="text"), workspace)
    assert tables(workspace, "hf") == tables(workspace, "ref")
    for row in read_images(workspace, "hf").to_pylist():  # stored once, inside the workspace
        assert Path(row["uri"]).is_relative_to(workspace.corpus_dir("hf") / "blobs") and Path(row["uri"]).is_file()


def test_webdataset_shards_give_the_same_ids(reference, tmp_path):
    corpus, workspace = reference
    samples = [(f"{i:09d}", (corpus / r["image"]).read_bytes(), r["captions"], r["split"])
               for i, r in enumerate(records(corpus))]
    write_webdataset(tmp_path / "wds", samples)
    assert len(list((tmp_path / "wds").glob("*.tar"))) == 2
    summary = ingest_corpus(CorpusConfig(root=tmp_path / "wds", name="wds"), workspace)
    assert tables(workspace, "wds") == tables(workspace, "ref")
    assert summary.rejected == 0


def test_unsafe_tar_members_are_rejected_and_never_written(tmp_path):
    root = tmp_path / "wds"
    write_webdataset(root, [("000000001", picture_bytes(1), ["a picture"], "train")])
    with tarfile.open(root / "00001.tar", "w") as tar:
        for name in ("../evil.jpg", "/abs/evil.jpg"):
            info = tarfile.TarInfo(name)
            payload = picture_bytes(2)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    workspace = Workspace(tmp_path / "ws")
    summary = ingest_corpus(CorpusConfig(root=root, name="wds"), workspace)
    assert summary.images == 1 and summary.rejects_by_reason == {"unsafe_tar_member": 2}
    assert not (tmp_path / "evil.jpg").exists() and not Path("/abs/evil.jpg").exists()


def test_flickr_token_file_with_split_lists(reference, tmp_path):
    corpus, workspace = reference
    root = tmp_path / "flickr"
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    token_lines, splits = [], {"train": [], "dev": []}
    for r in records(corpus):
        name = Path(r["image"]).name
        (root / "Flicker8k_Dataset" / name).write_bytes((corpus / r["image"]).read_bytes())
        token_lines += [f"{name}#{n}\t{c}" for n, c in enumerate(r["captions"])]
        splits[r["split"]].append(name)
    (root / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(splits["train"]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(splits["dev"]) + "\n")
    ingest_corpus(CorpusConfig(root=root, name="flickr"), workspace)
    assert tables(workspace, "flickr") == tables(workspace, "ref")


def test_flickr30k_results_csv(tmp_path):
    root = tmp_path / "f30k"
    (root / "flickr30k_images").mkdir(parents=True)
    (root / "flickr30k_images" / "1.jpg").write_bytes(picture_bytes(1))
    (root / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| A red square .\n"
                                      "1.jpg| 1| Red | and square .\n")
    workspace = Workspace(tmp_path / "ws")
    ingest_corpus(CorpusConfig(root=root, name="f30k"), workspace)
    assert sorted(r["text"] for r in read_captions(workspace, "f30k").to_pylist()) == [
        "A red square .", "Red | and square ."]


def test_coco_captions_json(reference, tmp_path):
    corpus, workspace = reference
    root = tmp_path / "coco"
    for split in ("train", "dev"):
        folder = root / f"{split}2017"
        folder.mkdir(parents=True)
        images, annotations = [], []
        for number, r in enumerate(x for x in records(corpus) if x["split"] == split):
            name = Path(r["image"]).name
            (folder / name).write_bytes((corpus / r["image"]).read_bytes())
            images.append({"id": number, "file_name": name})
            annotations += [{"image_id": number, "id": len(annotations) + k, "caption": c}
                            for k, c in enumerate(r["captions"])]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": annotations}))
    ingest_corpus(CorpusConfig(root=root, name="coco"), workspace)
    assert tables(workspace, "coco") == tables(workspace, "ref")


def test_coco_duplicate_annotation_and_image_ids_keep_the_first_and_reject_the_rest(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    for number in (1, 2):
        (root / "train2017" / f"{number}.jpg").write_bytes(picture_bytes(number))
    images = [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}, {"id": 2, "file_name": "1.jpg"}]
    annotations = [{"id": 10, "image_id": 1, "caption": "A red square."},
                   {"id": 11, "image_id": 2, "caption": "A green square."},
                   {"id": 10, "image_id": 2, "caption": "A second caption under id 10."}]
    (root / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    workspace = Workspace(tmp_path / "ws")

    summary = ingest_corpus(CorpusConfig(root=root, name="coco"), workspace)

    ids = {n: hashlib.sha256(picture_bytes(n)).hexdigest()[:32] for n in (1, 2)}
    assert [(r["image_id"], r["split"]) for r in read_images(workspace, "coco").to_pylist()] == [
        (ids[1], "train"), (ids[2], "train")]
    assert [(r["image_id"], r["text"]) for r in read_captions(workspace, "coco").to_pylist()] == [
        (ids[1], "A red square."), (ids[2], "A green square.")]
    assert pq.read_table(workspace.rejects_table("coco")).to_pylist() == [
        {"kind": "record", "source": "captions_train2017.json:annotation 10", "reason": "duplicate_caption_id",
         "message": "annotation id 10 appears again; the first is kept: 'A second caption under id 10.'"},
        {"kind": "record", "source": "captions_train2017.json:image 2", "reason": "duplicate_image_id",
         "message": "image id 2 appears again (1.jpg); the first entry is kept"},
    ]
    assert summary.rejects_by_reason == {"duplicate_caption_id": 1, "duplicate_image_id": 1}


def test_flickr_duplicate_caption_number_keeps_the_first(tmp_path):
    root = tmp_path / "flickr"
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    (root / "Flicker8k_Dataset" / "1.jpg").write_bytes(picture_bytes(1))
    (root / "Flickr8k.token.txt").write_text("1.jpg#0\tA red square .\n1.jpg#1\tA square .\n1.jpg#0\tRed again .\n")
    workspace = Workspace(tmp_path / "ws")

    ingest_corpus(CorpusConfig(root=root, name="flickr"), workspace)

    assert [r["text"] for r in read_captions(workspace, "flickr").to_pylist()] == ["A red square .", "A square ."]
    assert pq.read_table(workspace.rejects_table("flickr")).to_pylist() == [
        {"kind": "record", "source": "Flickr8k.token.txt:3", "reason": "duplicate_caption_id",
         "message": "caption id 1.jpg#0 appears again; the first is kept: 'Red again .'"}]


def test_ambiguous_layout_needs_an_explicit_format(reference, tmp_path):
    corpus, _ = reference
    write_webdataset(corpus, [("000000001", picture_bytes(1), ["a picture"], "train")])
    with pytest.raises(CorpusConfigError, match="several formats fit .*jsonl, webdataset"):
        detect_format(corpus, CorpusConfig(root=corpus))
    assert ingest_corpus(CorpusConfig(root=corpus, name="x", format="webdataset"),
                         Workspace(tmp_path / "ws")).images == 1


def test_unknown_format_names_the_allowed_ones(reference, tmp_path):
    corpus, _ = reference
    with pytest.raises(ValidationError, match="format\n.*'jsonl'.*'webdataset'"):  # the config refuses it
        CorpusConfig(root=corpus, name="x", format="yaml")
    unchecked = CorpusConfig.model_construct(root=corpus, name="x", format="yaml")  # and so does the reader
    with pytest.raises(CorpusConfigError, match="unknown corpus format 'yaml'.*webdataset"):
        ingest_corpus(unchecked, Workspace(tmp_path / "ws"))


@pytest.mark.skipif(not (FLICKR8K / "captions.jsonl").exists(), reason=f"Flickr8k not found at {FLICKR8K}")
def test_flickr8k_and_its_webdataset_repack_give_the_same_ids(prefect_backend, tmp_path):
    """`crossalign ingest` on Flickr8k and on the same corpus re-packed as WebDataset shards (first 300 images)."""
    from typer.testing import CliRunner

    from crossalign.cli import app

    lines = (FLICKR8K / "captions.jsonl").read_text().splitlines()[:300]
    subset = tmp_path / "flickr8k"
    (subset / "images").mkdir(parents=True)
    for record in map(json.loads, lines):
        (subset / record["image"]).write_bytes((FLICKR8K / record["image"]).read_bytes())
    (subset / "captions.jsonl").write_text("\n".join(lines) + "\n")
    samples = [(f"{i:09d}", (FLICKR8K / r["image"]).read_bytes(), r["captions"], r["split"])
               for i, r in enumerate(map(json.loads, lines))]
    write_webdataset(tmp_path / "wds", samples, per_shard=100)
    workspace = Workspace(tmp_path / "ws")
    runner = CliRunner()
    ingest_corpus(CorpusConfig(root=subset, name="flickr8k"), workspace)
    result = runner.invoke(app, ["ingest", "--corpus", str(tmp_path / "wds"), "--workspace", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert tables(workspace, "wds") == tables(workspace, "flickr8k")
    assert len(tables(workspace, "wds")[0]) >= 299


def test_webdataset_caption_not_utf8_is_rejected_with_its_reason(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for name, payload in (("000000001.jpg", picture_bytes(1)), ("000000001.txt", b"caf\xe9 latin-1")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    workspace = Workspace(tmp_path / "ws")
    summary = ingest_corpus(CorpusConfig(root=root, name="wds"), workspace)
    assert (summary.images, summary.captions) == (1, 0)
    assert summary.rejects_by_reason == {"caption_not_utf8": 1}
