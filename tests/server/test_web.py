"""The front page and the operators' panel in a real browser: Debian's chromium driven by Playwright, against
real gunicorn serving the MNIST model (mnist-torch) next to the two 8x8 digits models.

One server and one browser serve the whole module; each test opens its own browser context (its own
sessionStorage, colour scheme and viewport). The server has keys on (an inference key and an admin key),
so the key field and the operators' panel's admin scope are tested for real; a context gets the inference key
in sessionStorage before the page loads unless a test wants to see the 401. Where real MNIST is absent the
tests that need the 28x28 model skip and the rest run on the digits models. The busy server is a second,
small one (batched mode, a queue of one, the slow fake backend), started by the one test that needs it.

Screenshots (desktop and phone width, light and dark) are written under the test's tmp dir, with
front-page.png, the desktop light one cut to the two panels: docs/front-page.png is a copy of it, made by
hand when the page changes (``pytest tests/server/test_web.py -k screenshots --basetemp=/tmp/shots``).
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
expect.set_options(timeout=10_000)
CHROMIUM = Path("/usr/bin/chromium")
INFERENCE_KEY, ADMIN_KEY = "web-inference-key-2f8c", "web-admin-key-93b1d07e"
DESKTOP, PHONE = {"width": 1280, "height": 900}, {"width": 390, "height": 844}
SEVEN = [[(0.28, 0.2), (0.72, 0.2), (0.42, 0.85)]]
ONE = [[(0.5, 0.14), (0.5, 0.86)]]
ZERO = [[(0.5 + 0.2 * np.sin(a), 0.5 - 0.32 * np.cos(a)) for a in np.linspace(0, 2 * np.pi, 25)]]
FOREIGN = "no request may leave the server's origin"


# -- the server and the browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def web_repo(model_repo: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-tf, digits-torch and, where real MNIST exists, mnist-torch: one repository."""
    repo = tmp_path_factory.mktemp("web-models")
    for model in model_repo.iterdir():
        shutil.copytree(model, repo / model.name)
    try:
        mnist = request.getfixturevalue("mnist_repo")
    except pytest.skip.Exception:
        return repo
    shutil.copytree(mnist / "mnist-torch", repo / "mnist-torch")
    return repo


@pytest.fixture(scope="module")
def has_mnist(web_repo: Path) -> bool:
    return (web_repo / "mnist-torch").is_dir()


@pytest.fixture
def mnist(has_mnist: bool) -> None:
    if not has_mnist:
        pytest.skip("real MNIST not found: the 28x28 model cannot be trained (set MNIST_DIR)")


@pytest.fixture(scope="module")
def server(web_repo: Path, has_mnist: bool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    srv = GunicornServer(web_repo, tmp_path_factory.mktemp("web-logs"), models="*", backend="onnx",
                         model="mnist-torch" if has_mnist else "digits-tf", api_keys=INFERENCE_KEY,
                         admin_keys=ADMIN_KEY, args=("--no-control-socket",))
    with srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: make test installs it (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox", "--disable-background-networking"])
        try:
            yield chromium
        finally:
            chromium.close()


class Tab:
    """One browser context and page, with what the page logged and asked for."""

    def __init__(self, browser: Any, origin: str, key: str | None, **options: Any) -> None:
        self.context = browser.new_context(**{"viewport": DESKTOP, **options})
        if key:
            self.context.add_init_script(f"sessionStorage.setItem('serving.key', {key!r})")
        self.page = self.context.new_page()
        self.origin = origin
        self.console: list[str] = []
        self.requests: list[str] = []
        self.in_flight: set[Any] = set()
        self.answers: list[Any] = []  # every v2 infer response, in order
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console.append(f"page error: {e}"))
        self.page.on("request", self._sent)
        self.page.on("requestfinished", self._done)
        self.page.on("requestfailed", self._done)
        self.page.on("response", lambda r: self.answers.append(r) if r.url.endswith("/infer") else None)

    def _sent(self, request: Any) -> None:
        self.requests.append(request.url)
        if request.url.startswith(self.origin):
            self.in_flight.add(request)

    def _done(self, request: Any) -> None:
        self.in_flight.discard(request)

    def open(self, path: str = "/", ready: bool = True) -> Any:
        self.page.goto(self.origin + path)
        if ready and path == "/":
            self.page.wait_for_selector("#model:enabled")
        return self.page

    def draw(self, strokes: list[list[tuple[float, float]]], steps: int = 6) -> None:
        """Mouse strokes, each a list of points in fractions of the pad."""
        box = self.page.locator("#pad").bounding_box()
        for stroke in strokes:
            x, y = stroke[0]
            self.page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
            self.page.mouse.down()
            for x, y in stroke[1:]:
                self.page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=steps)
            self.page.mouse.up()

    def settle(self, quiet_s: float = 0.25, timeout_s: float = 15.0) -> None:
        """Wait until no request has been in flight for ``quiet_s`` (the page debounces by 80 ms)."""
        deadline, quiet_since = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(50)
            if self.in_flight:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
        raise AssertionError(f"the page never went quiet: {[r.url for r in self.in_flight]}")

    def answer(self) -> tuple[str, list[float]]:
        """The label the page shows, and the probabilities of the last infer answer it got."""
        self.settle()
        label = self.page.locator("#top-label").text_content() or ""
        last = self.answers[-1].json()
        return label, next(o["data"] for o in last["outputs"] if o["datatype"] == "FP32")

    def upload(self, name: str, data: bytes, mime: str = "image/png") -> None:
        self.page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])

    def message(self) -> str:
        return self.page.locator("#message").text_content() or ""

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab_factory(browser: Any, server: GunicornServer) -> Iterator[Callable[..., Tab]]:
    tabs: list[Tab] = []

    def make(key: str | None = INFERENCE_KEY, **options: Any) -> Tab:
        tabs.append(Tab(browser, server.url, key, **options))
        return tabs[-1]

    yield make
    for tab in tabs:
        tab.close()


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def auth(key: str = INFERENCE_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- the page loads, cleanly and from this origin only -------------------------------------------------------
def test_page_loads_with_no_console_error_and_no_foreign_request(tab_factory: Callable[..., Tab],
                                                                 server: GunicornServer) -> None:
    tab = tab_factory()
    started = time.perf_counter()
    page = tab.open("/")
    tab.draw(SEVEN)
    expect(page.locator("#request-id")).to_contain_text("web-")
    first_answer_s = time.perf_counter() - started
    tab.settle()
    ops = tab_factory(key=ADMIN_KEY)
    ops.open("/ops")
    expect(ops.page.locator("#status")).to_contain_text("Updated at")
    for each in (tab, ops):
        assert each.console == [], each.console
        assert each.requests and all(url.startswith(server.url + "/") for url in each.requests), FOREIGN
    paths = {urlsplit(url).path for url in tab.requests}
    assert {"/", "/models", "/assets/app.js", "/assets/common.js", "/assets/app.css", "/assets/icon.svg"} <= paths
    assert first_answer_s < 10, first_answer_s


def test_pages_are_cached_by_etag_and_locked_by_csp(server: GunicornServer) -> None:
    page = requests.get(server.url + "/", timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp and page.headers["Cache-Control"] == "no-cache"
    assert "<script>" not in page.text and " style=" not in page.text and "http" not in page.text.lower()
    again = requests.get(server.url + "/", headers={"If-None-Match": page.headers["ETag"]}, timeout=5)
    assert again.status_code == 304 and again.content == b""
    fingerprinted = sorted(set(re.findall(r'"(/assets/[a-z.-]+\?v=[0-9a-f]+)"', page.text)))
    assert len(fingerprinted) == 4, fingerprinted  # app.css, common.js, app.js, icon.svg
    for url in fingerprinted:
        asset = requests.get(server.url + url, timeout=5)
        assert asset.status_code == 200 and asset.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert asset.headers["ETag"].strip('"') == url.rsplit("=", 1)[1]
        assert "Content-Security-Policy" in asset.headers
    stale = requests.get(server.url + "/assets/app.js?v=0000", timeout=5)
    assert stale.status_code == 200 and stale.headers["Cache-Control"] == "no-cache"
    assert stale.headers["Content-Type"] == "text/javascript; charset=utf-8"
    missing = requests.get(server.url + "/assets/secret.js", timeout=5)
    assert missing.status_code == 404 and missing.json() == {"error": "no asset 'secret.js' here"}
    assert requests.get(server.url + "/assets/..%2fapp.py", timeout=5).status_code == 404
    assert requests.get(server.url + "/models", timeout=5).status_code == 401  # the data is behind the key


# -- drawing and uploading ---------------------------------------------------------------------------------
@pytest.mark.usefixtures("mnist")
def test_mouse_strokes_forming_1_0_and_7_get_those_labels(tab_factory: Callable[..., Tab]) -> None:
    tab = tab_factory()
    page = tab.open("/")
    assert "mnist-torch" in (page.locator("#model option:checked").text_content() or "")
    for strokes, expected in ((ONE, "1"), (ZERO, "0"), (SEVEN, "7")):
        page.click("#clear")
        tab.draw(strokes)
        label, probabilities = tab.answer()
        assert label == expected and int(np.argmax(probabilities)) == int(expected), (expected, probabilities)
        assert page.locator("#bars li.best .label").text_content() == expected
        assert page.locator("#message").text_content() == f"mnist-torch v1 says {expected}."
        assert page.locator("#request-id").text_content().startswith("web-")
        assert "measured by this page" in (page.locator("#latency").text_content() or "")
        assert page.locator("#seen").evaluate("c => [c.width, c.height]") == [28, 28]


@pytest.mark.usefixtures("mnist")
def test_a_drawn_digit_and_the_same_digit_uploaded_get_the_same_answer(tab_factory: Callable[..., Tab],
                                                                       server: GunicornServer) -> None:
    tab = tab_factory()
    page = tab.open("/")
    tab.draw(SEVEN)
    drawn_label, drawn = tab.answer()
    with page.expect_download() as download:
        page.click("#save")
    picture = Path(download.value.path()).read_bytes()
    with Image.open(io.BytesIO(picture)) as drawing:
        assert drawing.format == "PNG" and drawing.size == (280, 280)
    page.click("#clear")
    tab.settle()
    assert page.locator("#top-label").text_content() == "?"
    tab.upload("digit.png", picture)
    uploaded_label, uploaded = tab.answer()
    assert drawn_label == uploaded_label == "7"
    assert np.allclose(drawn, uploaded, atol=1e-6)
    # and the native API, given the same picture, agrees: the page's two calls lose nothing on the way
    native = requests.post(server.url + "/predict", data=picture, headers={"Content-Type": "image/png", **auth()},
                           timeout=10).json()["prediction"][0]
    assert np.allclose(native, drawn, atol=2e-3), (native, drawn)


@pytest.mark.usefixtures("mnist")
def test_uploaded_t10k_pngs_get_their_labels(tab_factory: Callable[..., Tab], server: GunicornServer) -> None:
    from tests.mnist_support import t10k_digits

    images, labels = t10k_digits(8)
    tab = tab_factory()
    page = tab.open("/")
    right = 0
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        picture = png((image * 255).round().astype(np.uint8))
        if i % 2:  # every other one dropped on the page rather than picked
            page.evaluate("""([data, name]) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], name, {type: "image/png"}));
                for (const type of ["dragover", "drop"]) {
                    document.body.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true,
                                                                      cancelable: true}));
                }
            }""", [base64.b64encode(picture).decode(), f"t10k-{i}.png"])
        else:
            tab.upload(f"t10k-{i}.png", picture)
        shown, _ = tab.answer()
        direct = requests.post(server.url + "/predict/label", data=picture,
                               headers={"Content-Type": "image/png", **auth()}, timeout=10).json()["prediction"][0]
        assert shown == direct, (i, shown, direct)  # the page shows exactly what the API answers
        right += shown == str(label)
    assert right >= 7, f"{right} of 8 t10k digits right"  # mnist-torch here: the default model, >= 0.99


def test_a_non_image_and_a_too_large_picture_get_readable_errors(tab_factory: Callable[..., Tab]) -> None:
    tab = tab_factory()
    page = tab.open("/")
    tab.upload("notes.txt", b"these are not the pixels you are looking for\n", mime="text/plain")
    tab.settle()
    assert tab.message() == ("The server could not read that: the body is not a readable image (PNG, JPEG, GIF,"
                             " BMP, WebP or TIFF).")
    assert page.locator("#message.error").count() == 1 and page.locator("#top-label").text_content() == "!"
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)  # 1.9 MB: over the cap
    tab.upload("noise.png", png(noise))
    tab.settle()
    assert tab.message().startswith("That is too large for this server: the body is "), tab.message()
    assert all(error.startswith("error: Failed to load resource") for error in tab.console), tab.console
    page.click("#clear")
    tab.draw(SEVEN)  # still a working page
    label, _ = tab.answer()
    assert label.isdigit() and "says" in tab.message()


def test_the_model_picker_switches_models(tab_factory: Callable[..., Tab], has_mnist: bool) -> None:
    tab = tab_factory()
    page = tab.open("/")
    options = page.locator("#model option").all_text_contents()
    expected = ["digits-tf v1 (tensorflow, 8×8)", "digits-torch v1 (pytorch, 8×8)"]
    assert options == expected + (["mnist-torch v1 (pytorch, 28×28)"] if has_mnist else [])
    tab.draw(SEVEN)
    tab.answer()
    calls = len(tab.answers)
    page.select_option("#model", label="digits-torch v1 (pytorch, 8×8)")
    tab.answer()
    info = page.locator("#model-info").text_content() or ""
    assert info.startswith("pytorch · version 1 · ") and "right on 360 held-out digits" in info
    assert "input 8×8" in info and "trained on digits" in info
    assert len(tab.answers) > calls and tab.answers[-1].url.endswith("/v2/models/digits-torch/versions/1/infer")
    assert page.locator("#seen").evaluate("c => [c.width, c.height]") == [8, 8]
    assert page.locator("#message").text_content().startswith("digits-torch v1 says ")


def test_an_overloaded_batched_server_is_shown_as_busy_and_retried(
        browser: Any, model_repo: Path, tmp_path: Path) -> None:
    """A queue of one and a slow model: a flood of slow samples fills it, the page sees 503s, says so and
    retries after Retry-After; once the flood stops, its answer arrives."""
    slow = GunicornServer(model_repo, tmp_path, model="digits-tf", backend="tests.fakes:FaultyOnnx",
                          mode="batched", max_queue=1, max_batch_size=1, workers=1, access_log="false",
                          args=("--no-control-socket",))
    stop = threading.Event()
    sample = [0.125] + [0.0] * 63  # the fake backend sleeps 200 ms on it
    body = {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": sample}]}

    def flood() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                session.post(slow.url + "/v2/models/digits-tf/infer", json=body, timeout=10)

    with slow:
        threads = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
        tab = Tab(browser, slow.url, None)
        try:
            for thread in threads:
                thread.start()
            page = tab.open("/")
            tab.draw(SEVEN)
            page.wait_for_selector("#message.busy", timeout=15_000)
            assert "busy, retrying" in tab.message()
            assert page.locator("#top-label").text_content() == "?"  # no broken answer meanwhile
            stop.set()
            for thread in threads:
                thread.join(10)
            expect(page.locator("#message")).to_contain_text("says", timeout=15_000)
            assert (page.locator("#top-label").text_content() or "").isdigit()
            statuses = [response.status for response in tab.answers]
            assert 503 in statuses and statuses[-1] == 200, statuses
        finally:
            stop.set()
            tab.close()


def test_one_request_in_flight_and_stale_answers_dropped(tab_factory: Callable[..., Tab]) -> None:
    """With 300 ms of network latency (Chrome's own throttling), a long stroke never has two predictions in
    flight, sends far fewer than its pointer moves, and an answer that arrives after Clear is not shown."""
    tab = tab_factory()
    page = tab.open("/")
    page.evaluate("""() => {
        window.flight = {now: 0, most: 0};
        const fetch = window.fetch;
        window.fetch = async (...args) => {
            window.flight.most = Math.max(window.flight.most, ++window.flight.now);
            try { return await fetch(...args); } finally { window.flight.now--; }
        };
    }""")
    cdp = tab.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 300, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    tab.draw([[(0.2 + 0.6 * i / 40, 0.2 + 0.6 * (i % 2)) for i in range(41)]], steps=4)  # 160 moves
    tab.answer()
    assert page.evaluate("window.flight.most") == 1
    assert 0 < len(tab.answers) < 20, len(tab.answers)
    tab.draw(SEVEN)
    page.wait_for_timeout(150)  # the first prediction of the 7 is on its way: two calls of 300 ms or more
    before_clear = len(tab.answers)
    page.click("#clear")
    tab.settle()
    assert len(tab.answers) > before_clear  # it was answered after Clear ...
    assert page.locator("#top-label").text_content() == "?"  # ... and dropped
    assert page.locator("#message").text_content() == "Draw a digit to see the answer."
    assert page.locator("#bars .value").all_text_contents() == ["–"] * 10


# -- keys, keyboard, accessibility -------------------------------------------------------------------------
def test_a_server_with_keys_asks_for_one_and_keeps_it_in_the_tab(tab_factory: Callable[..., Tab]) -> None:
    tab = tab_factory(key=None)
    page = tab.open("/", ready=False)
    page.wait_for_selector("#key-panel:not([hidden])")
    assert tab.message() == "This server needs an API key. Enter it below: it is kept in this browser tab only."
    assert page.evaluate("document.activeElement.id") == "key"
    page.fill("#key", "wrong")
    page.press("#key", "Enter")
    page.wait_for_timeout(300)
    assert page.locator("#model").is_disabled()
    page.fill("#key", INFERENCE_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#model:enabled")
    assert page.evaluate("sessionStorage.getItem('serving.key')") == INFERENCE_KEY
    assert page.evaluate("localStorage.length") == 0  # never beyond this tab
    tab.draw(SEVEN)
    assert tab.answer()[0].isdigit()
    page.reload()  # the tab keeps it
    page.wait_for_selector("#model:enabled")
    page.click("#forget-key")
    assert page.evaluate("sessionStorage.getItem('serving.key')") is None


def test_keyboard_alone_reaches_every_control_and_draws(tab_factory: Callable[..., Tab]) -> None:
    tab = tab_factory()
    page = tab.open("/")
    seen = []
    for _ in range(12):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("(e => e.id || e.textContent.trim())(document.activeElement)"))
    assert seen[:8] == ["API", "Operators' panel", "pad", "undo", "clear", "save", "file", "model"], seen
    page.focus("#pad")
    assert page.locator("#pen").is_visible()
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Space")  # pen down
    for key in ["ArrowDown"] * 10:
        page.keyboard.press(key)
    page.keyboard.press("Space")  # pen up: a vertical stroke
    label, _ = tab.answer()
    assert label.isdigit()
    page.keyboard.press("Backspace")
    tab.settle()
    assert page.locator("#top-label").text_content() == "?"
    page.focus("#model")
    page.keyboard.press("ArrowDown")  # a select is changed by keyboard too
    assert page.evaluate("document.querySelector('#model').selectedIndex") >= 0


A11Y_CHECK = """() => {
  const problems = [];
  const hidden = (el) => el.closest("[hidden]") || getComputedStyle(el).display === "none"
    || getComputedStyle(el).visibility === "hidden" || !el.getClientRects().length;
  const text = (el) => (el ? el.textContent.replace(/\\s+/g, " ").trim() : "");
  const nameOf = (el) => {
    if (el.getAttribute("aria-labelledby")) {
      return el.getAttribute("aria-labelledby").split(/\\s+/).map((id) => text(document.getElementById(id))).join(" ");
    }
    if (el.getAttribute("aria-label")) return el.getAttribute("aria-label").trim();
    const label = el.id && document.querySelector(`label[for="${el.id}"]`);
    if (label) return text(label);
    if (el.closest("label")) return text(el.closest("label"));
    if (["A", "BUTTON"].includes(el.tagName)) return text(el);
    return el.getAttribute("title") || "";
  };
  if (!document.documentElement.lang) problems.push("html has no lang");
  if (!document.title.trim()) problems.push("no title");
  if (document.querySelectorAll("h1").length !== 1) problems.push("not exactly one h1");
  if (!document.querySelector("main")) problems.push("no main landmark");
  let level = 0;
  for (const h of document.querySelectorAll("h1, h2, h3, h4")) {
    const next = Number(h.tagName[1]);
    if (next > level + 1) problems.push(`heading ${h.tagName} after h${level}: ${text(h)}`);
    level = next;
  }
  const ids = [...document.querySelectorAll("[id]")].map((el) => el.id);
  for (const id of new Set(ids)) if (ids.filter((x) => x === id).length > 1) problems.push(`duplicate id ${id}`);
  for (const label of document.querySelectorAll("label[for]")) {
    if (!document.getElementById(label.htmlFor)) problems.push(`label for a missing #${label.htmlFor}`);
  }
  for (const ref of document.querySelectorAll("[aria-describedby], [aria-labelledby]")) {
    for (const attr of ["aria-describedby", "aria-labelledby"]) {
      for (const id of (ref.getAttribute(attr) || "").split(/\\s+/).filter(Boolean)) {
        if (!document.getElementById(id)) problems.push(`${attr} names a missing #${id}`);
      }
    }
  }
  const controls = "a[href], button, input, select, textarea, [tabindex], canvas, [role=img], img";
  for (const el of document.querySelectorAll(controls)) {
    if (!hidden(el) && !nameOf(el)) problems.push(`no accessible name: ${el.outerHTML.slice(0, 90)}`);
  }
  const rgba = (css) => {
    const m = css.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const [r, g, b, a = 1] = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return [r, g, b, a];
  };
  const over = (top, bottom) => top.slice(0, 3).map((c, i) => c * top[3] + bottom[i] * (1 - top[3])).concat(1);
  const background = (el) => {
    const layers = [];
    for (let node = el; node; node = node.parentElement) {
      const colour = rgba(getComputedStyle(node).backgroundColor);
      if (colour && colour[3] > 0) layers.push(colour);
      if (colour && colour[3] === 1) break;
    }
    return layers.reverse().reduce((below, layer) => over(layer, below), [255, 255, 255, 1]);
  };
  const luminance = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => {
      v /= 255;
      return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let checked = 0;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.textContent.trim() || hidden(el) || el.closest("select, .sr-only")) continue;
    const style = getComputedStyle(el);
    const back = background(el);
    const fore = over(rgba(style.color), back);
    const [l1, l2] = [luminance(fore), luminance(back)].sort((a, b) => b - a);
    const ratio = (l1 + 0.05) / (l2 + 0.05);
    const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
    const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
    checked++;
    const sample = node.textContent.trim().slice(0, 40);
    if (ratio < needed) problems.push(`contrast ${ratio.toFixed(2)} < ${needed}: "${sample}"`);
  }
  if (checked < 10) problems.push(`only ${checked} texts checked`);
  return problems;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_labels_and_contrast_pass_an_offline_accessibility_check(tab_factory: Callable[..., Tab],
                                                                  scheme: str) -> None:
    tab = tab_factory(color_scheme=scheme)
    page = tab.open("/")
    tab.draw(SEVEN)
    tab.answer()  # the answer, its bars and message on screen
    assert page.evaluate(A11Y_CHECK) == []
    assert page.locator("#answer").get_attribute("aria-live") == "polite"
    tab.upload("notes.txt", b"not a picture", mime="text/plain")  # the error colour too
    tab.settle()
    assert page.evaluate(A11Y_CHECK) == []
    ops = tab_factory(key=ADMIN_KEY, color_scheme=scheme)
    ops.open("/ops")
    expect(ops.page.locator("#status")).to_contain_text("Updated at")
    assert ops.page.evaluate(A11Y_CHECK) == []


def test_screenshots_desktop_and_phone_light_and_dark(tab_factory: Callable[..., Tab], tmp_path: Path) -> None:
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        for scheme in ("light", "dark"):
            phone = name == "phone"
            tab = tab_factory(color_scheme=scheme, viewport=viewport, is_mobile=phone, has_touch=phone,
                              device_scale_factor=2 if phone else 1)
            page = tab.open("/")
            tab.draw(SEVEN)
            tab.answer()
            page.locator("#pad").blur()
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} {scheme}: {overflow}px wider than the screen"
            if phone:  # one column: the answer below the pad
                assert page.locator("#answer").bounding_box()["y"] > page.locator("#pad").bounding_box()["y"] + 200
            path = tmp_path / f"front-page-{name}-{scheme}.png"
            page.screenshot(path=str(path), full_page=True)
            if name == "desktop" and scheme == "light":  # docs/front-page.png: the two panels, no key field
                box = page.locator(".columns > .panel").nth(1).bounding_box()
                clip = {"x": 0, "y": 0, "width": DESKTOP["width"], "height": box["y"] + box["height"] + 16}
                page.screenshot(path=str(tmp_path / "front-page.png"), clip=clip)
            with Image.open(path) as shot:
                assert shot.size[0] == viewport["width"] * (2 if phone else 1)
    assert len(list(tmp_path.glob("front-page*.png"))) == 5


# -- the operators' panel ----------------------------------------------------------------------------------
def test_the_operators_panel_shows_live_traffic_behind_the_admin_key(tab_factory: Callable[..., Tab],
                                                                     server: GunicornServer,
                                                                     has_mnist: bool) -> None:
    nobody = tab_factory(key=None)
    nobody.open("/ops")
    nobody.page.wait_for_selector("#key-panel:not([hidden])")
    assert nobody.page.locator("#status").text_content().startswith("This server needs an API key.")
    inference = tab_factory(key=INFERENCE_KEY)
    inference.open("/ops")
    inference.page.wait_for_selector("#status.error")
    assert "This key may not do that: /metrics needs an admin key" in inference.page.locator("#status").text_content()

    tab = tab_factory(key=ADMIN_KEY)
    page = tab.open("/ops")
    page.select_option("#every", "1")
    expect(page.locator("#status")).to_contain_text("Updated at")
    side = 28 if has_mnist else 8
    with requests.Session() as session:
        session.headers.update(auth())
        for _ in range(30):
            assert session.post(server.url + "/predict", timeout=5,
                                json={"data": [0.0] * side * side}).status_code == 200
        for _ in range(10):
            assert session.post(server.url + "/predict", json={"data": [2.0]}, timeout=5).status_code == 422
    row = page.locator("#endpoints tbody tr").filter(has=page.get_by_role("rowheader", name="/predict", exact=True))
    expect(row.locator("td").nth(1)).to_have_text("40", timeout=15_000)
    cells = row.locator("th, td").all_text_contents()
    assert cells[0] == "/predict" and cells[2] == "40" and cells[3] == "0 (0.0%)" and cells[4] == "10 (25.0%)", cells
    assert float(cells[1]) > 0 and all(float(value) > 0 for value in cells[5:8]), cells
    assert float(cells[5]) <= float(cells[6]) <= float(cells[7])
    models = page.locator("#models tbody tr").all_text_contents()
    default = "mnist-torch:1" if has_mnist else "digits-tf:1"
    assert any(text.startswith(f"{default}onnxprocess2") for text in models), models
    assert "invalid" in (page.locator("#refusals").text_content() or "")
    assert tab.console == []
    page.click("#pause")
    assert page.locator("#status").text_content() == "Paused."


PAINTED = """(selector) => {
  const canvas = document.querySelector(selector);
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++;
  return painted;
}"""


def test_the_operators_panel_charts_traffic_per_endpoint_and_per_version(tab_factory: Callable[..., Tab],
                                                                         server: GunicornServer,
                                                                         has_mnist: bool) -> None:
    default, side = ("mnist-torch:1", 28) if has_mnist else ("digits-tf:1", 8)
    tab = tab_factory(key=ADMIN_KEY)
    page = tab.open("/ops")
    page.select_option("#every", "1")
    expect(page.locator("#status")).to_contain_text("Updated at")
    with requests.Session() as session:
        session.headers.update(auth())
        for _ in range(40):
            assert session.post(server.url + "/predict", json={"data": [0.0] * side * side}, timeout=5).ok
        for _ in range(10):
            assert session.post(server.url + "/predict", json={"data": [2.0]}, timeout=5).status_code == 422
    legend = {name: page.locator(f"#chart-{name} .u-legend") for name in ("throughput", "latency", "errors",
                                                                           "queue", "batch")}
    expect(legend["throughput"]).to_contain_text("/predict", timeout=15_000)
    expect(legend["latency"]).to_contain_text("/predict p99")
    expect(legend["errors"]).to_contain_text("/predict 4xx")  # the 422s; no 5xx line: there was none
    assert "/predict 5xx" not in (legend["errors"].text_content() or "")
    label = page.locator("#chart-throughput canvas").get_attribute("aria-label") or ""
    assert label.startswith("Requests per second over the last 5 minutes; now:") and "/predict" in label, label
    assert page.evaluate(PAINTED, "#chart-throughput canvas") > 1000  # axes, grid and the lines
    page.select_option("#by", "version")
    expect(legend["throughput"]).to_contain_text(default)
    expect(legend["latency"]).to_contain_text(f"{default} p50")
    for name in ("queue", "batch"):
        expect(legend[name]).to_contain_text(default)
    assert page.locator("#chart-traffic").is_hidden() and page.locator("#chart-drift").is_hidden()
    page.select_option("#window", "60")
    label = page.locator("#chart-throughput canvas").get_attribute("aria-label") or ""
    assert "over the last 60 seconds" in label and default in label, label
    assert tab.console == []


DRIFT = ('serving_drift_score{input="pixels",model="digits-tf",version="1"} 0.08\n'
         'serving_drift_threshold{input="pixels",model="digits-tf",version="1"} 0.2\n')


def test_traffic_and_drift_charts_appear_with_their_metrics(tab_factory: Callable[..., Tab],
                                                             server: GunicornServer) -> None:
    """A traffic rule put in force through the admin API is charted; drift gauges (issue 27's other half) are
    drawn when /metrics has them, added here to the server's real answer."""
    rule = f"{server.url}/v2/repository/models/digits-tf/traffic"
    changed = requests.post(rule, json={"rule": "v1"}, headers=auth(ADMIN_KEY), timeout=60)
    assert changed.status_code == 200 and changed.json()["workers"] == 2, changed.text
    try:
        tab = tab_factory(key=ADMIN_KEY)

        def with_drift(route: Any) -> None:
            answer = route.fetch()
            route.fulfill(response=answer, body=answer.text() + DRIFT)

        tab.page.route("**/metrics", with_drift)
        page = tab.open("/ops")
        page.select_option("#every", "1")
        expect(page.locator("#chart-traffic")).to_be_visible(timeout=15_000)
        expect(page.locator("#chart-traffic .u-legend")).to_contain_text("digits-tf:1 stable")
        expect(page.locator("#chart-drift .u-legend")).to_contain_text("digits-tf:1 pixels")
        expect(page.locator("#chart-drift .u-legend")).to_contain_text("threshold digits-tf:1 pixels")
        label = page.locator("#chart-drift canvas").get_attribute("aria-label") or ""
        assert "digits-tf:1 pixels 0.080" in label and "threshold digits-tf:1 pixels 0.20" in label, label
        assert tab.console == []
    finally:
        assert requests.delete(rule, headers=auth(ADMIN_KEY), timeout=60).status_code == 200


def test_a_feature_model_gets_a_form_of_its_features(browser: Any, iris_repo: Path, tmp_path: Path) -> None:
    """iris-svc takes four measurements, not a picture: the page shows a form of them, filled with the stored
    sample, and each change shows what the model answers for the row (the same as the API)."""
    with GunicornServer(iris_repo, tmp_path, workers=1, args=("--no-control-socket",)) as iris:
        tab = Tab(browser, iris.url, None)
        try:
            page = tab.open("/")
            expect(page.locator("#features")).to_be_visible()
            expect(page.locator("#image-input")).to_be_hidden()
            expect(page.locator("#input-title")).to_have_text("Your input")
            names = page.locator("#feature-fields label").all_text_contents()
            assert names == ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
            expect(page.locator("#feature-0-range")).to_have_text("4.3 to 7.9 in training")
            sample = [float(v) for v in page.locator("#feature-fields input").evaluate_all(
                "inputs => inputs.map(i => i.value)")]
            label, _ = tab.answer()
            expected = requests.get(iris.url + "/predict/test/label", timeout=10).json()["expected"]
            assert label == expected and len(sample) == 4
            for field, value in (("#feature-2", "6.1"), ("#feature-3", "2.4"), ("#feature-0", "7.2")):
                page.fill(field, value)
            shown, probabilities = tab.answer()
            row = [7.2, sample[1], 6.1, 2.4]
            direct = requests.post(iris.url + "/predict", json={"data": [row]}, timeout=10).json()["prediction"][0]
            assert np.allclose(probabilities, direct, atol=1e-6)
            assert shown == "virginica" == ["setosa", "versicolor", "virginica"][int(np.argmax(direct))]
            page.fill("#feature-1", "not a number")
            expect(page.locator("#feature-1")).to_have_attribute("aria-invalid", "true")
            page.click("#reset-features")
            expect(page.locator("#top-label")).to_have_text(expected)
            assert not tab.console, tab.console
        finally:
            tab.close()
