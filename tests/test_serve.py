"""`crossalign serve` for real: the console command on a free port of 127.0.0.1 over a tiny workspace this module
builds (real encoders, a memorised mapper, real LanceDB tables), a real HTTP client for every endpoint and every
error, headless Chromium over the DevTools protocol for the page (as tests/test_ui.py drives it), and new rows
and a new mapper embedded while the server runs.

Screenshots go where tests/test_ui.py puts its own (`build/ui/` under the repository, or
`$CROSSALIGN_UI_SCREENSHOTS`), named `serve-*.png`.
"""
# ruff: noqa: F811  (test_ui's fixtures, imported below, are this module's test parameters too)

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import (
    COLOURS,
    ENCODER_RUNTIME,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    ingest_and_extract,
    write_picture,
    write_records,
    write_tiny_corpus,
)
from PIL import Image
from test_ui import Browser, chromium, screenshots  # noqa: F401 (fixtures)

from crossalign.align import fit_mapper
from crossalign.align.classify import labels_path
from crossalign.config import TrainConfig
from crossalign.corpus import read_images
from crossalign.encoders.base import can_compile_on_cpu
from crossalign.search import Searcher
from crossalign.store import embed_corpus
from crossalign.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
# As tests/test_search.py: enough steps to memorise the 8 training pictures, selected on them.
TRAIN_OPTIONS = {"dim": 64, "steps": 300, "eval_every": 50, "batch_size": 8, "input_dropout": 0.0,
                 "warmup_steps": 20, "eval_split": "train"}
MAX_UPLOAD_BYTES = 2**18  # --max-upload-mb 0.25
MAX_UPLOAD_PIXELS = 250_000
SERVER_START_S = 180
SECRET = b"crossalign-serve-test-secret"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny corpus ingested, extracted, memorised and embedded; plus an image outside the corpus root."""
    root = tmp_path_factory.mktemp("serve")
    corpus_root, workspace = write_tiny_corpus(root / "corpus"), Workspace(root / "ws")
    corpus = ingest_and_extract(corpus_root, workspace)
    fit = fit_mapper(workspace, corpus, IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**TRAIN_OPTIONS))
    assert fit.metrics["rsum"] == 600.0, "the tiny training set was not memorised: the tests below would be moot"
    embed_corpus(workspace, corpus)
    outside = root / "outside.png"  # a real image, outside the corpus root: it must never be served
    Image.new("RGB", (40, 40), (1, 2, 3)).save(outside, pnginfo=_png_text(SECRET))
    ids = {Path(r["uri"]).name: r["image_id"] for r in read_images(workspace, corpus).to_pylist()}
    return {"root": root, "corpus_root": corpus_root, "workspace": workspace, "corpus": corpus, "ids": ids,
            "outside": outside}


def _png_text(value: bytes) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("secret", value.decode())
    return info


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(built: dict[str, Any]) -> Iterator[str]:
    """`crossalign serve` in its own process (as a team would run it); yields its base URL."""
    port = _free_port()
    log = (built["root"] / "serve.log").open("w")
    command = [sys.executable, "-c", "from crossalign.cli import main; main()", "serve",
               "--workspace", str(built["workspace"].root), "--port", str(port), "--refresh-seconds", "0.5",
               "--max-upload-mb", str(MAX_UPLOAD_BYTES / 2**20), "--max-upload-pixels", str(MAX_UPLOAD_PIXELS),
               "--device", ENCODER_RUNTIME["device"], "--precision", ENCODER_RUNTIME["precision"],
               "--compile", "on" if can_compile_on_cpu() else "off", "--no-autotune"]  # autotuning: minutes more
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "LANCE_LOG": "error", "OMP_NUM_THREADS": "1"})
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + SERVER_START_S
    try:
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"crossalign serve did not start:\n{(built['root'] / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def searcher(built: dict[str, Any]) -> Searcher:
    """The in-process Searcher the service must agree with."""
    return Searcher(built["workspace"], **ENCODER_RUNTIME)


def _error(response: httpx.Response, status: int) -> str:
    """The one-line JSON error of `response`, which must have `status`."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in response.text
    return body["error"]


def _pick(hit: dict[str, Any]) -> dict[str, Any]:
    return {k: hit.get(k) for k in ("rank", "score", "cosine", "id", "uri", "text", "image_id", "split", "corpus")}


# --- the JSON API ---------------------------------------------------------------------------------------------


def test_health_and_tables_name_the_mapper_and_rows(client: httpx.Client, built: dict[str, Any]) -> None:
    health = client.get("/health").json()
    current = built["workspace"].current_mapper_id()
    assert health["status"] == "ok" and health["mapper_id"] == current
    assert health["rows"] == {"images": 12, "captions": 28} and health["normalisation"] == "inverted_softmax"
    tables = client.get("/api/tables").json()
    assert tables["tables"]["images"]["rows"] == 12 and tables["current_mapper"] == current
    assert {(m["table"], m["mapper_id"], m["current"]) for m in tables["mappers"]} == {
        ("images", current, True), ("captions", current, True)}
    assert tables["corpora"] == ["tiny"] and tables["splits"] == ["dev", "train"]
    schema = client.get("/openapi.json").json()
    assert {"/api/search/text", "/api/search/image", "/api/images/{image_id}/similar", "/health", "/api/tables",
            "/images/{image_id}", "/images/{image_id}/thumbnail", "/api/classify",
            "/api/labels"} <= set(schema["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize("query", ["a red circle on a white background", "a picture of a green square", "stripes"])
def test_text_to_image_gives_the_searchers_hits_and_scores(client: httpx.Client, searcher: Searcher,
                                                           query: str) -> None:
    body = client.get("/api/search/text", params={"q": query, "limit": 5}).json()
    expected = [hit.to_dict() for hit in searcher.text_to_image(query, limit=5)]
    assert [_pick(hit) for hit in body["hits"]] == [_pick(hit) for hit in expected]
    assert body["normalisation"] == "inverted_softmax" and all(h["cosine"] >= h["score"] for h in body["hits"])


QUERIES = [f"a {shape} of {colour}" for shape in ("circle", "square", "stripe", "picture")
           for colour in ("red", "green", "blue", "yellow")]


def test_concurrent_text_queries_each_get_their_own_hits(server: str, searcher: Searcher) -> None:
    """16 clients at once (texts of different token counts, encoded in shared batches): every answer is the
    in-process Searcher's for its own query."""
    answers: dict[str, list[dict[str, Any]]] = {}
    start = threading.Barrier(len(QUERIES))

    def ask(text: str) -> None:
        with httpx.Client(base_url=server, timeout=60) as http:
            start.wait()
            answers[text] = http.get("/api/search/text", params={"q": text, "limit": 5}).json()["hits"]

    before = httpx.get(f"{server}/health").json()["text_queries"]
    threads = [threading.Thread(target=ask, args=(text,)) for text in QUERIES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = httpx.get(f"{server}/health").json()["text_queries"]
    assert after["encoded"] - before["encoded"] + after["cached"] - before["cached"] == len(QUERIES)
    assert 1 <= after["encoder_calls"] - before["encoder_calls"] <= len(QUERIES)
    for text in QUERIES:
        expected = searcher.text_to_image(text, limit=5)
        assert [hit["id"] for hit in answers[text]] == [hit.id for hit in expected], text
        assert [hit["score"] for hit in answers[text]] == pytest.approx([hit.score for hit in expected], abs=2e-3)


def test_queries_waiting_for_the_encoder_are_encoded_in_one_call(searcher: Searcher) -> None:
    """Texts queued while an encoding runs go into the next call together, each getting its own vector; an
    empty text is refused before it queues."""
    from crossalign.search import QueryError
    from crossalign.serve.batching import QueryEncoder

    encoder, vectors = QueryEncoder(max_batch=32), {}
    texts = [*QUERIES[:7], "a very long caption about a red circle that sits in the middle of a white background"]
    with encoder.lock:  # an encoding in progress: the texts below queue behind it
        threads = [threading.Thread(target=lambda t=text: vectors.__setitem__(t, encoder.embed_text(searcher, t)))
                   for text in texts]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(encoder._waiting) < len(texts) and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join()
    assert (encoder.batches, encoder.texts) == (1, len(texts))
    for text in texts:
        np.testing.assert_allclose(vectors[text], searcher.embed_text(text), atol=1e-4)
    with pytest.raises(QueryError, match="empty"):
        encoder.embed_text(searcher, "  ")
    assert encoder.texts == len(texts)
    # A text asked again (the next page, a label filter) is answered from the cache, for its own Searcher only.
    assert encoder.embed_text(searcher, texts[0]) is vectors[texts[0]] and not vectors[texts[0]].flags.writeable
    assert (encoder.texts, encoder.cached) == (len(texts), 1)
    other = Searcher(searcher.workspace, device="cpu", precision="fp32")  # a new snapshot: keys of its own
    np.testing.assert_allclose(encoder.embed_text(other, texts[0]), vectors[texts[0]], atol=1e-4)
    assert (encoder.texts, encoder.cached) == (len(texts) + 1, 1)
    small = QueryEncoder(cache_size=2)
    for text in texts[:3]:
        small.embed_text(searcher, text)
    small.embed_text(searcher, texts[0])  # the oldest of three went out
    assert (small.texts, small.cached) == (4, 0)


def test_a_training_caption_finds_its_image_first(client: httpx.Client, built: dict[str, Any]) -> None:
    body = client.get("/api/search/text", params={"q": "a red circle on a white background", "captions": "true"})
    top = body.json()["hits"][0]
    assert top["id"] == built["ids"]["pic000.jpg"] and top["rank"] == 1
    assert "a red circle on a white background" in top["captions"]
    assert top["thumbnail"] == f"/images/{top['id']}/thumbnail"


@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
def test_text_to_captions_in_every_mode(client: httpx.Client, searcher: Searcher, mode: str) -> None:
    body = client.get("/api/search/text", params={"q": "yellow square", "target": "captions", "mode": mode,
                                                  "limit": 4}).json()
    expected = searcher.text_to_text("yellow square", limit=4, mode=mode)
    assert {h["id"] for h in body["hits"]} == {h.id for h in expected} and body["hits"]
    assert [h["score"] for h in body["hits"]] == [h.score for h in expected]
    if mode == "fts":
        assert all("yellow" in h["text"] or "square" in h["text"] for h in body["hits"])


def test_an_uploaded_image_finds_its_captions_and_itself(client: httpx.Client, built: dict[str, Any],
                                                         searcher: Searcher) -> None:
    path = built["corpus_root"] / "images" / "pic005.png"
    captions = client.post("/api/search/image", content=path.read_bytes(), params={"limit": 3}).json()
    assert [_pick(h) for h in captions["hits"]] == [_pick(h.to_dict()) for h in searcher.image_to_text(path, 3)]
    images = client.post("/api/search/image", content=path.read_bytes(), params={"target": "images"}).json()
    top = images["hits"][0]
    assert top["id"] == built["ids"]["pic005.png"] and top["score"] == pytest.approx(1, abs=1e-3)


def test_more_like_this_starts_with_the_image_itself(client: httpx.Client, built: dict[str, Any],
                                                     searcher: Searcher) -> None:
    image_id = built["ids"]["pic002.jpg"]
    body = client.get(f"/api/images/{image_id}/similar", params={"limit": 4}).json()
    expected = searcher.image_to_image(built["corpus_root"] / "images" / "pic002.jpg", limit=4)
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected] and body["hits"][0]["id"] == image_id
    record = client.get(f"/api/images/{image_id}").json()
    assert record["id"] == image_id and record["split"] == "train" and len(record["captions"]) == 2


def test_paging_and_filters(client: httpx.Client) -> None:
    query = {"q": "a blue shape"}
    whole = client.get("/api/search/text", params={**query, "limit": 8}).json()["hits"]
    counted = client.get("/health").json()["text_queries"]
    page = client.get("/api/search/text", params={**query, "limit": 3, "offset": 2}).json()["hits"]
    assert [(h["rank"], h["id"]) for h in page] == [(h["rank"], h["id"]) for h in whole[2:5]]
    dev = client.get("/api/search/text", params={**query, "split": "dev", "limit": 10}).json()["hits"]
    assert len(dev) == 4 and {h["split"] for h in dev} == {"dev"}
    assert len(client.get("/api/search/text", params={**query, "corpus": "tiny", "limit": 12}).json()["hits"]) == 12
    assert client.get("/api/search/text", params={**query, "corpus": "other"}).json()["hits"] == []
    now = client.get("/health").json()["text_queries"]  # one text, encoded once: the later pages hit the cache
    assert (now["encoded"], now["cached"]) == (counted["encoded"], counted["cached"] + 4)


def test_classify_endpoint_labels_every_image_and_search_filters_by_label(client: httpx.Client,
                                                                          built: dict[str, Any]) -> None:
    colours = list(COLOURS)
    summary = client.post("/api/classify", json={"labels": colours, "templates": ["a picture of a {} shape"]}).json()
    assert summary["images"] == 12 and sum(summary["counts"].values()) == 12 and set(summary["counts"]) == set(colours)
    written = pq.read_table(labels_path(built["workspace"])).to_pylist()
    assert len(written) == 12 and all(row["label"] == row["top_labels"][0] for row in written)
    assert all(row["top_scores"] == sorted(row["top_scores"], reverse=True) for row in written)
    label = max(summary["counts"], key=summary["counts"].get)
    chosen = {row["image_id"] for row in written if row["label"] == label}
    listing = client.get("/api/labels", params={"label": label}).json()
    assert listing["counts"] == summary["counts"] and {i["id"] for i in listing["images"]} == chosen
    hits = client.get("/api/search/text", params={"q": "a shape", "label": label, "limit": 12}).json()["hits"]
    assert {h["id"] for h in hits} == chosen and all(h["label"] == label for h in hits)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    everything = client.get("/api/search/text", params={"q": "a shape", "limit": 12}).json()["hits"]
    assert [h["id"] for h in hits] == [h["id"] for h in everything if h["id"] in chosen]  # the same order
    assert client.get("/api/search/text", params={"q": "a shape", "label": "no such label"}).json()["hits"] == []


def test_images_are_served_by_id_with_cache_headers(client: httpx.Client, built: dict[str, Any]) -> None:
    image_id = built["ids"]["pic001.png"]
    response = client.get(f"/images/{image_id}")
    assert response.content == (built["corpus_root"] / "images" / "pic001.png").read_bytes()
    assert response.headers["content-type"] == "image/png" and "max-age" in response.headers["cache-control"]
    again = client.get(f"/images/{image_id}", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    thumb = client.get(f"/images/{image_id}/thumbnail", params={"size": 96})
    picture = Image.open(io.BytesIO(thumb.content))
    assert thumb.headers["content-type"] == "image/jpeg" and picture.format == "JPEG" and max(picture.size) == 96
    assert thumb.headers["etag"] != response.headers["etag"] and "max-age" in thumb.headers["cache-control"]
    source = np.asarray(Image.open(built["corpus_root"] / "images" / "pic001.png").convert("RGB").resize(picture.size))
    assert np.abs(np.asarray(picture.convert("RGB"), dtype=float) - source).mean() < 20  # the same picture


def test_cors_is_off(client: httpx.Client) -> None:
    response = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options("/api/search/text", headers={"Origin": "http://evil.example",
                                                            "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers


# --- errors: a status and one line of JSON, never a traceback -------------------------------------------------


def test_bad_queries_get_one_line_errors(client: httpx.Client) -> None:
    assert "empty" in _error(client.get("/api/search/text", params={"q": ""}), 400)
    assert "empty" in _error(client.get("/api/search/text", params={"q": "   "}), 400)
    assert "empty" in _error(client.get("/api/search/text", params={"q": " ", "target": "captions", "mode": "fts"}),
                             400)
    assert "q" in _error(client.get("/api/search/text"), 422)
    assert "limit" in _error(client.get("/api/search/text", params={"q": "x", "limit": 0}), 422)
    assert "target" in _error(client.get("/api/search/text", params={"q": "x", "target": "tables"}), 422)
    assert "at most" in _error(client.get("/api/search/text", params={"q": "x", "offset": 5000}), 400)
    assert "captions" in _error(client.get("/api/search/text", params={"q": "x", "mode": "fts"}), 400)
    assert "unknown mapper" in _error(client.get("/api/search/text", params={"q": "x", "mapper": "mapper-0000"}), 404)
    assert "not found" in _error(client.get("/no/such/route"), 404)
    assert "labels" in _error(client.post("/api/classify", json={"labels": []}), 400)
    assert "{}" in _error(client.post("/api/classify", json={"labels": ["a"], "templates": ["no slot"]}), 400)


def test_bad_uploads_get_one_line_errors(client: httpx.Client, built: dict[str, Any], tmp_path: Path) -> None:
    post = lambda data: client.post("/api/search/image", content=data)  # noqa: E731
    assert "not an image" in _error(post(b"just some text, not a picture"), 415)
    assert "not an image" in _error(post((built["corpus_root"] / "captions.jsonl").read_bytes()), 415)
    assert "not an image" in _error(post(b"\x89PNG\r\n\x1a\n" + b"\0" * 100), 415)  # a broken PNG
    assert "no image" in _error(post(b""), 400)
    assert "upload limit" in _error(post(_noise_png(tmp_path, 420)), 413)
    big = io.BytesIO()
    Image.new("L", (700, 700)).save(big, "PNG")  # small file, 490,000 pixels
    assert len(big.getvalue()) < MAX_UPLOAD_BYTES
    assert "pixel limit" in _error(post(big.getvalue()), 413)


def _noise_png(folder: Path, edge: int) -> bytes:
    """A real PNG over the upload limit (noise does not compress)."""
    path = folder / f"noise-{edge}.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (edge, edge, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    assert len(data) > MAX_UPLOAD_BYTES
    return data


def test_unknown_image_ids_get_404(client: httpx.Client) -> None:
    for route in ("/images/{}", "/images/{}/thumbnail", "/api/images/{}", "/api/images/{}/similar"):
        assert "unknown image id" in _error(client.get(route.format("0" * 32)), 404)
        assert "unknown image id" in _error(client.get(route.format("not-an-id")), 404)


TRAVERSALS = ["../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
              "%2Fetc%2Fpasswd", "/etc/passwd", "..\\..\\etc\\passwd", "....//....//etc/passwd", "%252e%252e%252f",
              "images%2Fpic000.jpg", "pic000.jpg", "%00", "6901f5ce7db82198923ae512a278d1b9/../../../etc/passwd"]


def _raw_get(server: str, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte (httpx would normalise `..` away before sending it)."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("attempt", TRAVERSALS)
def test_path_traversal_in_every_parameter_reads_nothing(server: str, built: dict[str, Any], attempt: str) -> None:
    secrets = (Path("/etc/passwd").read_bytes()[:40], SECRET, built["outside"].read_bytes())
    paths = [f"/images/{attempt}", f"/images/{attempt}/thumbnail", f"/api/images/{attempt}",
             f"/api/images/{attempt}/similar"]
    queries = ["split", "corpus", "mapper", "label", "q"]
    paths += [f"/api/search/text?q=x&{name}={attempt}" for name in queries]
    paths += [f"/api/images/{built['ids']['pic000.jpg']}/similar?{name}={attempt}" for name in queries[:-1]]
    paths += [f"/images/{built['ids']['pic000.jpg']}/thumbnail?size={attempt}"]
    for path in paths:
        status, body = _raw_get(server, path)
        assert not any(secret in body for secret in secrets), path
        if status != 200:  # a filter or a query text that matches nothing is answered, with nothing
            assert 400 <= status < 500 and list(json.loads(body)) == ["error"], (path, status, body[:300])
        elif path.startswith("/api/"):
            hits = json.loads(body).get("hits", [])
            assert all(h["corpus"] == "tiny" for h in hits), path


def test_a_symlink_out_of_the_corpus_root_is_not_followed(client: httpx.Client, built: dict[str, Any]) -> None:
    path = built["corpus_root"] / "images" / "pic010.jpg"
    image_id, original = built["ids"]["pic010.jpg"], path.read_bytes()
    path.unlink()
    path.symlink_to(built["outside"])  # swapped in after ingest: resolves outside the root
    try:
        for route in (f"/images/{image_id}", f"/images/{image_id}/thumbnail?size=192"):
            response = client.get(route)
            assert "outside the corpus root" in _error(response, 404) and SECRET not in response.content
    finally:
        path.unlink()
        path.write_bytes(original)
    assert client.get(f"/images/{image_id}").content == original


# --- the page, in a real browser ------------------------------------------------------------------------------


class Page(Browser):
    """The test_ui browser, with typing, key presses and file choosing."""

    def evaluate(self, expression: str) -> Any:
        return self._evaluate(expression)

    def wait_for(self, ready_js: str, timeout_s: float = 60) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._evaluate(f"(() => {{ try {{ return !!({ready_js}); }} catch (e) {{ return false; }} }})()"):
                time.sleep(0.3)  # a last layout pass
                return True
            time.sleep(0.2)
        return False

    def type_and_enter(self, selector: str, text: str) -> None:
        self._evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self._call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self._call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                       **({"text": "\r"} if kind == "keyDown" else {}))

    def choose_file(self, selector: str, path: Path) -> None:
        root = self._call("DOM.getDocument")["root"]["nodeId"]
        node = self._call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self._call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def click(self, selector: str) -> None:
        self._evaluate(f"document.querySelector({json.dumps(selector)}).click()")


GRID_JS = """JSON.stringify({
  title: document.getElementById('title').textContent,
  error: getComputedStyle(document.getElementById('error')).display === 'none' ? '' :
         document.getElementById('error').textContent,
  cards: [...document.querySelectorAll('#grid .card')].map(c => {
    const img = c.querySelector('img');
    return {id: c.dataset.id, complete: img.complete, width: img.naturalWidth, src: img.getAttribute('src'),
            text: c.innerText, label: (c.querySelector('.label') || {}).textContent || null};
  }),
  captions: [...document.querySelectorAll('#caption-list .caprow')].map(r => r.innerText),
})"""
IMAGES_READY = ("document.querySelectorAll('#grid .card').length && "
                "[...document.querySelectorAll('#grid .card img')].every(i => i.complete && i.naturalWidth > 0)")


@pytest.fixture(scope="module")
def page(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    browser = Page(chromium, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield browser
    finally:
        browser.close()


def _grid(page: Page) -> dict[str, Any]:
    return json.loads(page.evaluate(GRID_JS))


def _shot(page: Page, screenshots: Path, name: str) -> None:
    page.screenshot(screenshots / f"serve-{name}.png")


def test_page_typed_query_shows_real_images_best_first(page: Page, server: str, built: dict[str, Any],
                                                       screenshots: Path) -> None:
    page.open(f"{server}/", "document.getElementById('status').textContent.includes('mapper')")
    page.type_and_enter("#q", "a red circle on a white background")
    assert page.wait_for(IMAGES_READY), _grid(page)
    grid = _grid(page)
    _shot(page, screenshots, "search")
    assert len(grid["cards"]) == 12 and grid["error"] == ""
    assert all(card["complete"] and card["width"] > 0 for card in grid["cards"])  # every thumbnail decoded
    assert grid["cards"][0]["id"] == built["ids"]["pic000.jpg"]
    assert "a red circle on a white background" in grid["cards"][0]["text"]
    assert "more like this" in grid["cards"][0]["text"]
    assert grid["title"] == "Images for “a red circle on a white background”"


def test_page_more_like_this_link(page: Page, server: str, built: dict[str, Any]) -> None:
    page.open(f"{server}/#q=stripes", IMAGES_READY)
    target = _grid(page)["cards"][2]["id"]
    page.click(f".card[data-id='{target}'] a.more")
    assert page.wait_for(f"document.getElementById('title').textContent === 'More like this' && {IMAGES_READY}")
    grid = _grid(page)
    assert grid["cards"][0]["id"] == target and all(card["width"] > 0 for card in grid["cards"])


def test_page_upload_finds_the_image_itself_first(page: Page, server: str, built: dict[str, Any],
                                                  screenshots: Path) -> None:
    page.open(f"{server}/", "document.getElementById('status').textContent.includes('mapper')")
    page.choose_file("#upload", built["corpus_root"] / "images" / "pic007.png")
    assert page.wait_for(f"document.getElementById('title').textContent.startsWith('Similar images') && "
                         f"document.querySelectorAll('#caption-list .caprow').length && {IMAGES_READY}"), _grid(page)
    grid = _grid(page)
    _shot(page, screenshots, "upload")
    assert grid["cards"][0]["id"] == built["ids"]["pic007.png"] and grid["error"] == ""
    assert any("green stripes" in caption for caption in grid["captions"][:2]), grid["captions"]


def test_page_oversized_upload_shows_the_error(page: Page, server: str, screenshots: Path, tmp_path: Path) -> None:
    page.open(f"{server}/", "document.getElementById('status').textContent.includes('mapper')")
    big = tmp_path / "too-big.png"
    big.write_bytes(_noise_png(tmp_path, 420))
    page.choose_file("#upload", big)
    assert page.wait_for("getComputedStyle(document.getElementById('error')).display !== 'none'"), _grid(page)
    _shot(page, screenshots, "upload-too-big")
    assert "too-big.png: the upload is" in _grid(page)["error"] and "over the upload limit" in _grid(page)["error"]


def test_page_filters_by_label(page: Page, server: str, client: httpx.Client, built: dict[str, Any]) -> None:
    counts = client.post("/api/classify", json={"labels": list(COLOURS),
                                                "templates": ["a picture of a {} shape"]}).json()["counts"]
    label = max(counts, key=counts.get)
    page.open(f"{server}/", f"[...document.getElementById('label').options].some(o => o.value === '{label}')")
    page.evaluate(f"document.getElementById('label').value = '{label}'")
    page.type_and_enter("#q", "a shape")
    assert page.wait_for(IMAGES_READY)
    grid = _grid(page)
    assert len(grid["cards"]) == counts[label] and {card["label"] for card in grid["cards"]} == {label}


# --- fresh results while the server runs ----------------------------------------------------------------------


class Hammer:
    """Requests in a loop from a thread, keeping every status and transport error, until stopped."""

    def __init__(self, server: str, routes: list[str]) -> None:
        self.server, self.routes, self.results = server, routes, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server, timeout=120) as http:
            while not self._stop.is_set():
                for route in self.routes:
                    try:
                        self.results.append((route, http.get(route).status_code))
                    except httpx.HTTPError as err:
                        self.results.append((route, repr(err)))

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=180)


def _wait_health(client: httpx.Client, ready: Any, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        health = client.get("/health").json()
        if ready(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.25)


@pytest.mark.skipif(not can_compile_on_cpu(), reason="torch.compile on the CPU needs g++ and the Python headers")
def test_the_query_encoder_compiles_in_the_background_and_keeps_the_answers(server: str, client: httpx.Client,
                                                                             searcher: Searcher) -> None:
    """The service answered from its start (the tests above ran meanwhile); once the compiled encoder is in, the
    answers of concurrent clients are still the in-process (eager) Searcher's."""
    health = _wait_health(client, lambda h: h["query_compile"]["state"] not in ("waiting", "compiling"), 300)
    assert health["query_compile"]["state"] == "compiled", health["query_compile"]
    assert health["query_compile"]["setting"] == "on" and health["query_compile"]["seconds"] > 0
    texts = [f"{text} again" for text in QUERIES]  # not in the vector cache

    def ask(text: str) -> httpx.Response:
        with httpx.Client(base_url=server, timeout=60) as http:
            return http.get("/api/search/text", params={"q": text, "limit": 5})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, texts))
    for text, answer in zip(texts, answers):
        expected = searcher.text_to_image(text, limit=5)
        assert [hit["id"] for hit in answer.json()["hits"]] == [hit.id for hit in expected], text
        assert [hit["score"] for hit in answer.json()["hits"]] == pytest.approx([h.score for h in expected], abs=2e-3)


FAILED_COMPILE = """
import sys, time
from crossalign.search import Searcher
from crossalign.serve.compiling import QueryCompiler
from crossalign.serve.config import ServeConfig
searcher = Searcher(sys.argv[1], device="cpu", precision="fp32")
before = [hit.id for hit in searcher.text_to_image("a red circle", limit=5)]
compiler = QueryCompiler(ServeConfig(compile="auto", autotune=False, device="cpu"))
compiler.submit(searcher)
compiler.start()
deadline = time.monotonic() + 240
while compiler.state in ("waiting", "compiling") and time.monotonic() < deadline:
    time.sleep(0.2)
compiler.submit(searcher)  # a reload: no second attempt
compiler.stop()
compiler._thread.join(60)
after = [hit.id for hit in searcher.text_to_image("a red circle", limit=5)]
print(compiler.state, searcher.queries_compiled, after == before, compiler.error, sep="|")
"""


def test_a_failed_compile_leaves_the_eager_encoder_serving(built: dict[str, Any], tmp_path: Path) -> None:
    """A C++ compiler that fails (here `false`, with an empty Inductor cache): the state says failed with the
    error, the encoder stays eager and answers as before, and no reload tries again."""
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "LANCE_LOG": "error", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FAILED_COMPILE, str(built["workspace"].root)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state, compiled, same, error = done.stdout.strip().splitlines()[-1].split("|", 3)
    assert (state, compiled, same) == ("failed", "False", "True") and error and error != "None"


def test_new_rows_and_a_new_mapper_are_served_without_a_restart(server: str, client: httpx.Client,
                                                                built: dict[str, Any]) -> None:
    workspace, corpus_root = built["workspace"], built["corpus_root"]
    old_mapper = workspace.current_mapper_id()
    routes = ["/api/search/text?q=a+red+circle&limit=5", f"/images/{built['ids']['pic000.jpg']}/thumbnail",
              "/api/search/text?q=circle&target=captions&mode=hybrid&limit=3"]
    with Hammer(server, routes) as hammer:
        write_records(corpus_root, [write_picture(corpus_root, i, "dev") for i in range(12, 16)], "a")
        ingest_and_extract(corpus_root, workspace)
        embed_corpus(workspace, "tiny")  # the same mapper: only the 4 new rows are written
        health = _wait_health(client, lambda h: h["rows"]["images"] == 16)
        assert health["rows"] == {"images": 16, "captions": 38} and health["mapper_id"] == old_mapper
        new_ids = {r["image_id"] for r in read_images(workspace, "tiny").to_pylist()} - set(built["ids"].values())
        assert len(new_ids) == 4
        found = client.get("/api/search/text", params={"q": "a red circle on a black background", "limit": 16})
        assert new_ids <= {hit["id"] for hit in found.json()["hits"]}
        for image_id in new_ids:
            similar = client.get(f"/api/images/{image_id}/similar", params={"limit": 1}).json()
            assert similar["hits"][0]["id"] == image_id
            assert client.get(f"/images/{image_id}/thumbnail").status_code == 200

        options = {**TRAIN_OPTIONS, "seed": 1, "steps": 200}
        new_mapper = fit_mapper(workspace, "tiny", IMAGE_ENCODER, TEXT_ENCODER, TrainConfig(**options)).mapper_id
        assert new_mapper != old_mapper
        embed_corpus(workspace, "tiny")  # the tables switch to the new mapper
        health = _wait_health(client, lambda h: h["mapper_id"] == new_mapper)
        assert health["mapper_id"] == new_mapper and health["rows"]["images"] == 16
        body = client.get("/api/search/text", params={"q": "a red circle on a white background"}).json()
        assert body["mapper_id"] == new_mapper
        older = client.get("/api/search/text", params={"q": "a red circle on a white background",
                                                       "mapper": old_mapper})
        assert older.status_code == 200 and older.json()["mapper_id"] == old_mapper
    failed = [(route, status) for route, status in hammer.results if status != 200]
    assert len(hammer.results) >= 6 and not failed, failed[:5]
