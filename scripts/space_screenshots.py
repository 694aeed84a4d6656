"""Drive the Space in a real headless Chromium: fill the Merge form, run it, run a comparison, take screenshots.

    python scripts/space_screenshots.py [--output spaces/screenshots] [--limit 64]

Uses Debian's Chromium (``apt-get install chromium``) through the ``playwright`` package, never a downloaded
browser. Every request that is not to the app on loopback is refused and reported, so the run also shows that the
page needs nothing from outside. The browser test (tests/space/test_browser.py) runs the same steps.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM = os.environ.get("HF_FUSION_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RESULT_TIMEOUT_MS = 300_000


@contextmanager
def browser_page(width: int = 1400, height: int = 1000) -> Iterator[tuple[Any, list[str]]]:
    """A page in headless Chromium whose requests may only reach loopback; yields (page, refused URLs)."""
    from playwright.sync_api import sync_playwright

    refused: list[str] = []

    def only_loopback(route: Any) -> None:
        if urlparse(route.request.url).hostname in LOOPBACK or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.route("**/*", only_loopback)
            yield page, refused
        finally:
            browser.close()


def pick(page: Any, label: str, option: str) -> None:
    """Chooses ``option`` in the gradio dropdown labelled ``label``."""
    page.get_by_label(label, exact=True).filter(visible=True).first.click()
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page: Any, label: str, value: float) -> None:
    box = page.get_by_label(label, exact=True).filter(visible=True).first
    box.fill(str(value))
    box.press("Tab")


def recipe_text(page: Any) -> str:
    return page.locator(".cm-content").first.inner_text()


def drive_merge(
    page: Any, url: str, *, method: str = "task_arithmetic", scaling_factor: float = 0.4, limit: int = 32
) -> None:
    """Fills the Merge form (method, a parameter, examples per task), clicks Merge and waits for the scores."""
    page.goto(url)
    page.get_by_role("button", name="Merge", exact=True).wait_for()
    pick(page, "Method", f"{method} (merge)")
    page.wait_for_function("m => document.querySelector('.cm-content').innerText.includes('method: ' + m)", arg=method)
    slider_box = page.locator("#merge-params input[type=number]:visible").first
    slider_box.fill(str(scaling_factor))
    slider_box.press("Tab")
    page.wait_for_function(
        "v => document.querySelector('.cm-content').innerText.includes('scaling_factor: ' + v)", arg=str(scaling_factor)
    )
    set_number(page, "Examples per task (0 = all)", limit)
    page.get_by_role("button", name="Merge", exact=True).click()
    page.locator("#merge-scores").get_by_text("fused", exact=True).wait_for(timeout=RESULT_TIMEOUT_MS)
    page.get_by_text("Merged 3 models").wait_for()


def drive_compare(page: Any, url: str, *, sweep: str = "scaling_factor=0.2:1.0:0.2", limit: int = 32) -> None:
    """Runs the default methods with a sweep on the Compare tab and waits for the leaderboard and plots."""
    page.goto(url)
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Sweep (optional)").fill(sweep)
    set_number(page, "Examples per task (0 = all)", limit)
    page.get_by_role("button", name="Compare", exact=True).click()
    page.locator("#compare-leaderboard").get_by_text("individual", exact=True).wait_for(timeout=RESULT_TIMEOUT_MS)
    page.get_by_text("Compared").wait_for()
    page.locator("img[src*='sweep_scaling_factor']").wait_for()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("spaces/screenshots"))
    parser.add_argument("--limit", type=int, default=64, help="examples per task")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.output.mkdir(parents=True, exist_ok=True)
    import tempfile

    from hf_fusion.space import serving

    with (
        tempfile.TemporaryDirectory() as root,
        serving(root=root, in_space=False) as url,
        browser_page() as (page, refused),
    ):
        drive_merge(page, url, limit=args.limit)
        page.screenshot(path=str(args.output / "merge.png"), full_page=True)
        drive_compare(page, url, limit=args.limit)
        page.screenshot(path=str(args.output / "compare.png"), full_page=True)
    if refused:
        print("refused requests outside loopback:", *refused, sep="\n  ", file=sys.stderr)
        return 1
    print(f"Screenshots in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
