"""The pipeline's artifacts as a person sees them: a real `prefect server`, `crossalign run` against it, and the
run's pages rendered by headless Chromium (Debian `chromium`; `make browser-deps` installs it).

Screenshots (and the rendered DOM) go to `build/ui/` under the repository, or to `$CROSSALIGN_UI_SCREENSHOTS`.
The browser is driven over the DevTools protocol rather than with `--dump-dom`, so that the test can ask it
whether the plot actually decoded (`naturalWidth`) instead of only finding an <img> tag in the markup.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prefect_server import running_server, stop

from crossalign.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = (  # as in shared/notes-prefect.md: without the background-networking flags it tries the network
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1300",  # tall enough for a metrics table and the plot below it in one screenshot
)
PAGE_RENDER_S = 60
# Everything the assertions read from a rendered page, in one round trip.
SNAPSHOT_JS = """document.body && JSON.stringify({
  url: location.href,
  text: document.body.innerText,
  html: document.documentElement.outerHTML,
  tables: [...document.querySelectorAll('table')].map(
    t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()))),
  links: [...document.querySelectorAll('a[href]')].map(a => [a.innerText.trim(), a.getAttribute('href')]),
  images: [...document.images].map(i => ({alt: i.alt, src: i.getAttribute('src') || '', complete: i.complete,
                                          width: i.naturalWidth, height: i.naturalHeight})),
})"""


EMPTY_PAGE = {"url": "", "text": "", "html": "", "tables": [], "links": [], "images": []}


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium executable: a missing one fails the test under CI (skips it elsewhere)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "headless Chromium is not installed: run `make browser-deps` (installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def prefect_server(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `prefect server start` on 127.0.0.1 and a free port; yields the environment that talks to it."""
    with running_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server


@pytest.fixture(scope="module")
def pipeline_run(prefect_server: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`crossalign run` on a tiny corpus (plus one bad record) in a subprocess reporting to the server.

    A subprocess, because the session's other tests hold an in-process `prefect_test_harness`.
    Returns the flow run, its artifacts by key and the workspace.
    """
    from conftest import write_records, write_tiny_corpus

    root = tmp_path_factory.mktemp("ui")
    corpus = write_tiny_corpus(root / "corpus")
    write_records(corpus, [{"image": "images/missing.jpg", "captions": ["a lost picture"], "split": "train"}], "a")
    command = [sys.executable, "-m", "crossalign.cli", "run", "--corpus", str(corpus), "--workspace", str(root / "ws"),
               "--steps", "200", "--image-encoder", "efficientnet-lite0", "--device", "cpu", "--precision", "fp32"]
    run = subprocess.run(command, cwd=REPO, env=prefect_server["env"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"crossalign run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    api = prefect_server["api"]
    flow_runs = httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": ["pipeline"]}}}).json()
    assert len(flow_runs) == 1, flow_runs
    artifacts = httpx.post(f"{api}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [flow_runs[0]["id"]]}}}).json()
    return {"flow_run": flow_runs[0], "artifacts": {a["key"]: a for a in artifacts}, "workspace": root / "ws"}


class Browser:
    """Headless Chromium driven over the DevTools protocol: open a page, wait until it shows something, look."""

    def __init__(self, executable: str, profile: Path) -> None:
        from websockets.sync.client import connect  # a dependency of Prefect

        self._process = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"headless Chromium did not start (exit code {self._process.returncode})")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t["type"] == "page")
        self._socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self._ids = itertools.count(1)

    def _call(self, method: str, **params: Any) -> dict:
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:  # skip events; answers come back in order
            message = json.loads(self._socket.recv(timeout=60))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def _evaluate(self, expression: str) -> Any:
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True)
        return None if "exceptionDetails" in result else result["result"].get("value")

    def open(self, url: str, ready_js: str) -> dict[str, Any]:
        """Load `url` and wait (up to PAGE_RENDER_S) until `ready_js` is true; returns a snapshot of the page.

        The single-page app renders each part after its own API call returns, so "loaded" says nothing: `ready_js`
        must name every element the test asserts on. The snapshot is taken either way, so a timeout fails on the
        assertions, with the page's text in the message.
        """
        self._call("Page.navigate", url=url)
        deadline = time.monotonic() + PAGE_RENDER_S
        while not self._evaluate(f"(() => {{ try {{ return !!({ready_js}); }} catch (e) {{ return false; }} }})()"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.3)
        time.sleep(0.5)  # a last layout pass before the screenshot
        return json.loads(self._evaluate(SNAPSHOT_JS) or json.dumps(EMPTY_PAGE))

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        if hasattr(self, "_socket"):
            self._socket.close()
        stop(self._process)


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    browser = Browser(chromium, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def screenshots() -> Path:
    directory = Path(os.environ.get("CROSSALIGN_UI_SCREENSHOTS") or REPO / "build" / "ui")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def look(browser: Browser, screenshots: Path, prefect_server: dict, request: pytest.FixtureRequest):
    """Open a UI route, save its screenshot and DOM as `<name>.png` / `.html`, print where; return the snapshot."""

    def look(route: str, ready_js: str, name: str) -> dict[str, Any]:
        page = browser.open(prefect_server["ui"] + route, ready_js)
        picture = browser.screenshot(screenshots / f"{name}.png")
        (screenshots / f"{name}.html").write_text(page.get("html", ""))
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n  screenshot of {route}: {picture}")  # shown even when pytest captures output
        return page

    return look


@pytest.fixture(scope="module")
def run_page(pipeline_run: dict, look) -> dict[str, Any]:
    """The flow run's page (v2 UI), on its Artifacts tab."""
    return look(f"/v2/runs/flow-run/{pipeline_run['flow_run']['id']}?tab=Artifacts",
                "document.querySelector('a[href^=\"/v2/flows/flow/\"]') && "  # the flow's name, looked up apart
                "document.querySelectorAll('[data-testid=flow-run-artifacts-grid] a').length >= 5", "flow-run")


def test_run_page_names_the_flow_and_links_every_artifact(pipeline_run: dict, run_page: dict) -> None:
    flow_run = pipeline_run["flow_run"]
    assert flow_run["state_type"] == "COMPLETED"
    assert ["pipeline", f"/v2/flows/flow/{flow_run['flow_id']}"] in run_page["links"], run_page["text"][:2000]
    assert flow_run["name"] in run_page["text"] and "Completed" in run_page["text"]
    links = {href for _, href in run_page["links"] if "/artifacts/artifact/" in href}
    expected = {"ingest-summary", "extract-throughput", "retrieval-metrics", "training-curve", "sample-searches"}
    assert expected <= set(pipeline_run["artifacts"]), sorted(pipeline_run["artifacts"])
    assert {f"/v2/artifacts/artifact/{pipeline_run['artifacts'][key]['id']}" for key in expected} <= links


def _plot(page: dict, alt: str) -> dict[str, Any]:
    images = [i for i in page["images"] if i["alt"] == alt]
    assert len(images) == 1, f"{len(images)} <img alt={alt!r}> on {page['url']}; it shows:\n{page['text'][:2000]}"
    return images[0]


def _table(page: dict, column: str) -> list[list[str]]:
    """The one table on `page` with `column` in its header row, as rows of cell texts (header first)."""
    tables = [t for t in page["tables"] if t and column in t[0]]
    assert len(tables) == 1, f"{len(tables)} tables with a {column!r} column on {page['url']}; it shows:\n" \
                             f"{page['text'][:2000]}"
    return tables[0]


def _mapper_dir(pipeline_run: dict) -> Path:
    workspace = Workspace(pipeline_run["workspace"])
    return workspace.mapper_dir(workspace.current_mapper_id())


def _png_size(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/png;base64,"), data_url[:80]
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size


def test_metrics_page_shows_the_table_and_the_recall_plot(pipeline_run: dict, look) -> None:
    artifact = pipeline_run["artifacts"]["retrieval-metrics"]
    page = look(f"/v2/artifacts/artifact/{artifact['id']}",
                "[...document.images].some(i => i.alt === 'recall@K' && i.complete) && document.querySelector('table') "
                "&& document.querySelector('a[href^=\"/v2/runs/flow-run/\"]')", "retrieval-metrics")
    mapper_dir = _mapper_dir(pipeline_run)
    metrics = json.loads((mapper_dir / "metrics.json").read_text())  # selected on dev, the run's eval split
    assert _table(page, "R@1") == [["direction", "R@1", "R@5", "R@10", "median rank"]] + [
        [label, *(f"{metrics[f'{d}_{m}']:.1f}" for m in ("r1", "r5", "r10")), f"{metrics[f'{d}_medr']:g}"]
        for d, label in (("t2i", "text → image"), ("i2t", "image → text"))]
    assert f"rsum = {metrics['rsum']:.1f}" in page["text"]
    assert f"/v2/runs/flow-run/{pipeline_run['flow_run']['id']}" in [href for _, href in page["links"]]
    plot = _plot(page, "recall@K")
    saved = (mapper_dir / "recall_at_k.png").read_bytes()
    assert plot["src"] == "data:image/png;base64," + base64.b64encode(saved).decode()  # the mapper's own plot
    assert plot["complete"] and (plot["width"], plot["height"]) == _png_size(plot["src"]) != (0, 0)  # it decoded


def test_training_curve_page_shows_the_plot_and_the_steps(pipeline_run: dict, look) -> None:
    artifact = pipeline_run["artifacts"]["training-curve"]
    page = look(f"/v2/artifacts/artifact/{artifact['id']}",
                "[...document.images].some(i => i.alt === 'training curve' && i.complete) "
                "&& document.querySelector('table')", "training-curve")
    plot = _plot(page, "training curve")
    assert plot["complete"] and (plot["width"], plot["height"]) == _png_size(plot["src"]) != (0, 0)
    history = json.loads((_mapper_dir(pipeline_run) / "metrics.json").read_text())["history"]
    rows = _table(page, "dev rsum")[1:]  # head, step, loss, dev rsum
    assert [row[1] for row in rows] == [f"{h['step']:g}" for h in history] and {row[0] for row in rows} == {"0"}
    assert history[-1]["step"] == 200  # --steps 200, evaluated every 100


def test_ingest_page_lists_the_first_rejects(pipeline_run: dict, look) -> None:
    artifact = pipeline_run["artifacts"]["ingest-summary"]
    page = look(f"/v2/artifacts/artifact/{artifact['id']}",
                "[...document.querySelectorAll('table')].some(t => t.innerText.includes('source'))", "ingest-summary")
    rejects = _table(page, "source")
    assert rejects[0] == ["kind", "reason", "source", "message"]
    assert [row[:3] for row in rejects[1:]] == [["image", "missing_file", "images/missing.jpg"]]
