"""The playground page at / in a real browser: Debian's headless Chromium, driven by Selenium
through Debian's chromedriver, against `molmo serve` on models/molmo-demo.

The picture is drawn here with PIL the way the demo model's training scenes look (square,
336 x 336, flat red circles and blue squares on a plain light-grey background), picked
through the page's file input. The markers the page draws are read from the DOM (each
marker's own x/y and where it sits on screen over the image) and must lie inside the shapes
asked for, one per shape, with the count shown right; a chat question streams its answer
and draws the points it holds, or none; a wrong key shows the API's own 401 message. The
browser may reach 127.0.0.1 only, so the page works with no internet. One server and one
browser for the module; a screenshot of each case lands in the test's tmp dir.

Chromium and chromedriver come from Debian (scripts/install-browser.sh, run here when they
are missing; the test skips, saying why, only when they cannot be installed).

    pytest tests/test_playground.py -q --durations=0      # ~1.5 min on 2 CPU cores
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, running_server
from PIL import Image, ImageDraw

from server.app import create_app
from server.cli import DEMO_MODEL, config_from_args
from server.playground import CSP
from training.data.synthetic import COLOURS
from training.data.synthetic.render import BACKGROUND_COLOURS

pytestmark = [pytest.mark.vllm, pytest.mark.server]
pytest.importorskip("vllm")
pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "playground-key"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SIZE, R = 336, 26.0  # the picture's side and each shape's half-size (the training scenes')
CIRCLES = [(84.0, 90.0), (250.0, 120.0), (150.0, 250.0)]
SQUARES = [(70.0, 200.0), (240.0, 250.0)]


def in_circle(x: float, y: float, centre: tuple[float, float]) -> bool:
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= R**2


def in_square(x: float, y: float, centre: tuple[float, float]) -> bool:
    return abs(x - centre[0]) <= R and abs(y - centre[1]) <= R


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND_COLOURS["light grey"])
    draw = ImageDraw.Draw(image)
    for x, y in CIRCLES:
        draw.ellipse([x - R, y - R, x + R, y + R], fill=COLOURS["red"])
    for x, y in SQUARES:
        draw.rectangle([x - R, y - R, x + R, y + R], fill=COLOURS["blue"])
    path = tmp_path_factory.mktemp("picture") / "shapes.png"
    image.save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    flags = ("--api-key", KEY, "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024")
    with running_server(DEMO_MODEL, tmp_path_factory.mktemp("demo"), *flags) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install-browser.sh")],
            capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        if done.returncode != 0 or not CHROMEDRIVER.is_file():
            pytest.skip(f"Chromium could not be installed: {done.stderr.strip()[-500:]}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # as root, where CI runs
        "--disable-dev-shm-usage",
        "--window-size=1200,760",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        # Every name but the server's fails to resolve: the page must need nothing else.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def page(browser, server, shapes):
    """The page, loaded afresh, with the picture picked through its file input."""
    browser.get(f"{server.url}/")
    browser.find_element(By.ID, "file").send_keys(str(shapes))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "frame").is_displayed())
    return browser


def ask(driver, mode: str, text: str, key: str = KEY) -> str:
    """Fill the form, press Ask, wait for the answer; the page's state: done or error."""
    driver.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()
    field = driver.find_element(By.ID, "objects" if mode == "point" else "question")
    field.clear()
    field.send_keys(text)
    key_field = driver.find_element(By.ID, "key")
    key_field.clear()
    key_field.send_keys(key)
    driver.find_element(By.ID, "go").click()
    state = "return document.body.dataset.state"
    WebDriverWait(driver, 180).until(lambda d: d.execute_script(state) in ("done", "error"))
    return driver.execute_script(state)


def markers(driver) -> list[dict]:
    """Each drawn marker: its object, number and x/y in image pixels as drawn in the SVG, and
    where its centre sits on screen, taken back to image pixels through the image's own box
    (object-fit: contain), so a marker drawn off its spot would show."""
    return driver.execute_script("""
        const img = document.getElementById("image"), box = img.getBoundingClientRect();
        const scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
        const left = box.left + (box.width - img.naturalWidth * scale) / 2;
        const top = box.top + (box.height - img.naturalHeight * scale) / 2;
        return [...document.querySelectorAll("#marks .mark")].map((m) => {
            const dot = m.querySelector("circle.dot"), r = dot.getBoundingClientRect();
            return {object: m.dataset.object, n: +m.dataset.n, fill: dot.getAttribute("fill"),
                    x: +dot.getAttribute("cx"), y: +dot.getAttribute("cy"),
                    sx: (r.left + r.width / 2 - left) / scale,
                    sy: (r.top + r.height / 2 - top) / scale};
        });""")


def legend(driver) -> dict[str, int]:
    items = driver.find_elements(By.CSS_SELECTOR, "#legend li")
    return {li.get_attribute("data-object"): int(li.get_attribute("data-count")) for li in items}


def assert_one_on_each(marks: list[dict], centres: list, inside) -> None:
    assert len(marks) == len(centres), marks
    assert sorted(m["n"] for m in marks) == list(range(1, len(centres) + 1)), marks
    for xy in (("x", "y"), ("sx", "sy")):  # the marker's own x/y and where it shows
        hits = {next((i for i, c in enumerate(centres) if inside(m[xy[0]], m[xy[1]], c)), None)
                for m in marks}  # fmt: skip
        assert hits == set(range(len(centres))), (xy, marks, centres)


def assert_no_policy_violation(driver, server) -> None:
    """Nothing was loaded from anywhere but the server, and the CSP blocked nothing."""
    sources = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    assert sources and all(s.startswith(server.url + "/") for s in sources), sources
    logs = [e["message"] for e in driver.get_log("browser")]
    assert not [m for m in logs if "Content Security Policy" in m or "Refused" in m], logs


def test_the_page_and_its_files_need_no_key_and_carry_a_closed_policy(server) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe" not in CSP and "connect-src 'self'" in CSP
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        r = httpx.get(f"{server.url}/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert r.headers["content-security-policy"] == CSP
    # Only the page's own files are served, and the API behind it still wants the key.
    for path in ("/ui/app.py", "/ui/..%2Fapp.py", "/ui/"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 404 and "error" in r.json(), (path, r.text)
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    # No inline script and nothing from elsewhere in the page.
    html = page.text
    assert "<script>" not in html and not re.search(r"\son[a-z]+\s*=", html)  # no onclick=...
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html


def test_no_ui_turns_the_page_off() -> None:
    async def get(*flags: str) -> tuple[int, int]:
        app = create_app(config_from_args(["--model", str(DEMO_MODEL), *flags]), None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.get("/")).status_code, (await c.get("/ui/playground.js")).status_code

    assert asyncio.run(get()) == (200, 200)
    assert asyncio.run(get("--no-ui")) == (404, 404)


def test_pointing_draws_a_numbered_marker_on_each_object(page, server, tmp_path) -> None:
    # The server has a key: the page asks for one before the first call.
    WebDriverWait(page, 30).until(lambda d: d.find_element(By.ID, "key-row").is_displayed())
    assert ask(page, "point", "red circles") == "done"
    assert page.find_element(By.ID, "count").get_attribute("data-count") == "3"
    assert legend(page) == {"red circles": 3}
    assert_one_on_each(markers(page), CIRCLES, in_circle)
    raw = json.loads(page.find_element(By.ID, "raw").get_attribute("textContent"))
    assert raw["count"] == 3 and len(raw["points"]) == 3
    assert page.find_element(By.ID, "latency").text.endswith(" s")
    page.save_screenshot(str(tmp_path / "playground-point.png"))

    # Several objects: one /v1/point call with `objects`, each object in its own colour.
    assert ask(page, "point", "red circles, blue squares") == "done"
    assert legend(page) == {"red circles": 3, "blue squares": 2}
    assert page.find_element(By.ID, "count").get_attribute("data-count") == "5"
    marks = markers(page)
    circles = [m for m in marks if m["object"] == "red circles"]
    squares = [m for m in marks if m["object"] == "blue squares"]
    assert_one_on_each(circles, CIRCLES, in_circle)
    assert_one_on_each(squares, SQUARES, in_square)
    assert len({m["fill"] for m in circles}) == len({m["fill"] for m in squares}) == 1
    assert circles[0]["fill"] != squares[0]["fill"]
    assert "results" in json.loads(page.find_element(By.ID, "raw").get_attribute("textContent"))
    page.save_screenshot(str(tmp_path / "playground-objects.png"))
    assert page.execute_script("return sessionStorage.getItem('molmo-playground-api-key')") == KEY
    assert_no_policy_violation(page, server)


def test_a_chat_answer_streams_and_its_points_are_drawn(page, server, tmp_path) -> None:
    assert ask(page, "chat", "How many red circles are there?") == "done"
    answer = page.find_element(By.ID, "answer").text
    assert answer.rstrip().endswith("there are 3."), answer
    assert legend(page) == {"red circles": 3}
    assert_one_on_each(markers(page), CIRCLES, in_circle)
    events = page.find_element(By.ID, "raw").get_attribute("textContent").splitlines()
    chunks = [json.loads(e) for e in events]
    assert len(chunks) > 2 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "first token" in page.find_element(By.ID, "latency").text
    page.save_screenshot(str(tmp_path / "playground-chat.png"))

    # An answer without points: nothing drawn, a count of 0.
    assert ask(page, "chat", "How many green triangles are there?") == "done"
    assert page.find_element(By.ID, "answer").text.strip() == "There are none."
    assert markers(page) == [] and legend(page) == {}
    assert page.find_element(By.ID, "count").get_attribute("data-count") == "0"
    assert_no_policy_violation(page, server)


def test_a_wrong_key_shows_the_apis_401_message(page, server, tmp_path) -> None:
    assert ask(page, "point", "red circles", key="not-the-key") == "error"
    r = httpx.post(
        f"{server.url}/v1/point",
        headers={"Authorization": "Bearer not-the-key"},
        json={"image": "x", "object": "red circles"},
    )
    error = r.json()["error"]
    assert r.status_code == 401 and error["code"] == "invalid_api_key"
    assert page.find_element(By.ID, "error-message").text == error["message"]
    assert page.find_element(By.ID, "error-status").text == "401 invalid_api_key:"
    assert markers(page) == [] and not page.find_element(By.ID, "summary").is_displayed()
    page.save_screenshot(str(tmp_path / "playground-401.png"))
