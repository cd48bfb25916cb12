"""``sris demo`` served for real (a subprocess on a free port, on the short-trained tiny model) and
driven by a headless Chromium (Debian's ``chromium``, through Playwright) and by ``gradio_client``.

Chromium must be at /usr/bin/chromium (CI installs it: ``.ci/run``); without it these tests fail,
unless SRIS_SKIP_BROWSER=1 is set. SRIS_DEMO_SCREENSHOT=docs/demo.png also saves the page's
screenshot there (the README's picture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from fixtures_predict import short_run  # noqa: F401
from hostile_fixtures import bomb_png
from PIL import Image

from shared_ris.predict import predict_folder
from shared_ris.predictor import Predictor, open_image

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# --disable-background-networking and friends: with no network, Chromium's own calls home fail slowly
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip
MAX_UPLOAD_MB = 1  # the server's --max-upload-mb: a 1.5 MB file is too big
SECOND_TEXT = "the green circle"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    roots: list[Path]  # the server's TMPDIR, HOME and working folder: empty once it has stopped
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(checkpoint: Path, root: Path) -> Server:
    roots = [root / "tmp", root / "home", root / "cwd"]
    for folder in roots:
        folder.mkdir(parents=True)
    port, log = free_port(), root / "server.log"
    env = {**os.environ, "TMPDIR": str(roots[0]), "HOME": str(roots[1])}
    command = [sys.executable, "-m", "cli.main", "demo", "--checkpoint", str(checkpoint), "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB)]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=roots[2], env=env, stdout=output, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}/", process, roots, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sris demo exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(server.url, timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"sris demo did not answer within 90 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(short_run, tmp_path_factory):
    running = start_server(short_run, tmp_path_factory.mktemp("demo_server"))
    yield running
    if running.process.poll() is None:  # a test failed before the last one stopped it
        running.process.kill()
        running.process.wait()


@pytest.fixture(scope="module")
def example(short_run) -> tuple[Path, str]:
    """A held-out synthetic scene (a large blue circle among other shapes) and its expression."""
    folder = short_run.parent.parent / "examples"
    prompt = json.loads((folder / "prompts.jsonl").read_text().splitlines()[1])
    return folder / prompt["file"], prompt["text"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        if os.environ.get("SRIS_SKIP_BROWSER") == "1":
            pytest.skip("SRIS_SKIP_BROWSER=1 and no /usr/bin/chromium")
        pytest.fail("no /usr/bin/chromium: apt-get install -y --no-install-recommends chromium (or set SRIS_SKIP_BROWSER=1)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def open_page(browser, server: Server):
    """A fresh page on the demo, recording any request that leaves the server."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.outside = []
    page.on("request", lambda r: page.outside.append(r.url) if r.url.startswith("http") and not r.url.startswith(server.url) else None)
    page.goto(server.url)
    page.wait_for_selector("#segment")
    return page


def submit(page, image: Path, text: str, preview: bool = True) -> None:
    page.locator("#image input[type=file]").set_input_files(str(image))
    if preview:  # the upload is done once the page shows it
        page.locator("#image img").first.wait_for(timeout=30_000)
    page.locator("#text textarea").fill(text)
    page.click("#segment")


def fetch_image(page, url: str) -> np.ndarray:
    response = page.request.get(url)
    assert response.ok, url
    return np.asarray(Image.open(BytesIO(response.body())))


def expected_mask(checkpoint: Path, image: Path, text: str, out: Path) -> np.ndarray:
    """``sris predict``'s mask PNG for one image and text."""
    predict_folder(image, text, checkpoint, out_dir=out)
    return np.asarray(Image.open(out / f"{image.stem}.mask.png"))


def test_page_segments_an_upload(browser, server, example, short_run, tmp_path):
    image, text = example
    page = open_page(browser, server)
    assert "recipe tiny" in page.inner_text("body") and "trained on synthetic for 300 steps" in page.inner_text("body")
    assert page.get_by_text("synthetic scenes the model has not seen").count() == 1  # the examples are offered
    submit(page, image, f"{text}\n{SECOND_TEXT}")
    page.wait_for_function("document.querySelectorAll('#masks a').length == 2", timeout=60_000)
    page.screenshot(path=tmp_path / "demo.png", full_page=True)
    if os.environ.get("SRIS_DEMO_SCREENSHOT"):
        shutil.copyfile(tmp_path / "demo.png", os.environ["SRIS_DEMO_SCREENSHOT"])

    links = page.locator("#masks a").evaluate_all("links => links.map(a => a.href)")
    masks = [fetch_image(page, href) for href in links]
    assert [href.rsplit("/", 1)[1] for href in links] == ["mask1_the_large_blue_circle.png", "mask2_the_green_circle.png"]
    for number, (mask, expression) in enumerate(zip(masks, [text, SECOND_TEXT])):
        assert np.array_equal(mask, expected_mask(short_run, image, expression, tmp_path / f"predict{number}")), expression
    union = (masks[0] == 255) | (masks[1] == 255)
    assert union.any()

    overlay = fetch_image(page, page.locator("#overlay img").get_attribute("src"))
    changed = (overlay != np.asarray(open_image(image))).any(axis=2)  # a PNG: exact pixels
    assert np.array_equal(changed, union)  # tinted and outlined inside the masks, untouched elsewhere
    table = page.inner_text("#table")
    assert text in table and SECOND_TEXT in table and "yellow" in table  # yellow: the palette's contrast to blue
    assert page.locator("#attention img").count() == 6  # encoder, FPN, decoder for each expression
    assert page.outside == []  # nothing phones home
    page.close()


def page_message(page) -> str:
    """The error message the page shows, then closed."""
    toast = page.locator(".toast-body").first
    toast.wait_for(timeout=30_000)
    text = toast.inner_text()
    for close in page.locator(".toast-close").all():
        close.click()
    page.locator(".toast-body").first.wait_for(state="detached", timeout=10_000)
    return text


def test_bad_input_is_a_message_and_the_server_goes_on(browser, server, example, tmp_path):
    image, text = example
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.png").write_text("not an image either")
    (tmp_path / "huge.png").write_bytes(bomb_png())  # 20000 × 20000, a few KB
    (tmp_path / "heavy.jpg").write_bytes(np.random.default_rng(0).bytes(int(1.5 * 2**20)))
    cases = [
        ("notes.txt", text, False, "Invalid file type"),  # refused by the page itself
        ("fake.png", text, True, "fake.png is not an image we can read"),
        ("huge.png", text, True, "the image is too large: over Pillow's limit"),
        ("heavy.jpg", text, False, f"exceed the maximum allowed size of {MAX_UPLOAD_MB}"),
    ]
    page = open_page(browser, server)
    for name, expression, preview, message in cases:
        submit(page, tmp_path / name, expression, preview)
        shown = page_message(page)
        assert message in shown and "Traceback" not in shown, (name, shown)
    submit(page, image, "  \n ")
    assert "empty referring expression in the text box" in page_message(page)
    submit(page, image, text)  # and the server still answers
    page.wait_for_function("document.querySelectorAll('#masks a').length == 1", timeout=60_000)
    assert "Traceback" not in page.inner_text("body")
    page.close()


def test_http_api_matches_the_predictor(server, example, short_run, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    image, text = example
    client = Client(server.url, download_files=str(tmp_path), verbose=False)
    overlay, attention, masks, table = client.predict(handle_file(str(image)), text, api_name="/segment")
    expected = Predictor.from_checkpoint(short_run).predict([open_image(image)], text)[0]
    assert np.array_equal(np.asarray(Image.open(masks[0])) == 255, expected.mask)
    assert table["data"][0][2:5] == [text, expected.area, round(expected.mean_prob, 4)]
    assert Image.open(overlay).size == Image.open(image).size and len(attention) == 3
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(AppError, match="notes.txt is not an image we can read"):  # past the page's own type check
        client.predict(handle_file(str(tmp_path / "notes.txt")), text, api_name="/segment")
    overlay, *_ = client.predict(handle_file(str(image)), text, api_name="/segment")
    assert Path(overlay).is_file()


def test_stopping_leaves_nothing_behind(server):
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.log.read_text()[-2000:]
    left = {str(root): sorted(p.name for p in root.iterdir()) for root in server.roots}
    assert all(not names for names in left.values()), left  # uploads, examples, masks, caches: all gone
