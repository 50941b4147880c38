"""DreamPainter Studio in a real browser: the system's Chromium, driven by Playwright, against
``dreampainter studio`` serving a tiny saved pipeline on a free local port (no network, no mocks).

The screenshot of the page with a result is saved as ``tests/artifacts/studio.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from dreampainter.studio.inputs import Limits, Placement, load_product, place_product
from dreampainter.toy.pipeline import build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The network is closed: without these Chromium waits on connections it tries to make.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WAIT_MS = 60_000  # for every wait (page actions and expect): a loaded 2-core CI machine is slow
expect.set_options(timeout=WAIT_MS)

NO_CHROMIUM = "no chromium on PATH (`make test` installs Debian's chromium when run as root; or: apt-get install chromium)"
if CHROMIUM is None and os.environ.get("DREAMPAINTER_REQUIRE_BROWSER"):  # CI (.ci/run): never skip silently
    raise RuntimeError(NO_CHROMIUM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``dreampainter studio`` in a subprocess; its output is drained (and kept for failure messages)."""

    def __init__(self, pipeline: Path) -> None:
        self.port = _free_port()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "OMP_NUM_THREADS": "1",
        }
        command = [
            sys.executable, "-m", "dreampainter.cli", "studio", "--pipeline", str(pipeline),
            "--port", str(self.port), "--device", "cpu", "--steps", "2", "--canvas-side", "64",
            "--max-upload-mb", "1",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 180
        while not self.ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("the studio did not start:\n" + "".join(self.lines[-40:]))
        self.url = f"http://127.0.0.1:{self.port}/"

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "DreamPainter Studio on http://127.0.0.1:" in line:
                self.ready.set()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio_browser")
    build_tiny_pipeline(root / "tokenizer").save_pretrained(root / "pipe")
    rng = np.random.default_rng(0)
    cutout = np.zeros((40, 30, 4), np.uint8)
    cutout[..., :3] = rng.integers(0, 256, (40, 30, 3))
    cutout[6:34, 5:25, 3] = 255
    Image.fromarray(cutout, "RGBA").save(root / "cutout.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(root / "reference.png")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


@pytest.fixture(scope="module")
def server(files):
    studio = Server(files / "pipe")
    yield studio
    studio.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server.url)
    expect(page.locator("#generate")).to_be_visible()
    yield page
    context.close()


def _status(page):
    return page.locator("#studio-status")


def test_generate_download_exact_product_after_an_error(page, server, files, tmp_path):
    """A broken upload shows its one-line error in the page; then cut-out + reference + placement +
    prompt (+ the comparison without reference) -> results; the selected one's downloaded PNG has the
    canvas size and the product's exact pixels."""
    page.locator("#product-file input[type=file]").set_input_files(files / "broken.png")
    expect(_status(page)).to_contain_text("Error: product: not a decodable image")
    assert "Traceback" not in page.content()

    page.locator("#product-file button[aria-label='Clear']").first.click()
    page.locator("#product-file input[type=file]").set_input_files(files / "cutout.png")
    expect(_status(page)).to_contain_text("Product ready: 64x64 canvas")
    page.locator("#canvas").get_by_label("4:5").check()
    expect(_status(page)).to_contain_text("Product ready: 48x64 canvas")
    page.locator("#scale input[type=number]").fill("0.8")
    page.locator("#scale input[type=number]").press("Enter")
    page.locator("#reference-files input[type=file]").set_input_files([files / "reference.png"])
    page.locator("#prompt textarea").fill("a marble table, soft light")
    page.get_by_label("Compare with / without reference").check()
    page.locator("#generate").click()
    expect(_status(page)).to_contain_text("Generated 2 image(s)")
    expect(page.locator("#settings")).to_contain_text('"reference": "reference.png"')
    expect(page.locator("#settings")).to_contain_text('"scale": 0.8')  # the placement used is the one set
    page.locator("#results .thumbnail-item").nth(1).click()  # the text-only comparison
    expect(page.locator("#settings")).to_contain_text('"reference": null')

    with page.expect_download() as download:
        page.locator("#download").click()
    path = tmp_path / "result.png"
    download.value.save_as(path)
    result = Image.open(path)
    assert result.format == "PNG" and result.size == (48, 64)
    limits = Limits()
    expected = place_product(
        load_product("cutout", files / "cutout.png", None, limits),
        Placement(canvas="4:5", long_side=64, scale=0.8),
        limits,
    )
    full = expected.product_mask == 255
    pixels = np.asarray(result.convert("RGB"))
    assert full.sum() > 500 and np.array_equal(pixels[full], np.asarray(expected.image)[full])
    assert (pixels[expected.product_mask == 0] != 255).any()  # the background was painted

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "studio.png", full_page=True)
    print(f"screenshot: {ARTIFACTS / 'studio.png'}")

    page.locator("#use-settings").click()
    expect(_status(page)).to_contain_text("Settings loaded")
    assert server.process.poll() is None


def test_mask_brush_strokes_change_the_mask(page, files):
    """Paint 'remove' (the second brush colour) across the product, apply: the page reports changed pixels."""
    page.locator("#product-file input[type=file]").set_input_files(files / "cutout.png")
    expect(_status(page)).to_contain_text("Product ready")
    editor = page.locator("#mask-editor")
    editor.scroll_into_view_if_needed()
    editor.get_by_label("Color").first.click()
    page.locator("#mask-editor button.color").nth(1).click()
    editor.get_by_label("Color").first.click()
    editor.get_by_label("Brush Size").first.click()
    editor.locator("input[type=range]").first.fill("3")
    editor.get_by_label("Brush Size").first.click()
    box = editor.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 60, y)
    page.mouse.down()
    for step in range(1, 6):  # few moves: each one re-renders the canvas (slow without a GPU)
        page.mouse.move(x - 60 + 24 * step, y + 1)
    page.mouse.up()
    page.locator("#apply-mask").click()
    expect(_status(page)).to_contain_text("Mask edits applied")
    changed = int(_status(page).inner_text().split("applied: ")[1].split()[0])
    assert changed > 20


def _call(server, api_name: str, data: list) -> str:
    """One call of a page event over gradio's HTTP API; the event stream it answers."""
    request = urllib.request.Request(
        f"{server.url}gradio_api/call/{api_name}",
        data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{server.url}gradio_api/call/{api_name}/{event_id}", timeout=30) as response:
        return response.read().decode()


def _upload(server, path: Path) -> str:
    """Upload a file as the page does; the server-side path gradio gives it."""
    boundary = "----studio-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{server.url}gradio_api/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())[0]


def test_the_server_refuses_server_file_paths(server, files):
    """A request naming a file on the server (not an upload) is refused before the studio opens it;
    the same file uploaded works."""
    placement = ["1:1", 64, 512, 512, 0.6, 0.5, 0.5, 0.05]
    on_server = {"path": str(files / "cutout.png"), "meta": {"_type": "gradio.FileData"}}
    stream = _call(server, "preview", ["cutout", on_server, None, *placement])
    assert "event: error" in stream and "Product ready" not in stream, stream
    uploaded = {"path": _upload(server, files / "cutout.png"), "meta": {"_type": "gradio.FileData"}}
    assert "Product ready: 64x64 canvas" in _call(server, "preview", ["cutout", uploaded, None, *placement])
    assert server.process.poll() is None
