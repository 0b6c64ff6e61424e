"""`vit-mqa demo`: the page in a real headless Chromium, driven by Selenium, served by a
real `python -m vit_mqa demo` subprocess over a really trained run.

The browser tests need Debian's chromium and chromium-driver packages, gradio and
selenium; without them they are skipped with the reason. Selenium is given the driver
path, so Selenium Manager never runs (it would try to download a browser).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from vit_mqa.apps.demo import BLANK_MESSAGE, DemoModel, attention_layout, layout_markdown, upscale
from vit_mqa.evaluation.explain import attention_rollout, overlay
from vit_mqa.models.vit import VisionTransformer, ViTConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
START_TIMEOUT = 90  # seconds for the server to print its URL (gradio's import is slow)
WAIT = 30  # seconds for anything on the page

HAVE_GRADIO = importlib.util.find_spec("gradio") is not None
HAVE_SELENIUM = importlib.util.find_spec("selenium") is not None
needs_gradio = pytest.mark.skipif(not HAVE_GRADIO,
                                  reason="gradio not installed: pip install 'vit-mqa[demo]'")
needs_browser = pytest.mark.skipif(
    not (HAVE_GRADIO and HAVE_SELENIUM and CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="browser tests need gradio and selenium (pip install -e '.[test]') and "
           f"{CHROMIUM} + {CHROMEDRIVER} (apt-get install chromium chromium-driver)")


# ---------------------------------------------------------------- no browser


def test_layout_describes_each_kind_of_attention():
    def layout(heads: int, kv: int) -> list[dict]:
        model = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2,
                                            num_heads=heads, num_kv_heads=kv))
        return attention_layout(model)

    assert [r["text"] for r in layout(4, 1)] == [
        "4 query heads share 1 K/V head (multi-query)"] * 2
    grouped = layout(4, 2)[0]
    assert (grouped["query_heads"], grouped["kv_heads"], grouped["kind"]) == (4, 2,
                                                                               "grouped-query")
    assert grouped["text"] == "4 query heads share 2 K/V heads, 2 per K/V head (grouped-query)"
    assert layout(4, 4)[1]["kind"] == "multi-head"
    # Identical layers share one row of the page's table.
    model = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=3,
                                        num_heads=4, num_kv_heads=1))
    table = layout_markdown(model)
    assert "| 1–3 | 4 | 1 | 4 query heads share 1 K/V head (multi-query) |" in table


def test_analysis_of_a_cct_model_with_sequence_pooling(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2,
                                        stem="cct", pooling="seq"))
    with torch.no_grad():
        model.pool_score.weight.mul_(20.0)  # far from uniform weights
    model.save_pretrained(tmp_path / "m")
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 12:16] = 255  # a "1"
    demo = DemoModel(tmp_path / "m")
    analysis = demo.analyse(Image.fromarray(digit))
    assert len(analysis.top) == 5 and analysis.model_input.shape == (28, 28)
    assert analysis.overlay.shape == (224, 224, 3)
    # The overlay is the rollout read with this image's pooling weights, not the uniform
    # (mean-pooling) reading of the same maps.
    p = demo.predictor
    x = p.preprocess(demo.prepare(Image.fromarray(digit)).unsqueeze(0))
    maps = p.model.attention_maps(x)
    weights = torch.softmax(p.model.forward_features(x) @ p.model.pool_score.weight[0]
                            + p.model.pool_score.bias, dim=1).detach()

    def shown(pooling):
        grid = attention_rollout(maps, 0, pooling)[0].reshape(4, 4)
        return overlay(upscale(analysis.model_input), grid, alpha=0.5)

    def diff(a, b):
        return np.abs(a.astype(int) - b.astype(int)).max()

    assert diff(analysis.overlay, shown(weights)) <= 1  # rounding of the heat map's colours
    assert diff(analysis.overlay, shown("mean")) > 10
    assert "4×4 tokens from the cct stem, seq pooling" in layout_markdown(p.model)


def test_missing_gradio_is_one_line_and_help_does_not_import_it():
    code = ("import sys; sys.modules['gradio'] = None\n"  # makes `import gradio` fail
            "from vit_mqa.apps import cli\n"
            "try:\n    cli.main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert sys.modules['gradio'] is None, 'demo --help imported gradio'\n"
            "sys.exit(cli.main(['demo', 'no-such-run']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ("vit-mqa: error: the demo needs gradio: "
                             "pip install 'vit-mqa[demo]'\n")


@needs_gradio
def test_busy_port_and_bad_port_are_one_line_errors(trained_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "vit_mqa", "demo", str(trained_run),
                                 "--port", str(port)], capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"vit-mqa: error: cannot serve on 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1, result.stderr
    result = subprocess.run([sys.executable, "-m", "vit_mqa", "demo", str(trained_run),
                             "--port", "70000"], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (
        1, "vit-mqa: error: --port must be in 1..65535, got 70000\n")


# ---------------------------------------------------------------- server and browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(trained_run, tmp_path_factory) -> Iterator[dict]:
    """`python -m vit_mqa demo RUN --port P` as a subprocess; its URL once it prints it."""
    if not HAVE_GRADIO:
        pytest.skip("gradio not installed: pip install 'vit-mqa[demo]'")
    port = _free_port()
    tmp = tmp_path_factory.mktemp("demo")
    stderr = open(tmp / "stderr.txt", "w+")  # a file: a full pipe would stall the server
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "vit_mqa", "demo", str(trained_run),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=stderr,
                            text=True, env=env, cwd=tmp)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while "served at" not in line:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                stderr.seek(0)
                pytest.fail(f"no URL within {START_TIMEOUT} s (exit code {proc.poll()}):\n"
                            + stderr.read()[-3000:])
        url = line.split("served at ", 1)[1].split()[0]
        yield {"url": url, "port": port, "line": line, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stderr.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (HAVE_SELENIUM and CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs selenium and {CHROMIUM} + {CHROMEDRIVER} "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--enable-unsafe-swiftshader",  # the canvas is WebGL
                "--no-first-run", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps",
                # Every host but this machine is unresolvable: the page must work offline.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager, were it ever reached: no downloads
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT)
    # The screen the screenshot shows: exactly 1280x900 CSS pixels.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                            "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, message: str, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message)


def _open(driver, url: str):
    """Load the page; returns the sketchpad's canvas once the brush is selected."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#sketchpad canvas"),
          "the sketchpad's canvas never appeared")
    # The page selects the brush itself; until then the canvas shows this hint.
    _wait(driver, lambda d: "select the draw tool" not in
          d.find_element(By.ID, "sketchpad").text, "the brush was not selected on load")
    return next(c for c in driver.find_elements(By.CSS_SELECTOR, "#sketchpad canvas")
                if c.is_displayed())


def _verdict_now(driver) -> str:
    """The verdict heading's text (not the progress timer shown beside it)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return " ".join(h.text.strip() for h in
                        driver.find_elements(By.CSS_SELECTOR, "#prediction h3"))
    except StaleElementReferenceException:  # re-rendered while being read
        return ""


def _verdict(driver, after: str) -> str:
    """The verdict once it differs from ``after``."""

    def changed(d):
        text = _verdict_now(d)
        return text if text and text != after else False

    return _wait(driver, changed, f"the verdict never changed from {after!r}")


def _draw(driver, canvas, start: tuple[int, int], steps: list[tuple[int, int]]) -> None:
    """One mouse stroke: press at ``start`` (offset from the canvas centre; the 280x280
    drawing area sits in the middle), move by each step, release."""
    from selenium.webdriver.common.action_chains import ActionChains

    stroke = ActionChains(driver, duration=20)
    stroke.move_to_element_with_offset(canvas, *start).click_and_hold()
    for dx, dy in steps:
        stroke.move_by_offset(dx, dy)
    stroke.release().perform()


# A "1" with a slight slant, top to bottom. The small fixture model (400 steps) is sure of
# it (about 90 %); its "7" is a coin toss.
ONE = ((10, -100), [(-2, 20)] * 10)


@needs_browser
def test_server_binds_to_loopback_only(demo_server):
    assert demo_server["url"] == f"http://127.0.0.1:{demo_server['port']}/"
    # The kernel's own table of listening sockets: this port, bound to 127.0.0.1 only.
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) == demo_server["port"]:  # 0A: LISTEN
                listening.append(address)
    if not listening and not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    assert listening == ["0100007F"], listening  # 127.0.0.1, little-endian hex


@needs_browser
def test_blank_canvas_says_so(demo_server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, demo_server["url"])
    before = _verdict_now(browser)
    browser.find_element(By.ID, "classify-drawing").click()
    assert _verdict(browser, before) == BLANK_MESSAGE
    label = browser.find_element(By.ID, "probabilities").text
    assert not any(ch.isdigit() for ch in label), f"a blank canvas got classes: {label!r}"


@needs_browser
def test_drawn_digit_is_recognised_with_its_attention(demo_server, browser):
    from selenium.webdriver.common.by import By

    canvas = _open(browser, demo_server["url"])
    _draw(browser, canvas, *ONE)
    before = _verdict_now(browser)
    browser.find_element(By.ID, "classify-drawing").click()
    verdict = _verdict(browser, before)
    assert verdict.startswith("Prediction: 1 ("), verdict
    label = browser.find_element(By.ID, "probabilities").text.split()
    assert label[:2] == ["Top", "classes"] and label[2] == "1", label
    # The normalised input and the attention overlay are shown as images.
    for elem_id in ("model-input", "attention"):
        _wait(browser, lambda d, e=elem_id: d.find_elements(By.CSS_SELECTOR, f"#{e} img"),
              f"no image in #{elem_id}")
    layout = browser.find_element(By.ID, "layout").text
    assert "4 query heads share 1 K/V head (multi-query)" in layout, layout

    # Clearing the canvas and classifying again must not leave the 7 standing.
    browser.find_element(By.CSS_SELECTOR, "#sketchpad button[aria-label='Clear canvas']").click()
    browser.find_element(By.ID, "classify-drawing").click()
    assert _verdict(browser, verdict) == BLANK_MESSAGE


@needs_browser
def test_uploaded_mnist_digit_is_recognised(demo_server, browser, mnist_test_arrays,
                                            tmp_path):
    from selenium.webdriver.common.by import By

    images, labels = mnist_test_arrays
    # A real test digit as people would have it: black ink on white paper, 4x the size.
    png = tmp_path / "digit.png"
    Image.fromarray(255 - np.asarray(images[0])).resize((112, 112)).save(png)
    _open(browser, demo_server["url"])
    browser.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Upload']").click()
    before = _verdict_now(browser)
    field = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR,
                                                     "#upload input[type=file]"),
                  "no file input in #upload")[0]
    field.send_keys(str(png))  # the upload event classifies it
    verdict = _verdict(browser, before)
    assert verdict.startswith(f"Prediction: {int(labels[0])} ("), verdict


@needs_browser
def test_page_fetches_nothing_from_the_network(demo_server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, demo_server["url"])
    _wait(browser, lambda d: d.find_element(By.ID, "layout").text, "the page never rendered")
    # Every request the browser made in this module's tests (the log accumulates).
    hosts = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme not in ("data", "blob"):
                hosts.add(url.hostname)
    assert hosts == {"127.0.0.1"}, hosts


def test_the_demo_says_blank_for_a_blank_strip_and_reads_a_digit_in_a_strip():
    from tests.test_predict_isolation import draw_digit
    from vit_mqa.errors import VitMqaError

    demo = DemoModel("vit-mqa/mnist")
    # Once a numpy broadcasting error deep in the ink steps: now the page's "blank".
    with pytest.raises(VitMqaError, match="no ink found"):
        demo.analyse(np.full((20000, 3), 255, np.uint8))
    assert demo.analyse(draw_digit(7, (3000, 60), height=51)).predicted == "7"
