"""The Space in a real headless Chromium (Debian's, driven by playwright): fill the form, merge, see the scores; the
Diffusion tab shows its caps and fills a block preset.

Only loopback is reachable from the page: any other request is refused and fails the test.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from space_screenshots import CHROMIUM, browser_page, drive_compare, drive_merge, pick, recipe_text  # noqa: E402

pytest.importorskip("playwright")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


def shown(locator: Any) -> bool:
    return locator.filter(visible=True).count() > 0


def test_merge_in_the_browser_shows_the_score_table(space_url: str, tmp_path: Path) -> None:
    with browser_page() as (page, refused):
        drive_merge(page, space_url, method="task_arithmetic", scaling_factor=0.4, limit=16)
        recipe = recipe_text(page)
        assert "method: task_arithmetic" in recipe and "scaling_factor: 0.4" in recipe
        table = page.locator("#merge-scores")
        for row in ("pretrained", "individual", "fused"):
            assert shown(table.get_by_text(row, exact=True))
        for column in ("bbc_news", "twitter_sentiment", "sms_spam", "average", "normalized"):
            assert shown(table.get_by_text(column, exact=True))
        assert shown(page.get_by_text(".zip"))
        shot = tmp_path / "merge.png"
        page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert refused == []


def test_compare_in_the_browser_shows_leaderboard_and_plots(space_url: str, tmp_path: Path) -> None:
    with browser_page() as (page, refused):
        drive_compare(page, space_url, sweep="scaling_factor=0.3,0.6", limit=16)
        board = page.locator("#compare-leaderboard")
        assert shown(board.get_by_text("task_arithmetic[scaling_factor=0.6]", exact=True))
        assert shown(board.get_by_text("simple_average", exact=True))
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
    assert refused == []


def test_the_diffusion_tab_shows_its_caps_and_fills_a_block_preset(space_url: str, tmp_path: Path) -> None:
    import yaml

    with browser_page() as (page, refused):
        page.goto(space_url)
        page.get_by_role("tab", name="Diffusion").click()
        page.locator("#diffusion-caps").get_by_text("Limits on this Space", exact=False).wait_for()
        assert shown(page.get_by_role("button", name="Merge and draw", exact=True))
        pick(page, "Block weights preset", "SD 1.x / 2.x UNet, 25 blocks: ramp up, IN00 low to the last OUT high")
        page.wait_for_function(
            "() => document.querySelector('#diffusion-recipe .cm-content').innerText.includes('filter: unet.')"
        )
        box = page.get_by_label("Per layer or per tensor").filter(visible=True).first
        conditions = yaml.safe_load(box.input_value())["scaling_factor"]
        assert conditions[0]["filter"] == "unet." and len(conditions[0]["value"]) == 25
        assert conditions[0]["value"][0] == 0 and conditions[0]["value"][-1] == 1
        assert conditions[1] == {"value": 0.3}  # the other tensors keep the slider's value
        page.screenshot(path=str(tmp_path / "diffusion.png"), full_page=True)
    assert refused == []


def test_closing_the_tab_removes_the_sessions_files(space_url: str, space_root: Path) -> None:
    def sessions() -> set[Path]:
        return {p for p in space_root.glob("server-*/session-*") if any(p.rglob("*.safetensors"))}

    before = sessions()
    with browser_page() as (page, refused):
        drive_merge(page, space_url, method="task_arithmetic", scaling_factor=0.4, limit=8)
        mine = sessions() - before
        assert len(mine) == 1, "the merge kept its folder for Push"
        page.close()  # the tab goes away; the browser stays
        deadline = time.time() + 60  # gradio notices through its heartbeat
        while time.time() < deadline and any(p.exists() for p in mine):
            time.sleep(0.5)
    assert not any(p.exists() for p in mine)
    assert refused == []
