"""Screenshot TensorBoard's scalars dashboard for a log directory, as a person would see it.

Starts a real ``tensorboard`` server on 127.0.0.1, waits until it serves the run's scalar tags, then renders
the dashboard with headless Chromium (Debian package ``chromium``) driven by Playwright (``pip install
playwright``; no browser download: the system Chromium is used) into a PNG.

    python scripts/tensorboard_screenshot.py lightning_logs docs/tensorboard.png --filter geometry
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Flags for a closed network (no background connections) and software GL so the charts draw headless.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_tags(url: str, timeout: float = 60.0) -> dict:
    """Poll ``/data/plugin/scalars/tags`` until at least one run has tags."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as resp:
                tags = json.load(resp)
            if any(tags.values()):
                return tags
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard at {url} served no scalar tags within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--filter", default="geometry", help="tag filter regex typed into the dashboard")
    parser.add_argument("--size", default="1600,1400", help="window size WIDTH,HEIGHT")
    parser.add_argument("--wait-ms", type=int, default=5000, help="time for the charts to render")
    parser.add_argument("--smoothing", type=float, default=0.0,
                        help="the dashboard's scalar smoothing (TensorBoard's default 0.6 bends step-like curves)")
    args = parser.parse_args(argv)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("headless Chromium not found: install it (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        tags = wait_for_tags(url)
        print(f"tensorboard serves {sum(len(v) for v in tags.values())} scalar tags in {len(tags)} run(s)")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        width, height = (int(v) for v in args.size.split(","))
        from playwright.sync_api import sync_playwright  # dev-only dependency: pip install playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"{url}/#timeseries", wait_until="networkidle")
            page.get_by_role("combobox", name="Filter tags (regex)").fill(args.filter)
            page.keyboard.press("Escape")
            smoothing = page.locator("input.slider-input[type=number]").first  # the settings pane's first number
            smoothing.fill(str(args.smoothing))
            smoothing.press("Enter")
            page.get_by_role("button", name="Toggle settings side pane").click()  # charts get the width
            page.wait_for_timeout(args.wait_ms)
            page.screenshot(path=str(args.output), full_page=True)
            browser.close()
        print(f"wrote {args.output}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
