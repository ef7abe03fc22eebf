"""Four browser sessions on one lab at once: what each page reports shared, and alone.

The issue's measurement ("A lab a team can share"): four sessions started within
one second against one app server (playwright, four pages in separate browser
contexts: Live, Live, Compare, Step-through), every one with SmolLM2-135M and
prompt lookup on a short prompt, 32 new tokens. Each page's reported speedup is
read from the page (Live: its "Speedup vs target alone" card; Compare: the
drafter's speedup in its Download CSV; Step-through reports none), and the time
each saw the device line's waiting message ("Waiting for the cpu device: 2nd in
line behind ..."). Then the same four runs alone, one at a time. Prints:

    session  page  speedup shared  speedup alone  ratio  waited s

Usage (the app is started here on 127.0.0.1:PORT and stopped at the end; Debian's
Chromium, see /work/shared/BROWSER.md)::

    .venv/bin/python scripts/four_sessions.py --port 8599

Run it on a quiet machine: anything else on the cores moves the figures (the
pages say when they noticed load).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PROMPT = "Fix the spelling: Speculative decodng speeds up generaton without changing its output."
MAX_NEW_TOKENS = 32
SESSIONS = ("live", "live", "compare", "step")
WAITING = re.compile(r"Waiting for the \S+ device: .*")
POLL_S = 0.25
RUN_TIMEOUT_MS = 900_000


@dataclass
class Outcome:
    """What one session's page reported: its speedup (None: the page reports none) and how long it showed the
    device line's waiting message (seconds, to the poll's resolution), with the last such message seen."""

    speedup: float | None = None
    waited_s: float = 0.0
    waiting_text: str = ""
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the server


def serve(port: int, log_path: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {server.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.terminate()
    raise TimeoutError(f"the app did not answer on port {port} within 90 s; see {log_path}")


# ---------------------------------------------------------------- driving each page


async def set_number(page, label: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=label)
    await box.fill(str(value))
    await box.press("Enter")
    await page.wait_for_timeout(600)


async def set_text(page, label: str, text: str) -> None:
    area = page.get_by_role("textbox", name=label, exact=True)
    await area.fill(text)
    await area.press("Control+Enter")
    await page.wait_for_timeout(600)


async def remove_tag(page, text: str) -> None:
    """Take the chip ``text`` out of a multiselect (its "Remove ..." button)."""
    await page.get_by_role("button", name=f"Remove {text}", exact=True).click()
    await page.wait_for_timeout(600)


async def prepare(page, url: str, kind: str) -> None:
    """Open the page and set it up for the run; returns with only the Run click left to do."""
    if kind == "live":
        await page.goto(url)
        await page.get_by_role("heading", name="Speculative Decoding Lab").wait_for()
        await set_number(page, "Max new tokens", MAX_NEW_TOKENS)
        await set_text(page, "Prompt", PROMPT)
    elif kind == "compare":
        await page.goto(f"{url}/compare")
        await page.get_by_role("heading", name="Compare drafters").wait_for()
        await page.get_by_text("Paste prompts", exact=True).click()
        await page.wait_for_timeout(600)
        await set_text(page, "Prompts, separated by a line holding only ---", PROMPT)
        await remove_tag(page, "layer-skip (early exit)")
        await remove_tag(page, "2")  # K values: 4 only, as Live's default K
        await set_number(page, "Max new tokens", MAX_NEW_TOKENS)
        try:  # one prompt x (target alone + 1 drafter x 1 K)
            await page.get_by_text("2 decodes", exact=True).wait_for(timeout=60_000)
        except Exception as error:  # noqa: BLE001 - said in words: the page's widgets were not set as meant
            caption = await page.get_by_text(re.compile(r"decodes")).first.inner_text()
            raise RuntimeError(f"Compare was not set to one prompt, one drafter, one K: {caption!r}") from error
    else:
        await page.goto(f"{url}/step")
        await page.get_by_role("button", name="Start").wait_for()
        await set_number(page, "Max new tokens", MAX_NEW_TOKENS)
        await set_text(page, "Prompt", PROMPT)


async def watch_waiting(page, outcome: Outcome, done: asyncio.Event) -> None:
    """Poll the page for the device line's waiting message until ``done``; its time shown goes in ``outcome``."""
    first = last = None
    while not done.is_set():
        try:
            found = page.get_by_text(WAITING)
            if await found.count():
                outcome.waiting_text = (await found.first.inner_text()).split(". Timings")[0]
                now = time.monotonic()
                first, last = first or now, now
        except Exception:  # noqa: BLE001 - a page mid-redraw; the next poll reads it
            pass
        await asyncio.sleep(POLL_S)
    if first is not None:
        outcome.waited_s = last - first + POLL_S


async def until_enabled(button, timeout_s: float = RUN_TIMEOUT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout_s
    while not (await button.count() and await button.is_enabled()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{button} stayed disabled for {timeout_s:.0f} s")
        await asyncio.sleep(POLL_S)


async def finish(page, kind: str) -> Outcome:
    """Click Run (Start on Step-through) and wait for the page to show the finished run; read its speedup."""
    outcome = Outcome()
    done = asyncio.Event()
    watcher = asyncio.create_task(watch_waiting(page, outcome, done))
    started = time.monotonic()
    try:
        if kind == "live":
            await page.get_by_role("button", name="Run", exact=True).click()
            card = page.locator('[data-testid="stMetric"]').filter(has_text="Speedup vs target alone")
            await page.get_by_text(re.compile(r"^Last run:")).wait_for(timeout=RUN_TIMEOUT_MS)
            value = await card.locator('[data-testid="stMetricValue"]').inner_text()
            outcome.speedup = float(value.rstrip("×")) if value.strip() not in ("—", "") else None
            busy = page.get_by_text(re.compile(r"^Measured while the machine was busy"))
            if await busy.count():  # "other processes kept 1.13 of 2 cores busy ..."
                found = re.search(r"other processes kept [\d.]+ of \d+ cores busy", await busy.first.inner_text())
                outcome.notes.append("busy machine: " + (found.group(0) if found else "see the page"))
        elif kind == "compare":
            await page.get_by_role("button", name="Run comparison").click()
            await page.get_by_text(re.compile(r"^Complete:")).wait_for(timeout=RUN_TIMEOUT_MS)
            async with page.expect_download() as download:
                await page.get_by_role("button", name="Download CSV").click()
            path = await (await download.value).path()
            rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
            drafted = [r for r in rows if r["drafter"] != "target alone" and r.get("speedup")]
            outcome.speedup = float(drafted[0]["speedup"]) if drafted else None
        else:
            await page.get_by_role("button", name="Start").click()
            ahead = page.get_by_role("button", name="Next 5 cycles")
            finished = page.get_by_text(re.compile(r"^Finished \("))
            await until_enabled(ahead)  # disabled until Start has prefilled (after its wait for the device)
            stop = page.get_by_role("button", name="Stop")
            deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
            while not await finished.count() and time.monotonic() < deadline:
                if await ahead.is_enabled() and not await stop.count():  # the last cycles drawn: five more
                    await ahead.click()
                await page.wait_for_timeout(1000)
            await finished.wait_for(timeout=RUN_TIMEOUT_MS)
            outcome.notes.append("Step-through reports no speedup")
        await page.get_by_role("button", name="Stop").wait_for(state="detached", timeout=RUN_TIMEOUT_MS)
    except Exception:
        await page.screenshot(path=f"/tmp/four_sessions_{kind}.png")  # what the page showed when it went wrong
        raise
    finally:
        outcome.wall_s = time.monotonic() - started
        done.set()
        await watcher
    return outcome


# ---------------------------------------------------------------- the measurement


async def measure(url: str, shared: bool) -> list[Outcome]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = []
            for _ in SESSIONS:
                context = await browser.new_context(viewport={"width": 1400, "height": 2200})
                page = await context.new_page()
                page.set_default_timeout(180_000)
                pages.append(page)
            await asyncio.gather(*(prepare(page, url, kind) for page, kind in zip(pages, SESSIONS)))
            if shared:  # all four Run clicks within one second
                return list(await asyncio.gather(*(finish(page, kind) for page, kind in zip(pages, SESSIONS))))
            return [await finish(page, kind) for page, kind in zip(pages, SESSIONS)]
        finally:
            await browser.close()


def ratio(shared: float | None, alone: float | None) -> str:
    return "—" if shared is None or alone is None or alone == 0 else f"{shared / alone:.2f}"


def speedup_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def table(shared: list[Outcome], alone: list[Outcome]) -> str:
    """The printed table, a row per session, then what the pages noted (shared / alone)."""
    header = (f"{'session':<8} {'page':<13} {'speedup shared':>14} {'speedup alone':>13} {'ratio':>6} "
              f"{'waited s':>8}  {'wall s shared/alone':>19}  waited behind")
    lines = [header, "-" * len(header)]
    pages = {"live": "Live", "compare": "Compare", "step": "Step-through"}
    for number, (kind, s, a) in enumerate(zip(SESSIONS, shared, alone), start=1):
        behind = s.waiting_text.split("behind ")[-1] if s.waiting_text else "—"
        waited = "n/a" if kind == "step" else f"{s.waited_s:.1f}"  # its page shows no waiting message
        lines.append(f"{number:<8} {pages[kind]:<13} {speedup_text(s.speedup):>14} {speedup_text(a.speedup):>13} "
                     f"{ratio(s.speedup, a.speedup):>6} {waited:>8}  {s.wall_s:>8.1f} / {a.wall_s:<8.1f}  {behind}")
    for number, (s, a) in enumerate(zip(shared, alone), start=1):
        for when, outcome in (("shared", s), ("alone", a)):
            lines += [f"  session {number}, {when}: {note}" for note in outcome.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8599, help="the port to serve the app on (127.0.0.1)")
    parser.add_argument("--log", type=Path, default=Path("/tmp/four_sessions_streamlit.log"),
                        help="where the app's output goes")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        parser.error(f"{CHROMIUM} is missing: apt-get install -y chromium (see /work/shared/BROWSER.md)")

    server = serve(args.port, args.log)
    try:
        url = f"http://127.0.0.1:{args.port}"
        print(f"app on {url}; four sessions at once ({', '.join(SESSIONS)}), then each alone…", file=sys.stderr)
        shared = asyncio.run(measure(url, shared=True))
        alone = asyncio.run(measure(url, shared=False))
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()

    print(table(shared, alone))
    return 0


if __name__ == "__main__":
    sys.exit(main())
