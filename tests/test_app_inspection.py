"""The web app's service layer without a server: the threshold rule, defaults, upload checks, the lock, CSV,
the page's callbacks, and `ppiad serve`'s start-up checks (with a stand-in model and no network)."""
import csv
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ppiad.app.inspection import (InputError, Inspection, Inspector, check_threshold, decide, default_threshold,
                                  read_upload, results_csv)
from ppiad.eval.predictor import Prediction

from tests.conftest import load_tool


class DarkIsDefect:
    """P(defect) = 1 - mean brightness; remembers the largest number of concurrent calls."""

    def __init__(self, delay=0.0):
        self.delay, self.active, self.max_active, self.calls = delay, 0, 0, 0

    def predict(self, images, object_names):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        self.calls += 1
        out = []
        for im in images:
            p = 1.0 - float(np.asarray(im).mean()) / 255.0
            letter = "A" if p >= 0.5 else "B"
            out.append(Prediction(f"<think>brightness</think> <answer>{letter}</answer>", "brightness", letter, True, p))
        self.active -= 1
        return out


def _png_bytes(value, size=(64, 48)):
    buf = io.BytesIO()
    Image.new("RGB", size, (value,) * 3).save(buf, format="PNG")
    return buf.getvalue()


def test_decide_uses_the_threshold_and_falls_back_to_the_letter():
    assert decide(0.7, "B", 0.5) == "defect" and decide(0.3, "A", 0.5) == "normal"
    assert decide(0.5, None, 0.5) == "defect"  # P(defect) >= t
    assert decide(None, "A", 0.5) == "defect" and decide(None, "B", 0.9) == "normal"
    assert decide(None, None, 0.5) == "unknown"
    assert Inspection("x", "o", error="bad").verdict(0.5) == "error"


def test_check_threshold():
    assert check_threshold("0.25") == 0.25 and check_threshold(1) == 1.0
    for bad in ("abc", None, -0.1, 1.01, "nan"):
        with pytest.raises(InputError, match="threshold"):
            check_threshold(bad)


def test_default_threshold_sources(tmp_path):
    assert default_threshold(None, -1.0) == (0.5, "default")
    assert default_threshold(None, 0.3) == (0.3, "eval.threshold")
    run = tmp_path / "eval_run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"calibrated": {"threshold": 0.8125, "fpr": 0.01}}))
    t, source = default_threshold(str(run), 0.3)  # the folder or the file; the calibrated value wins
    assert t == 0.8125 and "calibrated" in source and "metrics.json" in source
    assert default_threshold(str(run / "metrics.json"))[0] == 0.8125
    (tmp_path / "plain.json").write_text(json.dumps({"overall": {}}))
    with pytest.raises(InputError, match="no calibrated threshold.*--calibrate"):
        default_threshold(str(tmp_path / "plain.json"))
    with pytest.raises(InputError, match="cannot read"):
        default_threshold(str(tmp_path / "missing.json"))


def test_read_upload_checks():
    img = read_upload(_png_bytes(10), "a.png", 10**6)
    assert img.mode == "RGB" and img.size == (64, 48)
    gray = io.BytesIO()
    Image.new("I;16", (20, 20), 4000).save(gray, format="PNG")
    assert read_upload(gray.getvalue(), "g.png", 10**6).mode == "RGB"  # the one loader's conversions apply
    for data, name, msg in ((b"", "e.png", "'e.png' is empty"), (os.urandom(500), "r.png", "not a recognised"),
                            (_png_bytes(10)[:60], "cut.png", "truncated"),
                            (b"x" * 2001, "big.png", "too large: 0.0 MB, the limit is 0.0 MB")):
        with pytest.raises(InputError) as exc:
            read_upload(data, name, 2000)
        assert msg in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="'evil.png'"):  # a path in the name is not followed
        read_upload(os.urandom(100), "../../evil.png", 10**6)


def test_inspector_queues_concurrent_calls():
    model = DarkIsDefect(delay=0.05)
    inspector = Inspector(model, batch_size=2)
    imgs = [Image.new("RGB", (8, 8), (v,) * 3) for v in (0, 250, 30)]
    results = []
    threads = [threading.Thread(target=lambda: results.append(inspector.inspect(imgs, ["a", "b", "c"], "gear")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.max_active == 1 and model.calls == 6 and inspector.images_inspected == 9
    for res in results:
        assert [r.name for r in res] == ["a", "b", "c"] and [r.verdict(0.5) for r in res] == ["defect", "normal",
                                                                                               "defect"]


def test_results_csv():
    rows = [Inspection("a.png", "gear", 0.9, "A", True, "dark"), Inspection("b.png", "gear", error="'b.png': empty")]
    parsed = list(csv.DictReader(io.StringIO(results_csv(rows, 0.95))))
    assert [r["verdict"] for r in parsed] == ["normal", "error"]  # 0.9 < 0.95
    assert parsed[0]["p_defect"] == "0.900000" and parsed[1]["error"] == "'b.png': empty"


def test_page_callbacks_without_a_browser(tmp_path):
    from ppiad.app.server import AppInfo, Page

    folder = tmp_path / "washer"
    folder.mkdir()
    for name, v in (("dark.png", 20), ("light.png", 240)):
        Image.new("RGB", (40, 40), (v,) * 3).save(folder / name)
    (folder / "broken.png").write_bytes(b"nope")
    (folder / "readme.txt").write_text("x")
    info = AppInfo(model="m", adapter=None, threshold=0.5, threshold_source="default", default_object="product",
                   folder_root=str(tmp_path), object_names={"washer": "metal washer"})
    page = Page(Inspector(DarkIsDefect()), info, str(tmp_path))
    state, summary, table, gallery, csv_path = page.run(None, str(folder), "", 0.5)
    assert "3 images: 1 defect, 1 normal, 1 not inspected" in summary and "1 non-image entries" in summary
    assert [row[0] for row in table] == ["dark.png", "light.png", "broken.png"]  # by P(defect), errors last
    assert state["items"][0][0].object == "metal washer"  # the folder's name, through data.object_names
    assert len(gallery) == 2 and os.path.isfile(csv_path)
    # Live threshold: the same results re-decided, no model call.
    calls = page.inspector.predictor.calls
    summary, table, _, csv_again = page.render(state, 0.01)
    assert "2 defect, 0 normal" in summary and page.inspector.predictor.calls == calls
    assert "1 non-image entries" in summary  # what the run found is still said
    assert csv_again == csv_path and "light.png,metal washer,defect,0.058824,0.01," in open(csv_path).read()
    # Messages, not exceptions, for what the user can fix.
    assert "nothing to inspect" in page.run([], "", "", 0.5)[1]
    assert "outside the folder" in page.run(None, "/", "", 0.5)[1]
    assert "not both" in page.run([str(folder / "dark.png")], str(folder), "", 0.5)[1]
    one = page.run([str(folder / "dark.png")], "", "gear", 0.5)[1]
    assert "Verdict: DEFECT" in one and "object: gear" in one and "Reasoning:** brightness" in one


def test_serve_checks_before_loading_the_model(tmp_path, capsys):
    serve = load_tool("serve")
    (tmp_path / "metrics.json").write_text(json.dumps({"calibrated": {"threshold": 0.7}}))
    loaded, served = [], []

    def factory(cfg):
        loaded.append(cfg)
        return DarkIsDefect()

    argv = ["--model", str(tmp_path), "--metrics", str(tmp_path), "--port", "0"]
    for extra, msg in (([], "--port must be in"), (["--port", "8000", "--folder_root", str(tmp_path / "no")],
                                                    "is not a folder"),
                       (["--port", "8000", "--metrics", str(tmp_path / "none.json")], "cannot read")):
        with pytest.raises(SystemExit) as exc:
            serve.main(argv + extra, predictor_factory=factory, serve=lambda *a: served.append(a))
        assert exc.value.code == 2 and msg in capsys.readouterr().err
    assert not loaded and not served
    import socket

    with socket.socket() as s:  # a port that is free now (serve checks it can bind before the model loads)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert serve.main(argv + ["--port", str(port)], predictor_factory=factory,
                      serve=lambda app, host, port: served.append((app, host, port))) == 0
    assert len(loaded) == 1 and served[0][1:] == ("127.0.0.1", port)
    out = capsys.readouterr().out
    assert "threshold 0.7000 (calibrated" in out and "model loaded in" in out
