"""Make docs/report.png and docs/report-items.png: the HTML report of the example suites
(its top, and its items filtered to those that flipped with temperature), as a browser
shows them.

    pytest -n 8 example_suites --llm-sim --llm-html report.html
    python docs/screenshot.py report.html

Needs the test extra (playwright) and a chromium on PATH (Debian: apt install chromium).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent


def main(report: str, out: Path = HERE / "report.png") -> None:
    items = out.with_name(out.stem + "-items.png")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("screenshot.py: no chromium on PATH")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1366, "height": 900}, offline=True)
        page.goto(Path(report).resolve().as_uri())
        page.wait_for_selector(".main-svg")
        page.screenshot(path=str(out), full_page=False)
        page.select_option("#suite-filter", label="test_truthfulqa")
        page.click("button[data-filter='flipped']")
        box = page.locator("#items").bounding_box()
        assert box is not None
        clip = {**box, "height": min(box["height"], 860.0)}  # the first ten items or so
        page.screenshot(path=str(items), full_page=True, clip=clip)  # type: ignore[arg-type]
        browser.close()
    print(f"wrote {out} and {items}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "report.html")
