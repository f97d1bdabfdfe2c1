"""The Dagster UI in a real browser: the asset graph, "Materialize all", what fitted_params
tells, and screenshots.

`dagster dev` serves the bundled sample dump (`data/sample/`, 20k posts) on 127.0.0.1; headless
Chromium (Debian's `/usr/bin/chromium`, driven by Playwright for Python) opens the global asset
lineage, checks that every asset is drawn, clicks "Materialize all" and waits for the run to
succeed; then it opens `fitted_params` and checks that the model comparison table and the
stage curves are shown. The screenshots (asset graph, fitted_params, its stage curves) land in
pytest's tmp dir and, when `E6SCORE_SCREENSHOT_DIR` is set, are copied there too
(`python benchmarks/screenshots.py` refreshes `benchmarks/screenshots/` that way).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from e6score_dagster_tests.dagster_dev import REPO_ROOT, DagsterDev

CHROMIUM = Path("/usr/bin/chromium")
# Flags known to work on these machines: without the background-networking ones Chromium
# keeps knocking on the closed network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SAMPLE = REPO_ROOT / "data" / "sample"
ASSETS = [
    "e621_dump", "raw_dump", "cleaned_posts", "tag_vocabulary", "feature_matrix",
    "fitted_params", "scored_posts",
]
MATERIALIZABLE = len(ASSETS) - 1  # e621_dump is an observable source, never materialised

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing (pip install -e '.[dev]')"
)


def _wait_count(page, locator, n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while locator.count() < n and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    return locator.count() == n


@pytest.mark.slow
def test_materialize_all_from_the_asset_graph(tmp_path):
    dagster = DagsterDev(tmp_path, SAMPLE)
    shot = tmp_path / "asset_graph.png"
    params_shot = tmp_path / "fitted_params.png"
    curves_shot = tmp_path / "fitted_params_curves.png"
    last = tmp_path / "last_seen.png"
    page = None  # for the failure screenshot
    t0 = time.monotonic()
    try:
        dagster.wait_ready()
        t_ready = time.monotonic()
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(30_000)
                # A fresh DAGSTER_HOME greets the first visit with "Join the Dagster
                # community"; whenever it gets in the way, skip it.
                nux = page.get_by_role("dialog").filter(has_text="Join the Dagster community")
                page.add_locator_handler(
                    nux, lambda d: d.get_by_role("button", name="Skip").click()
                )
                page.goto(f"{dagster.base}/asset-groups")
                materialize_all = page.get_by_role("button", name=re.compile(r"Materialize all \("))
                materialize_all.wait_for()

                # More room for the graph: fold the navigation and the asset tree away.
                page.get_by_role("button", name="Hide navigation").click()
                page.locator("button:has([aria-label=panel_show_right])").last.click()
                # Groups (ingest/features/model/scoring) start collapsed: expand them all
                # through the graph's settings menu. The community dialog may pop up while the
                # menu is open and close it: then open the menu again.
                for attempt in range(3):
                    page.locator("button:has([aria-label=settings])").last.click()
                    try:
                        page.get_by_role("menuitem", name="Expand all groups").click(
                            timeout=5_000
                        )
                        break
                    except sync_api.TimeoutError:
                        if attempt == 2:
                            raise
                page.keyboard.press("Escape")
                graph = page.locator("[data-svg-viewport]")
                for name in ASSETS:
                    node = graph.get_by_text(name, exact=True)
                    node.first.wait_for(timeout=15_000)
                label = materialize_all.inner_text()
                assert f"Materialize all ({MATERIALIZABLE})" in label, label
                page.screenshot(path=last)

                materialize_all.click()
                launched = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
                confirm = page.get_by_role("dialog").filter(
                    has=page.get_by_role("button", name=re.compile(r"Launch|Materialize"))
                )
                launched.or_(confirm).first.wait_for()
                if not launched.is_visible():  # a confirmation dialog instead of a launch
                    confirm.get_by_role(
                        "button", name=re.compile(r"Launch|Materialize")
                    ).last.click()
                    launched.wait_for()
                run_prefix = re.search(r"[0-9a-f]{8}", launched.inner_text()).group()
                t_launched = time.monotonic()
                page.screenshot(path=last)

                run = dagster.wait_run(run_prefix, timeout=120)
                assert run["status"] == "SUCCESS", f"run {run['runId']} ended {run['status']}"
                t_done = time.monotonic()

                # The graph after success: every materialisable node turns green, live; should
                # the live update be missed, a reload shows the stored state.
                green = graph.locator('[style*="--color-background-green"]')
                if not _wait_count(page, green, MATERIALIZABLE, timeout=20):
                    page.reload()
                    materialize_all.wait_for()
                    page.locator("button:has([aria-label=panel_show_right])").last.click()
                    assert _wait_count(page, green, MATERIALIZABLE, timeout=20), (
                        f"{green.count()} of {MATERIALIZABLE} asset nodes shown as materialised"
                    )
                page.screenshot(path=shot)
                _check_fitted_params(page, dagster.base, params_shot, curves_shot)
            except Exception:
                if page is not None:
                    with contextlib.suppress(Exception):
                        page.screenshot(path=last)
                raise
            finally:
                browser.close()
    except Exception as exc:
        pytest.fail(
            f"{type(exc).__name__}: {exc}\nlast screenshot: {last}\n"
            f"dagster dev log ({dagster.log_path}), last lines:\n{dagster.log_tail()}",
            pytrace=True,
        )
    finally:
        dagster.stop()

    shots = [shot, params_shot, curves_shot]
    out_dir = os.environ.get("E6SCORE_SCREENSHOT_DIR")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shots = [Path(shutil.copy(s, Path(out_dir) / s.name)) for s in shots]
    print(
        f"screenshots: {', '.join(map(str, shots))} (server up {t_ready - t0:.0f} s, launch "
        f"{t_launched - t_ready:.0f} s, run {t_done - t_launched:.0f} s)"
    )


def _check_fitted_params(page, base: str, shot: Path, curves_shot: Path) -> None:
    """fitted_params' page leads with the comparison table, shown inline, and its stage
    curves open as one plot."""
    page.goto(f"{base}/assets/fitted_params")
    table = page.locator("td table").filter(has_text="Spearman")
    table.first.wait_for()
    text = table.first.inner_text()
    rows = [line.split("\t")[0].strip() for line in text.splitlines()[1:]]
    assert {"constant", "linear"} <= {r.replace("✓", "").strip() for r in rows}, text
    assert sum("✓" in r for r in rows) == 1, text  # exactly one model marked as in use
    assert not re.search(r"\d\.\d{5,}", text), text  # rounded, not 16-digit floats
    keys = page.locator("td").filter(has_text=re.compile(r"^(model_comparison|stage_curves)$"))
    assert keys.count() == 2
    page.screenshot(path=shot)

    row = page.locator("tr").filter(has=page.get_by_text("stage_curves", exact=True))
    row.last.get_by_text("[Show Markdown]").click()
    plot = page.get_by_role("dialog").locator("img[alt='stage curves']")
    plot.wait_for()
    assert plot.count() == 1 and plot.evaluate("img => img.naturalWidth") > 100
    page.wait_for_timeout(1000)  # let the dialog finish fading in
    page.screenshot(path=curves_shot)
    page.get_by_role("dialog").get_by_role("button", name="Close").click()
