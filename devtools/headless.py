"""Serve the app in a background thread and drive it with headless Chromium (browser tests, benchmark, screenshots).

Chromium and chromedriver are found on PATH, or through ``DASH_TEST_CHROMEPATH`` / ``CHROMEDRIVER``.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from werkzeug.serving import make_server

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,1900",
                "--disable-dev-shm-usage")


def browser_paths() -> tuple[str | None, str | None]:
    """(chromium binary, chromedriver) or None where missing."""
    chrome = os.environ.get("DASH_TEST_CHROMEPATH") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return (chrome if chrome and os.access(chrome, os.X_OK) else None,
            driver if driver and os.access(driver, os.X_OK) else None)


class ServerThread:
    """A threaded werkzeug server for a WSGI app on 127.0.0.1 and ``port`` (0: a free one)."""

    def __init__(self, wsgi_app: Any, quiet: bool = True, port: int = 0):
        if quiet:
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = make_server("127.0.0.1", port, wsgi_app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()  # free the port: a later server may take the same address
        self.thread.join(timeout=10)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium webdriver (selenium), closed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome, driver_path = browser_paths()
    if not chrome or not driver_path:
        raise RuntimeError("headless Chromium not found (install the Debian packages chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# JavaScript run in the page: the number of points of every trace of a dcc.Graph (by its id).
POINTS_JS = """
const out = {};
for (const id of arguments[0]) {
  const el = document.querySelector('#' + CSS.escape(id) + ' .js-plotly-plot');
  const data = el && (el._fullData || el.data);
  out[id] = data ? data.map(t => (t.x ? t.x.length : (t.values ? t.values.length : 0))) : null;
}
return out;
"""


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout:.0f} s (last value: {last!r})")


def trace_points(driver: Any, graph_ids: list[str]) -> dict[str, list[int] | None]:
    return driver.execute_script(POINTS_JS, graph_ids)
