"""The web page in headless Chromium: the browser that tests/test_web.py drives, and the README's
screenshot (docs/web-page.png), taken of a real served model and index:

    .venv/bin/python -m benchmarks.web_screenshot --index runs/index/fmnist-web \\
        --model flow=checkpoints/flow-distilled-fashion-mnist --model cvae=checkpoints/cvae-fashion-mnist \\
        --query 'category=Dress&seed=7&topK=12&numSamples=4' --out docs/web-page.png

It serves the models in process (RetrievalService.open, start_server with an HTTP address on a
free localhost port), opens `/?QUERY` (a shareable link: the page runs it), waits for the answer
and saves the whole page as PNG. Needs Debian's chromium and chromium-driver (`./dev.sh setup`
installs them when run as root) and selenium (the [test] extra); the browser is never downloaded.
Not a benchmark: nothing is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 120  # seconds: an upper bound on waiting for the page, never a measured duration


def browser_missing() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            return f"{path} not found: apt-get install {package} (./dev.sh setup does, as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


def open_browser(width: int = 1280, height: int = 900):
    """Headless Debian Chromium through its chromedriver (never Selenium Manager's downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-extensions", "--no-first-run", f"--window-size={width},{height}",
                     "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def runs(driver) -> int:
    """How many queries the page has finished (its body's data-runs)."""
    return int(driver.execute_script("return document.body.dataset.runs || '0'"))


def wait_for(driver, condition, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def wait_for_run(driver, before: int, timeout: float = WAIT) -> str:
    """Wait until the page has finished a query more than `before`; returns its state (done / error)."""
    wait_for(driver, lambda d: runs(d) > before, timeout)
    return driver.execute_script("return document.body.dataset.state")


def wait_ready(driver, timeout: float = WAIT) -> None:
    """Wait until the page has its schema and pickers (or has shown why not)."""
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.state") in ("ready", "done", "error"),
             timeout)


def open_link(driver, base_url: str, query: str) -> str:
    """Open a shareable link `base_url?query` and wait for the query it runs; returns the state."""
    driver.get(f"{base_url}?{query}")
    return wait_for_run(driver, 0)


def save_page(driver, path: Path, width: int = 1280) -> Path:
    """The whole page (not only the window) as PNG."""
    height, chrome = driver.execute_script("return [document.documentElement.scrollHeight, "
                                           "window.outerHeight - window.innerHeight]")
    driver.set_window_size(width, max(int(height), 400) + int(chrome))  # the window's own frame is not page
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"the browser could not save a screenshot to {path}")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.web_screenshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--index", type=Path, required=True, help="index folder (one with thumbnails shows them)")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="checkpoint to serve; repeat")
    p.add_argument("--query", default="category=Dress&seed=7", help="the page's query string (a shareable link)")
    p.add_argument("--out", type=Path, default=Path("docs/web-page.png"))
    p.add_argument("--width", type=int, default=1280, help="window width in px")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from atelier.cli import parse_models
    from atelier.retrieval.service import RetrievalService
    from atelier.server.app import start_server

    args = parse_args(argv)
    reason = browser_missing()
    if reason:
        print(f"web_screenshot: {reason}", file=sys.stderr)
        return 2
    service = RetrievalService.open(args.index, parse_models(args.model))
    running = start_server(service, "127.0.0.1:0", http_address="127.0.0.1:0")
    driver = open_browser(args.width)
    try:
        state = open_link(driver, running.http.url, args.query)
        if state != "done":
            print(f"web_screenshot: the page shows an error: {driver.find_element('id', 'error').text}",
                  file=sys.stderr)
            return 1
        print(f"web_screenshot: {save_page(driver, args.out, args.width)}")
    finally:
        driver.quit()
        running.stop(grace=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
