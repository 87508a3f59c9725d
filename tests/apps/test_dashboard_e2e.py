"""The real server in a real browser: `loupe dashboard` on what `loupe demo` wrote, driven in headless Chromium
through Playwright — queue, case, a decision, agreement, experiments, an upload — with a screenshot of each page.

Screenshots go to ``$LOUPE_E2E_SCREENSHOTS`` (the README's come from there) or the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip


def _browser_available() -> None:
    missing = [] if Path(CHROMIUM).is_file() else [CHROMIUM]
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing and not os.environ.get("CI"):
        pytest.skip(f"the browser test needs {' and '.join(missing)} (`.ci/run` installs them)")
    assert not missing, f"CI must provide {missing}: .ci/run installs Debian's chromium and pip's playwright"


def _settle(page) -> None:
    """Wait until the script run finished (Streamlit's running indicator gone) and the images drew."""
    from playwright.sync_api import expect

    page.wait_for_timeout(500)
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1000)


def _open_case(page, domain: str, listed: str, pick: str | None = None) -> None:
    """From the queue: switch to ``domain``, check its case list holds a ``listed`` (regex) case, pick the case whose
    name matches ``pick`` (default: the first in the queue's order) and open it."""
    from playwright.sync_api import expect

    page.get_by_role("link", name="Review queue").click()
    expect(page.get_by_role("heading", name="Review queue")).to_be_visible()
    page.get_by_test_id("stSelectbox").filter(has_text="Domain").click()
    page.get_by_role("option", name=domain).click()
    case_pick = page.get_by_role("combobox", name="Case")
    expect(case_pick).to_have_value(re.compile(listed))
    if pick:
        case_pick.click()
        page.get_by_role("option", name=re.compile(pick)).click()
    page.get_by_role("button", name="Open case").click()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    """`loupe demo --fast` in a fresh folder, then `loupe dashboard` there with no options at all: it must find the
    demo's predictions (./loupe-demo) and its models (the default MLflow store under LOUPE_HOME)."""
    _browser_available()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LOUPE_DASHBOARD_DATA")}
    env |= {"LOUPE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "loupe.workflows.cli"]
    demo = subprocess.run([*cli, "demo", "--fast"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "loupe dashboard --data" in demo.stdout  # the demo says how to review its cases
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([*cli, "dashboard", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"the dashboard did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
    yield url, tmp_path / "loupe-demo"
    proc.terminate()
    proc.wait(timeout=30)


def test_a_reviewer_goes_through_the_demo_cases_in_a_real_browser(server, tmp_path: Path) -> None:
    """The demo scored 4 films (and refused 4 other files); a reviewer records a decision on the first, then opens
    one of the demo's slides."""
    from playwright.sync_api import expect, sync_playwright

    url, data = server
    shots = Path(os.environ.get("LOUPE_E2E_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # scoring an upload loads the champion model: seconds on a busy CPU
        page.goto(url)
        expect(page.get_by_role("heading", name="Review queue")).to_be_visible()
        page.get_by_role("textbox", name="Reviewer").fill("alice")
        page.keyboard.press("Enter")
        expect(page.get_by_test_id("stMetric").first).to_be_visible()
        _settle(page)
        page.screenshot(path=shots / "queue.png", full_page=True)

        page.get_by_role("button", name="Open case").click()
        expect(page.get_by_role("heading", name="Case 1 of 4")).to_be_visible()
        expect(page.get_by_role("img").first).to_be_visible()
        _settle(page)
        page.screenshot(path=shots / "case.png", full_page=True)
        page.get_by_text("accept").first.click()
        page.wait_for_timeout(500)
        page.get_by_role("button", name="Record").click()
        expect(page.get_by_text("Recorded 1 decision")).to_be_visible()
        page.get_by_role("button", name="Next ▶").click()
        expect(page.get_by_role("heading", name="Case 2 of 4")).to_be_visible()
        _settle(page)
        page.screenshot(path=shots / "case-next.png", full_page=True)

        page.get_by_role("link", name="Agreement and export").click()
        expect(page.get_by_role("heading", name="Agreement and export")).to_be_visible()
        expect(page.get_by_text("1 reviewed cases")).to_be_visible()
        _settle(page)
        page.screenshot(path=shots / "agreement.png", full_page=True)

        page.get_by_role("link", name="Experiments").click()
        expect(page.get_by_role("heading", name="Registered models")).to_be_visible()
        _settle(page)
        page.screenshot(path=shots / "experiments.png", full_page=True)

        page.get_by_role("link", name="Upload").click()
        expect(page.get_by_role("heading", name="Score an upload")).to_be_visible()
        corrupt = tmp_path / "broken_film.dcm"
        corrupt.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")
        page.locator("input[type=file]").set_input_files(str(corrupt))
        expect(page.get_by_text("could not be scored")).to_be_visible()
        _settle(page)
        page.screenshot(path=shots / "upload.png", full_page=True)

        # the demo's slides: the pathology queue, then a slide case with its heatmap and tile grid
        _open_case(page, "pathology", r"cmu_small_region\.svs|ihc_skimage\.tif")
        expect(page.get_by_role("heading", name="Case 1 of")).to_be_visible()
        expect(page.get_by_text("Nuclei-dense").first).to_be_visible()
        _settle(page)
        page.screenshot(path=shots / "slide-case.png", full_page=True)

        # the demo's forensics media: the clip's case shows its face frame and the per-frame timeline
        _open_case(page, "forensics", r"\.(png|mp4)$", pick="astronaut_clip")
        expect(page.get_by_text("astronaut_clip.mp4").first).to_be_visible()
        expect(page.get_by_text("Fake").first).to_be_visible()
        _settle(page)
        page.screenshot(path=shots / "media-case.png", full_page=True)
        browser.close()

    from loupe.workflows.review.store import ReviewStore

    (action,) = ReviewStore(data / "reviews.sqlite").actions("cxr")
    assert action.reviewer == "alice" and action.action == "accept"
    assert {p.name for p in shots.iterdir()} >= {"queue.png", "case.png", "slide-case.png", "media-case.png",
                                                 "agreement.png", "experiments.png", "upload.png"}  # fmt: skip
