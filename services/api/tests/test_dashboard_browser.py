"""The dashboard in a real browser (headless Chromium driven by Selenium): real searches on the
synthetic environment (the `groundloop search` CLI as a subprocess, every service, a real
nats-server), the real app served by uvicorn, pages checked against the store, a live update
timed, screenshots saved to $GROUNDLOOP_SCREENSHOTS (default test-artifacts/screenshots/).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from groundloop import events as ev
from groundloop.api import ranking, service
from groundloop.api.serve import Dashboard, start_dashboard
from groundloop.api.store import IdeaRow, RunRow, SearchRow, make_engine
from groundloop.bus import Bus
from groundloop.settings import Settings
from tests.paths import REPO_ROOT
from tests.test_search_e2e import cli_env, settings_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip(
        "no Chromium: apt-get install chromium chromium-driver (.ci/run does)",
        allow_module_level=True,
    )
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SHOTS = Path(
    os.environ.get("GROUNDLOOP_SCREENSHOTS") or REPO_ROOT / "test-artifacts" / "screenshots"
)


class Served:
    """The dashboard (and, when asked, a projector) on an event loop of their own thread, so
    the synchronous browser code can drive pages while they serve."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.dashboard: Dashboard = self.call(start_dashboard(settings, port=0))
        self.stop_projector: asyncio.Event | None = None
        self.projector: Any = None

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_projector(self) -> None:
        async def start() -> None:
            self.stop_projector = asyncio.Event()
            self.projector = asyncio.create_task(service.run(self.settings, self.stop_projector))

        self.call(start())

    def close(self) -> None:
        async def stop() -> None:
            await self.dashboard.stop()
            if self.stop_projector is not None:
                self.stop_projector.set()
                await self.projector

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def start_search(settings: Settings, search_id: str, *args: str) -> subprocess.Popen:
    log = settings.data_dir.parent / f"{search_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "groundloop.cli.main", "search", "--env", "synthetic"]
        + ["--search-id", search_id, "--generations", "2", "--ideas", "3", *args],
        env=cli_env(settings),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def finished(proc: subprocess.Popen, settings: Settings, search_id: str) -> None:
    rc = proc.wait(120)
    log = (settings.data_dir.parent / f"{search_id}.log").read_text()
    assert rc == 0, f"groundloop search {search_id} exited {rc}:\n{log[-3000:]}"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1600,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, what: str, condition: Callable[[Any], Any], timeout: float = 20) -> Any:
    # the pages re-render when the live feed says something changed: elements go stale
    return WebDriverWait(
        driver, timeout, poll_frequency=0.02, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition, message=f"the page never showed {what}")


def text(driver, css: str) -> str | None:
    """The text of the first match, read in one step (a re-render cannot stale it)."""
    return driver.execute_script(
        "return document.querySelector(arguments[0])?.textContent ?? null", css
    )


def count(driver, css: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length", css)


def screenshot(driver, name: str) -> Path:
    """The whole page, not just the window: grow the window to the document's height."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1600, min(max(height + 20, 900), 5000))
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1600, 1000)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def value(driver, css: str) -> float | None:
    """The exact number behind a rounded one (data-value), or None if not shown yet."""
    raw = driver.execute_script(
        "return document.querySelector(arguments[0])?.dataset.value ?? null",
        f"{css} [data-value], {css}[data-value]",
    )
    return float(raw) if raw else None


def test_dashboard_shows_real_searches_live_and_equal_to_the_store(nats_server, tmp_path, browser):
    settings = settings_for(nats_server.url, tmp_path, "UI")
    engine = make_engine(settings.resolved_db_url())
    served = Served(settings)
    try:
        # ---- the searches page is open before the search starts: it arrives live
        browser.get(served.dashboard.url)
        wait_for(
            browser,
            "the live feed open",
            lambda d: (
                d.execute_script("return document.getElementById('live').dataset.state") == "open"
            ),
        )
        browser.execute_script("window.__noReload = true")
        proc = start_search(settings, "evo")
        row = '#searches-table tr[data-search="evo"]'
        wait_for(browser, "search evo", lambda d: d.find_elements(By.CSS_SELECTOR, row))
        wait_for(
            browser,
            "evo completed",
            lambda d: "completed" in (text(d, f"{row} [data-field=status]") or ""),
            60,
        )
        finished(proc, settings, "evo")
        assert browser.execute_script("return window.__noReload") is True, "the page reloaded"
        finished(start_search(settings, "bon", "--strategy", "best_of_n"), settings, "bon")
        wait_for(
            browser,
            "search bon",
            lambda d: d.find_elements(
                By.CSS_SELECTOR, '#searches-table tr[data-search="bon"] .badge-completed'
            ),
        )

        with Session(engine) as session:
            search = session.get(SearchRow, "evo")
            board = ranking.leaderboard(session, "evo", include_baseline=False)
            with_baseline = ranking.leaderboard(session, "evo")
            runs = session.exec(select(RunRow).where(RunRow.search_id == "evo")).all()
            ideas = session.exec(
                select(IdeaRow).where(IdeaRow.search_id == "evo", IdeaRow.mode != "baseline")
            ).all()
        assert search is not None and board
        wait_for(
            browser,
            "evo's final numbers",
            lambda d: value(d, f"{row} [data-field=final_best_score]") == search.best_score,
        )
        assert text(browser, f"{row} [data-field=ideas]") == str(len(ideas))
        assert value(browser, f"{row} [data-field=best_score]") == board[0].standing.mean_score
        assert (text(browser, f"{row} [data-field=runs]") or "").startswith(
            f"{sum(r.status == 'succeeded' for r in runs)} /"
        )
        screenshot(browser, "searches")

        # ---- one search
        browser.get(f"{served.dashboard.url}#/search/evo")
        wait_for(browser, "the curve", lambda d: d.find_elements(By.CSS_SELECTOR, "#curve svg"))
        assert value(browser, "[data-card=best_score]") == board[0].standing.mean_score
        assert count(browser, "#leaderboard tbody tr") == len(with_baseline)
        assert count(browser, "#curve svg .mark") == sum(
            1 for r in runs if r.completed_at and r.purpose != "reeval"
        )
        final = search.final[0]
        assert value(browser, "#final-table [data-field=final_mean]") == final["mean"]
        assert count(browser, "#lineage .edge"), "no lineage edges"
        screenshot(browser, "search")

        # ---- one idea: the leader, with its diff, pre-flight, runs and log
        leader = board[0].idea
        browser.get(f"{served.dashboard.url}#/idea/{leader.idea_id}")
        wait_for(browser, "the diff", lambda d: d.find_elements(By.CSS_SELECTOR, "#diff .dl-add"))
        assert text(browser, "h1") == leader.title
        assert count(browser, "#runs .run") == sum(1 for r in runs if r.idea_id == leader.idea_id)
        assert value(browser, "[data-card=mean_score]") == leader.mean_score
        assert count(browser, "#preflight tbody tr")
        wait_for(
            browser,
            "a run's log",
            lambda d: any(p.text.strip() for p in d.find_elements(By.CSS_SELECTOR, "pre.log")),
        )
        screenshot(browser, "idea")

        # ---- comparison of the two searches
        browser.get(f"{served.dashboard.url}#/compare?ids=evo,bon")
        wait_for(
            browser,
            "two curves",
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-plot path")) >= 2,
        )
        screenshot(browser, "compare")

        # ---- a live update: a new idea published to the log shows on the open search page
        served.start_projector()  # the searches' own projectors ended with them
        browser.get(f"{served.dashboard.url}#/search/evo")
        wait_for(browser, "the ideas list", lambda d: d.find_elements(By.CSS_SELECTOR, "#ideas li"))
        wait_for(
            browser,
            "the live feed open",
            lambda d: (
                d.execute_script("return document.getElementById('live').dataset.state") == "open"
            ),
        )
        started = next(e for e in bus_log(served, "evo") if isinstance(e, ev.GenerationAdvanced))
        idea = started.derive(
            ev.IdeaProposed,
            "test",
            777,
            idea_id="live-idea",
            generation=1,
            mode="explore",
            title="Live: halve the warmup",
            text="published by the browser test",
            proposer=ev.ProposerInfo(kind="knobs"),
        )
        sent = time.perf_counter()
        served.call(publish(settings, idea))
        wait_for(
            browser,
            "the new idea",
            lambda d: d.find_elements(By.CSS_SELECTOR, '#ideas li[data-idea="live-idea"]'),
            10,
        )
        latency = time.perf_counter() - sent
        print(
            f"\nlive update: IdeaProposed published -> shown on the search page in {latency * 1000:.0f} ms"
        )
        assert latency < 2.0, f"the live update took {latency:.2f} s"
        assert "IdeaProposed" in (text(browser, "#activity") or "")
        screenshot(browser, "search-live")
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, f"errors in the browser console: {logs}"
    finally:
        served.close()
        engine.dispose()


async def publish(settings: Settings, event: ev.Event) -> None:
    bus = await Bus.connect(settings, "test-publisher")
    try:
        await bus.publish(event)
    finally:
        await bus.close()


def bus_log(served: Served, search_id: str) -> list[ev.Event]:
    async def read() -> list[ev.Event]:
        bus = await Bus.connect(served.settings, "test-reader")
        try:
            return [e async for e in bus.events(search_id)]
        finally:
            await bus.close()

    return served.call(read())
