"""The report in a real browser: Debian's chromium, headless, driven by playwright."""

import os
import shutil
from pathlib import Path

import pytest
from report_testlib import FINDINGS

from normscope_reports import build_report

CHROMIUM = os.environ.get("NORMSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "dropout_before_bn.py"


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    """A real fixture run with its real findings (dropout directly before BatchNorm)."""
    import normscope

    run = normscope.probe(normscope.load_recipe(FIXTURE), run_dir=tmp_path_factory.mktemp("fx") / "run")
    analysis = normscope.analyze_full(run)
    assert any(f.check == "dropout-bn-variance-shift" for f in analysis.findings)
    return build_report(run, findings=analysis.findings, skipped=analysis.skipped)


@pytest.fixture(scope="module")
def browser():
    """One playwright driver and chromium for the module (two sync drivers cannot nest)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: scripts/test.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _open(browser, report: Path):
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
    pg.screenshot(path=str(ARTIFACTS / f"report-{report.parent.parent.name}.png"), full_page=True)
    pg.close()


@pytest.fixture(scope="module")
def page(browser, fixture_report):
    yield from _open(browser, fixture_report)


@pytest.fixture(scope="module")
def xss_page(browser, small_run, tmp_path_factory):
    yield from _open(
        browser, build_report(small_run, findings=FINDINGS, out=tmp_path_factory.mktemp("xss") / "report.html")
    )


def test_no_console_errors_no_network(page):
    assert page.events["console"] == []
    assert all(u.startswith(("file:", "data:")) for u in page.events["requests"]), page.events["requests"]


def test_module_name_is_text_not_script(xss_page):
    assert xss_page.events["dialogs"] == [] and xss_page.events["console"] == []
    assert xss_page.locator("td.name", has_text="<script>alert(1)</script>").count() == 1
    assert xss_page.locator("#findings a.layer-link", has_text="<script>alert(1)</script>").count() == 1


def test_every_image_loaded(page):
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) >= 8 and min(widths) > 0


def test_findings_listed_and_link_scrolls_to_layer(page):
    finding = page.locator("#findings .finding[data-check='dropout-bn-variance-shift']")
    assert finding.count() == 1 and "warning" in finding.inner_text()
    layer = finding.locator("a.layer-link").inner_text()
    page.evaluate("window.scrollTo(0, 0)")
    finding.locator("a.layer-link").click()
    page.wait_for_function("window.scrollY > 0")
    target = page.evaluate("location.hash")
    assert target.startswith("#layer-")
    top = page.eval_on_selector(target, "el => el.getBoundingClientRect().top")
    assert -2 <= top < 900  # scrolled into view (sub-pixel rounding can leave it a fraction of a px above)
    assert page.inner_text(f"{target} h3").startswith(layer)


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
    page.fill("#layer-filter", "batchnorm")
    visible = page.eval_on_selector_all(
        "#layer-table tbody tr", "rows => rows.filter(r => r.style.display !== 'none').length"
    )
    assert visible == 1
    page.fill("#layer-filter", "")
