"""ppiad serve: the JSON API over HTTP and the page in a real headless browser, on the tiny stand-in model.

One server process (`python -m ppiad serve`, as a user starts it) binds to 127.0.0.1 on a free port for the
module and is stopped at the end. The API is driven with httpx (uploads of a real-size image, corrupt, empty,
truncated and too-large files, concurrent requests); the page with Playwright driving Debian's Chromium
(/usr/bin/chromium; `.ci/run` installs it): load, upload, read the verdict, move the threshold, download the CSV.
The browser test writes a screenshot; set PPIAD_APP_SCREENSHOT=docs/img/app.png to refresh the README's.
"""
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_UPLOAD_MB = 3

httpx = pytest.importorskip("httpx")
pytest.importorskip("gradio", reason="gradio is in requirements.txt; install it to test the web app")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _part_image(path, size=(1024, 768), seed=0):
    """A real-size 'product' photo stand-in: a smooth woven texture with mild noise (a ~1 MB PNG)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 140 + 40 * np.sin(xx / 6.0) * np.cos(yy / 9.0)
    img = np.stack([base, base * 0.9, base * 0.8], -1) + rng.normal(0, 4, (h, w, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ppiad.models.tiny import build_tiny_checkpoint

    base = tmp_path_factory.mktemp("serve")
    build_tiny_checkpoint(str(base / "tiny"), seed=0)
    (base / "cfg.yaml").write_text("model:\n  path: tiny\n  max_pixels: 12544\n"
                                   "eval:\n  max_new_tokens: 8\n  batch_size: 4\n")
    images = base / "images"
    images.mkdir()
    good = _part_image(images / "part.png")
    _part_image(images / "part_b.png", seed=1)
    (images / "notes.txt").write_text("not an image")
    port = _free_port()
    log = open(base / "server.log", "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "ppiad", "serve", "-c", "cfg.yaml", "--host", "127.0.0.1",
                             "--port", str(port), "--max_upload_mb", str(MAX_UPLOAD_MB), "--folder_root", str(base)],
                            cwd=base, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{(base / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not answer in 180 s:\n{(base / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "base": base, "good": good, "images": images, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _inspect(server, path=None, data=None, name="part.png", **form):
    content = data if data is not None else open(path, "rb").read()
    return httpx.post(f"{server['url']}/api/inspect", files={"image": (name, content, "image/png")},
                      data={k: str(v) for k, v in form.items()}, timeout=120)


def _assert_400(resp, *fragments):
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert "\n" not in err and all(f in err for f in fragments), err


def test_health(server):
    health = httpx.get(f"{server['url']}/api/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["adapter"] is None
    assert health["threshold"] == 0.5 and health["threshold_source"] == "default"


def test_inspect_a_real_size_image(server):
    resp = _inspect(server, server["good"], object="fabric")
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert set(out) >= {"verdict", "p_defect", "reasoning", "answer_valid", "threshold"}
    p = out["p_defect"]
    assert 0.0 < p < 1.0 and out["threshold"] == 0.5 and out["object"] == "fabric"
    assert out["verdict"] == ("defect" if p >= 0.5 else "normal")
    assert isinstance(out["reasoning"], str) and isinstance(out["answer_valid"], bool)
    # The threshold decides: 0 -> every scored image is a defect, 1 -> none is (P < 1); same P(defect).
    low, high = _inspect(server, server["good"], object="fabric", threshold=0).json(), \
        _inspect(server, server["good"], object="fabric", threshold=1).json()
    assert (low["verdict"], high["verdict"]) == ("defect", "normal")
    assert low["p_defect"] == high["p_defect"] == p and (low["threshold"], high["threshold"]) == (0.0, 1.0)


def test_bad_uploads_get_400_and_the_server_keeps_serving(server, tmp_path):
    good = open(server["good"], "rb").read()
    _assert_400(_inspect(server, data=os.urandom(4000), name="noise.png"), "'noise.png'", "not a recognised image")
    _assert_400(_inspect(server, data=good[: len(good) // 2], name="cut.png"), "'cut.png'", "truncated")
    _assert_400(_inspect(server, data=b"", name="empty.png"), "'empty.png'", "empty")
    _assert_400(_inspect(server, data=b"\x89PNG" + b"\0" * int(MAX_UPLOAD_MB * 1e6), name="huge.png"),
                "'huge.png'", "too large", f"limit is {MAX_UPLOAD_MB:.1f} MB")
    _assert_400(_inspect(server, data=b"hello", name="notes.txt"), "'notes.txt'")
    _assert_400(_inspect(server, server["good"], threshold="abc"), "threshold")
    _assert_400(_inspect(server, server["good"], threshold=1.5), "threshold", "[0, 1]")
    _assert_400(httpx.post(f"{server['url']}/api/inspect", data={"object": "x"}), "'image'")
    assert httpx.get(f"{server['url']}/api/health").status_code == 200
    assert _inspect(server, server["good"]).status_code == 200


def test_concurrent_requests_queue_on_one_model(server):
    before = httpx.get(f"{server['url']}/api/health").json()["images_inspected"]
    alone = _inspect(server, server["good"], object="gear").json()
    results = [None] * 4

    def call(i):
        results[i] = _inspect(server, server["good"], object="gear")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 4
    # Requests that waited for each other got exactly the answer of a request on its own.
    assert all(r.json() == alone for r in results)
    assert httpx.get(f"{server['url']}/api/health").json()["images_inspected"] == before + 5
    log = (server["base"] / "server.log").read_text()
    assert log.count("model loaded in") == 1  # loaded once, at start


# ---------------------------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium; .ci/run does it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _summary_with(page, text, timeout=120_000):
    page.wait_for_function("t => { const e = document.querySelector('#summary'); return e && e.innerText.includes(t); }",
                           arg=text, timeout=timeout)
    return page.inner_text("#summary")


def _wait_uploaded(page, *names):
    """Until the upload box lists every file (Gradio may split a name and its extension over two elements)."""
    page.wait_for_function("names => { const e = document.querySelector('#images'); if (!e) return false;"
                           " const t = e.innerText.replace(/\\s/g, ''); return names.every(n => t.includes(n)); }",
                           arg=list(names), timeout=60_000)


def _set_threshold(page, value):
    box = page.locator("#threshold input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def test_page_upload_verdict_threshold_csv(server, browser, tmp_path):
    api = _inspect(server, server["good"]).json()  # what the API says for the same image and default object
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server["url"] + "/")
    page.wait_for_selector("#inspect", timeout=60_000)
    page.locator("#images input[type=file]").set_input_files([server["good"]])
    _wait_uploaded(page, "part.png")
    page.click("#inspect")
    text = _summary_with(page, "Verdict:")
    assert f"Verdict: {api['verdict'].upper()}" in text
    assert f"P(defect) = {api['p_defect']:.3f}" in text and "object: product" in text

    # The threshold re-decides the verdict live, without running the model again.
    inspected = httpx.get(f"{server['url']}/api/health").json()["images_inspected"]
    _set_threshold(page, 0)
    assert "Verdict: DEFECT" in _summary_with(page, ">= 0.00")
    _set_threshold(page, 1)
    assert "Verdict: NORMAL" in _summary_with(page, "< 1.00")
    assert httpx.get(f"{server['url']}/api/health").json()["images_inspected"] == inspected

    # The CSV download holds the result at the current threshold.
    href = page.locator("#csv a[href]").first.get_attribute("href")
    rows = list(csv.DictReader(io.StringIO(httpx.get(href if href.startswith("http") else server["url"] + href).text)))
    assert len(rows) == 1 and rows[0]["file"] == "part.png" and rows[0]["verdict"] == "normal"
    assert abs(float(rows[0]["p_defect"]) - api["p_defect"]) < 1e-6 and float(rows[0]["threshold"]) == 1.0

    _set_threshold(page, 0.5)
    _summary_with(page, "0.50 (threshold)")
    page.wait_for_function("() => { const imgs = [...document.querySelectorAll('#gallery img')];"
                           " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
                           timeout=60_000)
    page.wait_for_timeout(500)  # let the re-rendered gallery settle before the screenshot
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True, timeout=120_000)  # slow on a loaded 2-core machine
    assert Image.open(shot).size[0] >= 1400
    if os.environ.get("PPIAD_APP_SCREENSHOT"):
        shutil.copy(shot, os.environ["PPIAD_APP_SCREENSHOT"])
    page.close()


def test_page_reports_bad_files_and_reads_a_server_folder(server, browser, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(os.urandom(3000))
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server["url"] + "/")
    page.wait_for_selector("#inspect", timeout=60_000)
    page.locator("#images input[type=file]").set_input_files([server["good"], str(bad)])
    _wait_uploaded(page, "part.png", "broken.png")
    page.click("#inspect")
    text = _summary_with(page, "2 images:")
    assert "1 not inspected" in text and "'broken.png': not a recognised image format" in text
    table = page.inner_text("#results")
    assert "part.png" in table and "broken.png" in table and "not a recognised image format" in table

    # A folder on the server instead of uploads: its name is the object; non-images are skipped and counted.
    page.locator("#images button[aria-label='Clear']").first.click()
    folder = page.locator("#folder textarea, #folder input").first
    folder.fill(str(server["images"]))
    page.click("#inspect")
    text = _summary_with(page, "non-image entries")
    assert "2 images:" in text and "1 non-image entries of the folder skipped" in text and "not inspected" not in text
    assert "part_b.png" in page.inner_text("#results")
    assert page.locator("#gallery img").count() >= 2
    # A folder outside --folder_root is refused with a message; the page keeps working.
    folder.fill(str(tmp_path.parent.parent))
    page.click("#inspect")
    assert "outside the folder the server may read" in _summary_with(page, "outside")
    page.close()
