"""The report in a real browser: Debian's chromium, headless, driven by playwright."""

import os
import shutil
from pathlib import Path

import pytest

from normscope_reports import build_report

from conftest import FINDINGS

CHROMIUM = os.environ.get("NORMSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


@pytest.fixture(scope="module")
def page(small_run, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: scripts/test.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    report = build_report(small_run, findings=FINDINGS, out=tmp_path_factory.mktemp("rep") / "report.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.events = {"console": [], "requests": [], "dialogs": []}
        pg.on("console", lambda m: pg.events["console"].append(m) if m.type in ("error", "warning") else None)
        pg.on("pageerror", lambda e: pg.events["console"].append(e))
        pg.on("request", lambda r: pg.events["requests"].append(r.url))
        pg.on("dialog", lambda d: (pg.events["dialogs"].append(d.message), d.dismiss()))
        pg.goto(report.as_uri())
        pg.wait_for_load_state("load")
        yield pg
        ARTIFACTS.mkdir(exist_ok=True)
        pg.evaluate("window.scrollTo(0, 0)")
        pg.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()


def test_no_console_errors_no_network_no_script_injection(page):
    assert page.events["console"] == []
    assert all(u.startswith(("file:", "data:")) for u in page.events["requests"]), page.events["requests"]
    assert page.events["dialogs"] == []
    assert page.locator("td.name", has_text="<script>alert(1)</script>").count() == 1


def test_every_image_loaded(page):
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) >= 7 and min(widths) > 0


def test_findings_listed_and_link_scrolls_to_layer(page):
    findings = page.locator("#findings .finding")
    assert findings.count() == 2
    assert "saturation" in findings.first.inner_text()  # warnings before info
    page.evaluate("window.scrollTo(0, 0)")
    findings.first.locator("a.layer-link").click()
    page.wait_for_function("window.scrollY > 0")
    target = page.evaluate("location.hash")
    assert target.startswith("#layer-")
    top = page.eval_on_selector(target, "el => el.getBoundingClientRect().top")
    assert 0 <= top < 900
    assert "gate" in page.inner_text(target)


def test_sorting_the_table_reorders_rows(page):
    def column(i):
        return page.eval_on_selector_all(
            "#layer-table tbody tr", f"rows => rows.map(r => parseFloat(r.cells[{i}].getAttribute('data-v')))"
        )

    headers = page.eval_on_selector_all("#layer-table th", "hs => hs.map(h => h.textContent)")
    col = headers.index("std")
    before = column(col)
    page.locator("#layer-table th", has_text="std").click()
    asc = column(col)
    assert asc == sorted(asc) and asc != before
    page.locator("#layer-table th", has_text="std").click()
    assert column(col) == sorted(asc, reverse=True)


def test_filter_hides_rows(page):
    page.fill("#layer-filter", "conv")
    visible = page.eval_on_selector_all("#layer-table tbody tr", "rows => rows.filter(r => r.style.display !== 'none').length")
    assert visible == 1
    page.fill("#layer-filter", "")
