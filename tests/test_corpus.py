"""Ingest of a "folder + captions.jsonl" corpus into the images / captions / rejects tables."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import draw_picture, read_records, write_picture, write_records

from crossalign.config import CorpusConfig
from crossalign.corpus import CAPTIONS_SCHEMA, IMAGES_SCHEMA, REJECTS_SCHEMA, ingest_corpus, read_captions, read_images
from crossalign.corpus.folder import CorpusConfigError
from crossalign.workspace import Workspace, WorkspaceError

CORPUS = "tiny"
TINY_IMAGES = 12  # 8 train + 4 dev
TINY_CAPTIONS = 12 * 2 + 4  # two captions each, a third for indices 0, 3, 6, 9
TINY_TRAIN_CAPTIONS = 8 * 2 + 3  # indices 0-7; a third caption for 0, 3, 6


def rejects(workspace: Workspace) -> list[dict]:
    return pq.read_table(workspace.rejects_table(CORPUS)).to_pylist()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ingest_writes_three_tables_with_their_schemas_and_counts(tiny_corpus: Path, workspace: Workspace) -> None:
    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert (summary.images, summary.captions, summary.rejected) == (TINY_IMAGES, TINY_CAPTIONS, 0)
    assert summary.splits == {"train": 8, "dev": 4}
    for path, schema in ((workspace.images_table(CORPUS), IMAGES_SCHEMA),
                         (workspace.captions_table(CORPUS), CAPTIONS_SCHEMA),
                         (workspace.rejects_table(CORPUS), REJECTS_SCHEMA)):
        assert pq.read_table(path).schema.equals(schema, check_metadata=False), path
    assert read_images(workspace, CORPUS).num_rows == TINY_IMAGES
    assert read_captions(workspace, CORPUS).num_rows == TINY_CAPTIONS
    assert read_images(workspace, CORPUS, "dev").num_rows == 4
    assert read_captions(workspace, CORPUS, "train").num_rows == TINY_TRAIN_CAPTIONS
    assert rejects(workspace) == []


def test_image_rows_describe_the_files(tiny_corpus: Path, workspace: Workspace) -> None:
    ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    rows = {Path(row["uri"]).name: row for row in read_images(workspace, CORPUS).to_pylist()}
    img, *_ = draw_picture(5)
    row = rows["pic005.png"]
    assert (row["width"], row["height"]) == img.size
    assert Path(row["uri"]).is_absolute() and Path(row["uri"]) == (tiny_corpus / "images/pic005.png").resolve()
    assert row["split"] == "train" and row["status"] == "ok"
    assert rows["pic010.jpg"]["split"] == "dev"


def test_ids_are_derived_from_content(tiny_corpus: Path, workspace: Workspace) -> None:
    ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    images = read_images(workspace, CORPUS).to_pylist()
    for row in images:
        sha = sha256_file(Path(row["uri"]))
        assert row["sha256"] == sha
        assert row["image_id"] == sha[:32]
    image_ids = {row["image_id"] for row in images}
    for row in read_captions(workspace, CORPUS).to_pylist():
        assert row["image_id"] in image_ids
        expected = hashlib.sha256(row["image_id"].encode() + b"\x00" + row["text"].encode() + b"\x00").hexdigest()
        assert row["caption_id"] == expected[:32]


def test_ids_do_not_depend_on_file_names_or_order(tiny_corpus: Path, tmp_path: Path) -> None:
    first, second = Workspace(tmp_path / "ws1"), Workspace(tmp_path / "ws2")
    ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), first)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_corpus, moved)
    records = read_records(moved)
    for record in records:  # rename every file and reverse the order of the captions file
        new = record["image"].replace("pic", "renamed_")
        os.replace(moved / record["image"], moved / new)
        record["image"] = new
    write_records(moved, records[::-1])
    ingest_corpus(CorpusConfig(root=moved, name=CORPUS), second)

    for read, key in ((read_images, "image_id"), (read_captions, "caption_id")):  # rows keep the input order
        before, after = (read(ws, CORPUS).drop_columns(["uri"] if read is read_images else []).sort_by(key)
                         for ws in (first, second))
        assert before.equals(after)


def test_reingest_is_idempotent_and_leaves_files_untouched(tiny_corpus: Path, workspace: Workspace) -> None:
    ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)
    tables = [workspace.images_table(CORPUS), workspace.captions_table(CORPUS), workspace.rejects_table(CORPUS)]
    before = {path: pq.read_table(path) for path in tables}
    old = 1_000_000_000_000_000_000  # 2001: any rewrite would give the file a current mtime
    for path in tables:
        os.utime(path, ns=(old, old))

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert (summary.images, summary.captions) == (TINY_IMAGES, TINY_CAPTIONS)
    for path in tables:
        assert pq.read_table(path).equals(before[path])
        assert path.stat().st_mtime_ns == old, f"{path.name} was rewritten"
    assert not [p for p in workspace.corpus_dir(CORPUS).iterdir() if p.name.startswith(".")], "temporary files left"


def test_changed_corpus_rewrites_the_tables(tiny_corpus: Path, workspace: Workspace) -> None:
    ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)
    write_records(tiny_corpus, [write_picture(tiny_corpus, 40, "train")], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert summary.images == TINY_IMAGES + 1
    assert read_images(workspace, CORPUS).num_rows == TINY_IMAGES + 1


def _outside_file(root: Path) -> Path:
    outside = root.parent / "outside.jpg"
    draw_picture(30)[0].save(outside, format="JPEG")
    return outside


def _case_missing_file(root: Path) -> str:
    return "images/nope.jpg"


def _case_empty_file(root: Path) -> str:
    (root / "images/empty.jpg").write_bytes(b"")
    return "images/empty.jpg"


def _case_truncated_jpeg(root: Path) -> str:
    data = (root / "images/pic000.jpg").read_bytes()
    (root / "images/truncated.jpg").write_bytes(data[: len(data) // 2])
    return "images/truncated.jpg"


def _case_not_an_image(root: Path) -> str:
    (root / "images/notes.jpg").write_text("this is a shopping list, not a picture\n" * 20)
    return "images/notes.jpg"


def _case_parent_path(root: Path) -> str:
    _outside_file(root)
    return "../outside.jpg"


def _case_absolute_path(root: Path) -> str:
    return str(_outside_file(root))


def _case_symlink_out_of_root(root: Path) -> str:
    (root / "images/link.jpg").symlink_to(_outside_file(root))
    return "images/link.jpg"


@pytest.mark.parametrize(
    ("make_bad_image", "reason"),
    [
        (_case_missing_file, "missing_file"),
        (_case_empty_file, "empty_file"),
        (_case_truncated_jpeg, "undecodable"),
        (_case_not_an_image, "not_an_image"),
        (_case_parent_path, "path_outside_root"),
        (_case_absolute_path, "path_outside_root"),
        (_case_symlink_out_of_root, "path_outside_root"),
    ],
)
def test_bad_image_becomes_a_reject_and_the_rest_ingests(
    tiny_corpus: Path, workspace: Workspace, make_bad_image: Callable[[Path], str], reason: str,
) -> None:
    source = make_bad_image(tiny_corpus)
    write_records(tiny_corpus, [{"image": source, "captions": ["a broken picture"], "split": "train"}], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert [(r["kind"], r["source"], r["reason"]) for r in rejects(workspace)] == [("image", source, reason)]
    assert summary.rejects_by_reason == {reason: 1}
    assert (summary.images, summary.captions) == (TINY_IMAGES, TINY_CAPTIONS)
    assert "a broken picture" not in read_captions(workspace, CORPUS).column("text").to_pylist()


def test_too_many_pixels_is_rejected(tiny_corpus: Path, workspace: Workspace) -> None:
    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS, max_pixels=100 * 100), workspace)

    # Every tiny picture is at least 96 x 96; those over 10,000 pixels are rejected, the rest kept.
    sizes = [draw_picture(i)[0].size for i in range(TINY_IMAGES)]
    too_big = sum(w * h > 100 * 100 for w, h in sizes)
    assert 0 < too_big < TINY_IMAGES
    assert summary.rejects_by_reason == {"too_many_pixels": too_big}
    assert summary.images == TINY_IMAGES - too_big


@pytest.mark.parametrize("blank", ["", "   ", " \t\n "])
def test_empty_caption_is_rejected_and_the_image_keeps_its_good_caption(
    tiny_corpus: Path, workspace: Workspace, blank: str,
) -> None:
    record = write_picture(tiny_corpus, 20, "train")
    record["captions"] = [blank, "a lonely yellow square"]
    write_records(tiny_corpus, [record], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert [(r["kind"], r["reason"]) for r in rejects(workspace)] == [("caption", "empty_caption")]
    assert summary.images == TINY_IMAGES + 1
    image_id = sha256_file(tiny_corpus / record["image"])[:32]
    texts = [r["text"] for r in read_captions(workspace, CORPUS).to_pylist() if r["image_id"] == image_id]
    assert texts == ["a lonely yellow square"]


def test_caption_that_is_not_text_is_rejected(tiny_corpus: Path, workspace: Workspace) -> None:
    record = write_picture(tiny_corpus, 21, "train")
    record["captions"] = [42, None, "a fine caption"]
    write_records(tiny_corpus, [record], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert summary.rejects_by_reason == {"caption_not_text": 2}
    assert summary.captions == TINY_CAPTIONS + 1


def test_captions_are_normalised_and_long_ones_truncated(tiny_corpus: Path, workspace: Workspace) -> None:
    record = write_picture(tiny_corpus, 22, "train")
    record["captions"] = ["  a   spaced\tout   caption ", "x" * 80]
    write_records(tiny_corpus, [record], mode="a")

    # 60 characters: longer than any caption of the tiny corpus, so only the "x" caption is truncated.
    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS, max_caption_chars=60), workspace)

    image_id = sha256_file(tiny_corpus / record["image"])[:32]
    texts = sorted(r["text"] for r in read_captions(workspace, CORPUS).to_pylist() if r["image_id"] == image_id)
    assert texts == ["a spaced out caption", "x" * 60]
    assert summary.normalised == 1


def test_duplicate_bytes_under_two_names_collapse_into_one_image(tiny_corpus: Path, workspace: Workspace) -> None:
    shutil.copyfile(tiny_corpus / "images/pic000.jpg", tiny_corpus / "images/copy_of_pic000.jpg")
    original = read_records(tiny_corpus)[0]
    new_caption = "the same red circle under another name"
    # One caption is new, one repeats a caption of the original: merged, and the repeat kept once.
    write_records(tiny_corpus, [{"image": "images/copy_of_pic000.jpg", "split": "train",
                                 "captions": [new_caption, original["captions"][1]]}], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert summary.images == TINY_IMAGES
    assert summary.rejected == 0
    image_id = sha256_file(tiny_corpus / "images/pic000.jpg")[:32]
    texts = sorted(r["text"] for r in read_captions(workspace, CORPUS).to_pylist() if r["image_id"] == image_id)
    assert texts == sorted([*original["captions"], new_caption])
    uris = [r["uri"] for r in read_images(workspace, CORPUS).to_pylist() if r["image_id"] == image_id]
    assert len(uris) == 1


def test_duplicate_bytes_in_another_split_is_rejected(tiny_corpus: Path, workspace: Workspace) -> None:
    shutil.copyfile(tiny_corpus / "images/pic000.jpg", tiny_corpus / "images/copy_of_pic000.jpg")
    write_records(tiny_corpus, [{"image": "images/copy_of_pic000.jpg", "split": "dev",
                                 "captions": ["a dev caption of a train picture"]}], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert summary.rejects_by_reason == {"duplicate_in_other_split": 1}
    assert summary.splits == {"train": 8, "dev": 4}
    assert "a dev caption of a train picture" not in read_captions(workspace, CORPUS).column("text").to_pylist()


def test_same_caption_twice_is_kept_once(tiny_corpus: Path, workspace: Workspace) -> None:
    record = write_picture(tiny_corpus, 23, "train")
    record["captions"] = ["a dog on a beach", "a dog on a beach", "a  dog on a beach "]
    write_records(tiny_corpus, [record], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    image_id = sha256_file(tiny_corpus / record["image"])[:32]
    rows = [r for r in read_captions(workspace, CORPUS).to_pylist() if r["image_id"] == image_id]
    caption_id = hashlib.sha256(f"{image_id}\x00a dog on a beach\x00".encode()).hexdigest()[:32]
    assert rows == [{"caption_id": caption_id, "image_id": image_id, "text": "a dog on a beach", "split": "train"}]
    assert summary.captions == TINY_CAPTIONS + 1
    assert summary.normalised_by_reason == {"duplicate_caption_dropped": 2}
    assert rejects(workspace) == []


def test_image_listed_twice_in_the_captions_file_is_one_image_with_both_lines_captions(
    tiny_corpus: Path, workspace: Workspace
) -> None:
    record = write_picture(tiny_corpus, 23, "train")
    record["captions"] = ["a dog on a beach", "a wet dog"]
    again = {**record, "captions": ["a wet dog", "a dog running by the sea"]}  # the same id, a second line
    write_records(tiny_corpus, [record, again], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    image_id = sha256_file(tiny_corpus / record["image"])[:32]
    image_rows = [r for r in read_images(workspace, CORPUS).to_pylist() if r["image_id"] == image_id]
    assert [(r["uri"], r["split"]) for r in image_rows] == [(str(tiny_corpus / record["image"]), "train")]
    texts = [r["text"] for r in read_captions(workspace, CORPUS).to_pylist() if r["image_id"] == image_id]
    assert texts == ["a dog on a beach", "a wet dog", "a dog running by the sea"]
    assert summary.normalised_by_reason == {"duplicate_caption_dropped": 1, "duplicate_image_entry": 1}
    assert (summary.images, summary.captions) == (TINY_IMAGES + 1, TINY_CAPTIONS + 3)
    assert rejects(workspace) == []


@pytest.mark.parametrize(
    "line",
    [
        b"{not json at all\n",
        b'{"captions": ["no image key"]}\n',
        b'["a", "list"]\n',
        b'{"image": "images/pic000.jpg", "captions": 7}\n',
        b'{"image": "images/pic\xe9.jpg", "captions": ["a path in latin-1"]}\n',
    ],
)
def test_bad_line_becomes_a_bad_record_reject(tiny_corpus: Path, workspace: Workspace, line: bytes) -> None:
    with (tiny_corpus / "captions.jsonl").open("ab") as out:
        out.write(line)

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    rows = rejects(workspace)
    assert [(r["kind"], r["reason"], r["source"]) for r in rows] == [
        ("record", "bad_record", f"captions.jsonl:{TINY_IMAGES + 1}")]
    assert rows[0]["message"]
    assert (summary.images, summary.captions) == (TINY_IMAGES, TINY_CAPTIONS)


def test_single_caption_string_and_missing_split_are_accepted(tiny_corpus: Path, workspace: Workspace) -> None:
    record = write_picture(tiny_corpus, 24, "ignored")
    write_records(tiny_corpus, [{"image": record["image"], "caption": "just one caption"}], mode="a")

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS, default_split="extra"), workspace)

    assert summary.splits == {"train": 8, "dev": 4, "extra": 1}
    assert read_captions(workspace, CORPUS, "extra").column("text").to_pylist() == ["just one caption"]


def test_corpus_name_defaults_to_the_folder_name(tiny_corpus: Path, workspace: Workspace) -> None:
    summary = ingest_corpus(CorpusConfig(root=tiny_corpus), workspace)

    assert summary.corpus == tiny_corpus.name
    assert workspace.images_table(tiny_corpus.name).exists()


def test_missing_captions_file_raises_before_any_work(tiny_corpus: Path, workspace: Workspace) -> None:
    (tiny_corpus / "captions.jsonl").unlink()

    with pytest.raises(CorpusConfigError, match="captions file"):
        ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)
    assert not workspace.corpus_dir(CORPUS).exists()


def test_other_captions_file_name_is_used(tiny_corpus: Path, workspace: Workspace) -> None:
    os.replace(tiny_corpus / "captions.jsonl", tiny_corpus / "labels.jsonl")

    assert ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS, captions_file="labels.jsonl"),
                         workspace).images == TINY_IMAGES


def test_missing_root_raises_before_any_work(tmp_path: Path, workspace: Workspace) -> None:
    with pytest.raises(CorpusConfigError, match="not a readable directory"):
        ingest_corpus(CorpusConfig(root=tmp_path / "no-such-corpus", name=CORPUS), workspace)
    assert not workspace.root.exists()


def test_reading_a_corpus_that_was_never_ingested_raises(workspace: Workspace) -> None:
    with pytest.raises(WorkspaceError, match="ingest the corpus first"):
        read_images(workspace, "never")


def test_caption_not_valid_utf8_is_rejected_alone(tiny_corpus: Path, workspace: Workspace) -> None:
    with (tiny_corpus / "captions.jsonl").open("ab") as out:
        out.write(b'{"image": "images/pic000.jpg", "captions": ["caf\xe9 latin-1", "a fine caption"]}\n')

    summary = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    rows = rejects(workspace)
    assert [(r["kind"], r["reason"]) for r in rows] == [("caption", "caption_not_utf8")]
    assert summary.captions == TINY_CAPTIONS + 1  # the good caption of the same line is kept
    assert summary.normalised_by_reason.get("duplicate_image_entry") == 1  # pic000 listed twice


def test_reingest_reports_added_and_removed_images(tiny_corpus: Path, workspace: Workspace) -> None:
    first = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)
    assert (first.added, first.removed) == (TINY_IMAGES, 0)
    records = read_records(tiny_corpus)
    gone = records[0]
    gone_id = hashlib.sha256((tiny_corpus / gone["image"]).read_bytes()).hexdigest()[:32]
    (tiny_corpus / gone["image"]).unlink()
    write_records(tiny_corpus, records[1:] + [write_picture(tiny_corpus, 30, "train"),
                                               write_picture(tiny_corpus, 31, "train")])

    second = ingest_corpus(CorpusConfig(root=tiny_corpus, name=CORPUS), workspace)

    assert (second.images, second.added, second.removed) == (TINY_IMAGES + 1, 2, 1)
    assert second.removed_ids == [gone_id]
