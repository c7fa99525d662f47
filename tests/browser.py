"""Headless Chromium under selenium for the browser tests (tests/test_browser.py).

Finds Debian's chromium + chromedriver (or says how to install them), starts the browser so that it never tries the
network (the test machines have none; without these flags Chromium hangs on connection attempts), and wraps the page:
the helpers in tests/browser_page.js, screenshots, and the browser console with the ComfyUI frontend's own known
errors told apart from anything else.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "apt-get install chromium chromium-driver"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_PATHS = ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")  # Debian's chromium-driver puts it here
# --headless: no display. --no-sandbox: tests run as root in containers. The rest keeps a closed network from
# stalling the browser: no QUIC, no first-run/sync/component-update/background requests to Google.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars")

# Console errors the ComfyUI frontend produces by itself on a fresh install, with or without this extension; each with
# why it is not ours. Anything else at SEVERE level fails the tests.
COMFY_OWN_ERRORS: tuple[tuple[str, str], ...] = (
    (r"/favicon\.ico - Failed to load resource: .*\b404\b",
     "ComfyUI serves no /favicon.ico"),
    (r"/(api/userdata/)?user\.css - Failed to load resource: .*\b404\b",
     "the frontend probes for an optional user stylesheet; a fresh user folder has none"),
    (r"/api/userdata\?dir=(workflows|subgraphs)\S* - Failed to load resource: .*\b404\b",
     "the frontend lists the user's saved workflows and subgraphs; a fresh user folder has neither folder yet"),
    (r"/api/userdata/comfy\.templates\.json - Failed to load resource: .*\b404\b",
     "the user's saved node templates file, absent for a new user"),
    (r"https://(api\.comfy\.org|huggingface\.co)/\S* - Failed to load resource: net::ERR_",
     "the frontend's release notes, registry, node help and model-size lookups; the test machine has no network"),
    (r"Error fetching file size:.*Failed to fetch",
     "the missing-models dialog asks huggingface.co for download sizes; the test machine has no network"),
    (r"TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange ",
     "frontend 1.32.9: its Nodes 2.0 lifecycle sets LiteGraph.Canvas.MinFontSizeForLOD before the settings store has "
     "that setting's definition, and the store's onChange reads the missing definition's id (on every fresh page)"),
    (r"Attempted to cleanup event listeners for graph that was never set up",
     "frontend 1.32.9: hiding the minimap (setting Comfy.Minimap.Visible to false, as the picture test does) unmounts it "
     "and it logs this about its own listeners; reproduced on a page without any workflow loaded"),
)


def find_chromium() -> tuple[str, str] | str:
    """(browser, chromedriver) paths, or why they cannot be used. CNS_CHROMIUM / CNS_CHROMEDRIVER override the search."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the Python package selenium is not installed (it is in the test requirements: run `make test`)"
    browser = os.environ.get("CNS_CHROMIUM") or next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = os.environ.get("CNS_CHROMEDRIVER") or shutil.which("chromedriver") or next((p for p in DRIVER_PATHS if os.access(p, os.X_OK)), None)
    missing = [name for name, path in (("Chromium", browser), ("chromedriver", driver)) if not path]
    if missing:
        return f"{' and '.join(missing)} not found"
    return browser, driver


def require_chromium() -> tuple[str, str]:
    """The paths, or a skip that says how to install them; with CNS_REQUIRE_BROWSER=1 (CI) a failure instead."""
    found = find_chromium()
    if isinstance(found, tuple):
        return found
    message = f"browser tests need headless Chromium: {found}. Install them with `{INSTALL}` (Debian/Ubuntu, as root)"
    if os.environ.get("CNS_REQUIRE_BROWSER") == "1":
        pytest.fail(message + "; CNS_REQUIRE_BROWSER=1 is set, so they may not be skipped", pytrace=False)
    pytest.skip(message)


def artifacts_dir() -> Path:
    """Where the browser tests leave screenshots and logs: $CNS_ARTIFACTS/browser, else test-artifacts/browser."""
    path = Path(os.environ.get("CNS_ARTIFACTS") or ROOT / "test-artifacts") / "browser"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ConsoleEntry:
    level: str
    message: str

    def comfy_own_reason(self) -> str | None:
        return next((why for pattern, why in COMFY_OWN_ERRORS if re.search(pattern, self.message, re.S)), None)


class Page:
    """One headless Chromium window on a ComfyUI page. Use as a context manager."""

    def __init__(self, base_url: str, browser: str, driver: str, width: int = 1280, height: int = 800, pixel_ratio: float = 1):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base_url, self.width, self.height = base_url, width, height
        self.profile = tempfile.mkdtemp(prefix="cns-chromium-")  # a fresh profile: no state from earlier runs
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for flag in FLAGS + (f"--user-data-dir={self.profile}", f"--window-size={width},{height}"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # an explicit driver path: selenium never runs its Selenium Manager (which would try to download one)
        self.driver = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
        # the page's own size (the viewport), exactly; --window-size counts the (invisible) browser frame too. Set
        # before the page loads: the frontend sizes its canvases for the ratio it starts with (changing it later leaves
        # the link layer drawn for the old ratio)
        self.set_pixel_ratio(pixel_ratio)
        self.driver.set_script_timeout(300)
        self.console: list[ConsoleEntry] = []
        self._checked = 0

    def set_pixel_ratio(self, ratio: float) -> None:
        """The page's size in CSS pixels stays width x height; `ratio` device pixels per CSS pixel (2: a HiDPI screen)."""
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": self.width, "height": self.height, "deviceScaleFactor": ratio, "mobile": False})

    def open(self, timeout: float = 120) -> "Page":
        """Load the page and wait until the frontend has registered the server's nodes."""
        self.driver.get(self.base_url)
        helpers = (Path(__file__).parent / "browser_page.js").read_text()
        deadline = time.time() + timeout
        while True:
            if self.driver.execute_script("return !!(window.app && window.LiteGraph)"):
                if not self.driver.execute_script("return !!window.__cns"):
                    self.driver.execute_script(helpers)
                if self.js("return __cns.ready()"):
                    return self
            if time.time() > deadline:
                raise AssertionError(f"the ComfyUI page did not become ready within {timeout:.0f} s; console:\n" + self.console_text())
            time.sleep(0.25)

    def dismiss_dialogs(self) -> list[str]:
        """Close the frontend's open dialogs as a user would, with Escape (the dialog store's closeDialog for any that
        ignores it); returns the keys of those that were open."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        keys = self.js("return __cns.dialogs()")
        for _ in keys:
            ActionChains(self.driver).send_keys(Keys.ESCAPE).perform()
            time.sleep(0.2)
        if self.js("return __cns.dialogs()"):
            self.js("return __cns.closeDialogs()")
        return keys

    # -- scripts --

    def js(self, script: str, *args) -> Any:
        return self.driver.execute_script(script, *args)

    def js_async(self, body: str, *args) -> Any:
        """Run `body` as an async function (arguments as `args[i]`); its thrown error becomes an AssertionError here."""
        wrapper = ("const done = arguments[arguments.length - 1]; const args = Array.from(arguments).slice(0, -1);"
                   f"(async () => {{ {body} }})().then(value => done({{value}}), e => done({{error: String(e && e.stack || e)}}));")
        out = self.driver.execute_async_script(wrapper, *args)
        if "error" in out:
            raise AssertionError(f"in the page: {out['error']}")
        return out.get("value")

    def wait(self, script: str, timeout: float = 30, what: str = "condition") -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({script})")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.driver.get_screenshot_as_png())
        return path

    # -- console --

    def read_console(self) -> list[ConsoleEntry]:
        """Everything the console received so far (the driver hands each entry out once; kept here)."""
        self.console += [ConsoleEntry(e["level"], e["message"]) for e in self.driver.get_log("browser")]
        return self.console

    def new_errors(self) -> list[ConsoleEntry]:
        """SEVERE entries since the last call that are not among the frontend's own known errors (COMFY_OWN_ERRORS)."""
        entries = self.read_console()[self._checked:]
        self._checked = len(self.console)
        return [e for e in entries if e.level == "SEVERE" and not e.comfy_own_reason()]

    def console_text(self) -> str:
        try:
            self.read_console()
        except Exception:  # the browser may be gone
            pass
        return "\n".join(f"{e.level}: {e.message}" for e in self.console)

    # -- life cycle --

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
