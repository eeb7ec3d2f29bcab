"""Headless Chromium driven over the DevTools protocol, through a pipe (``--remote-debugging-pipe``):
no WebSocket client and no browser download needed, only Debian's ``chromium``.

`mlflow ui` keeps polling, so "wait until the page is idle" never happens: a check waits until the
page's text holds what it looks for, then takes the screenshot.
"""
from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    def __init__(self, width: int = 1500, height: int = 1100):
        self._profile = tempfile.mkdtemp(prefix="harness-chromium-")
        to_chrome, self._out = os.pipe()  # Chromium reads commands on its fd 3
        self._in, from_chrome = os.pipe()  # and writes replies on its fd 4

        def pipes() -> None:
            # Out of the way first: either pipe may itself be fd 3 or 4.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        # The flags Chromium needs on a machine with no outside network (else it retries its own
        # services at every start), run as root.
        self.process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--window-size={width},{height}", f"--user-data-dir={self._profile}",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=pipes, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._ids = itertools.count(1)
        self._buffer = b""
        self._session = None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params or {}}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == message_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.time()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its pipe")
            self._buffer += chunk

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def text(self) -> str:
        result = self.send("Runtime.evaluate", {"expression": "document.body ? document.body.innerText : ''",
                                                "returnByValue": True})
        return result.get("result", {}).get("value", "")

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                              "awaitPromise": True}).get("result", {}).get("value")

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        """The page's text once it holds every needle; TimeoutError naming the missing ones."""
        deadline = time.time() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.time() > deadline:
                raise TimeoutError(f"the page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        self._session = None  # Browser.close is the browser's, not the page's
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._in, self._out):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sign_in(browser: Browser, user: str, password: str) -> Browser:
    """The login a person types into the browser's prompt, sent from now on with every request."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    browser.send("Network.enable")
    browser.send("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    return browser
