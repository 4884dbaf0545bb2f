"""Debian's Firefox ESR driven over WebDriver BiDi, the W3C protocol Firefox speaks itself: no geckodriver, no
Selenium Manager, nothing downloaded. A small client for the review tests and the screenshot script.

``firefox()`` starts ``firefox-esr --headless`` with a fresh temporary profile and ``--remote-debugging-port=0``
(Firefox picks a free port and writes it to the profile's ``WebDriverBiDiServer.json``), opens a BiDi session on
``ws://127.0.0.1:PORT/session``, and always ends the session and kills Firefox and its content processes (its own
process group) at the end. Commands carry ids; ``Firefox.command`` waits for the answer with its id, keeps the
events that arrive meanwhile (``log.entryAdded``: console messages and uncaught JavaScript errors), and raises
``BiDiError`` when Firefox answers with an error. Protocol: https://w3c.github.io/webdriver-bidi/
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import websocket

FIREFOX = "/usr/bin/firefox-esr"
START_TIMEOUT_S = 120  # a cold Firefox on a busy 2-core machine takes 5-30 s to listen
COMMAND_TIMEOUT_S = 120
POLL_S = 0.1

# WebDriver's codes for keys that are not characters (the "normalised key value" table of the WebDriver spec)
KEYS = {"Enter": "\ue007", "Escape": "\ue00c", "Control": "\ue009", "Shift": "\ue008", "Alt": "\ue00a",
        "Backspace": "\ue003", "Tab": "\ue004", "ArrowUp": "\ue013", "ArrowDown": "\ue015"}

# The profile's user.js: BiDi only, no first-run or default-browser pages, no update/telemetry/remote-settings
# traffic (the machine has no network; without these Firefox logs failed syncs). Firefox applies its own
# "recommended preferences" for automation on top when the remote agent is on.
PREFS: Mapping[str, str | int | bool] = {
    "remote.active-protocols": 1,  # 1 = WebDriver BiDi only
    "browser.startup.page": 0,
    "browser.startup.homepage": "about:blank",
    "browser.startup.homepage_override.mstone": "ignore",
    "startup.homepage_welcome_url": "about:blank",
    "browser.aboutwelcome.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "services.settings.server": "data:,#remote-settings-off",
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
}


class BiDiError(RuntimeError):
    """Firefox answered a command with an error (``error`` is the BiDi error code, e.g. ``no such frame``)."""

    def __init__(self, method: str, error: str, message: str) -> None:
        super().__init__(f"{method}: {error}: {message}")
        self.method = method
        self.error = error


def _user_js(prefs: Mapping[str, str | int | bool]) -> str:
    return "".join(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n" for name, value in prefs.items())


def _value(remote: Mapping) -> object:
    """A BiDi remote value (script.evaluate's result) as Python: primitives, arrays and plain objects."""
    kind = remote["type"]
    if kind in ("undefined", "null"):
        return None
    if kind in ("string", "boolean"):
        return remote["value"]
    if kind == "number":
        value = remote["value"]
        return float(value) if isinstance(value, str) else value  # "NaN", "Infinity", "-0"
    if kind == "array":
        return [_value(item) for item in remote["value"]]
    if kind == "object":
        return {key: _value(item) for key, item in remote["value"]}
    return remote  # nodes, windows, functions: the raw reference


class Firefox:
    """One BiDi session on one top-level browsing context (tab)."""

    def __init__(self, connection: websocket.WebSocket) -> None:
        self._socket = connection
        self._next_id = 0
        self.context = ""  # the tab, set once the session is open
        self.events: list[dict] = []

    def command(self, method: str, params: Mapping | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> dict:
        """Sends one command and returns its result; events that arrive before the answer go to ``events``."""
        self._next_id += 1
        command_id = self._next_id
        self._socket.send(json.dumps({"id": command_id, "method": method, "params": dict(params or {})}))
        deadline = time.monotonic() + timeout_s
        while True:
            self._socket.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                message = json.loads(self._socket.recv())
            except websocket.WebSocketTimeoutException:
                raise TimeoutError(f"{method}: Firefox did not answer within {timeout_s:.0f} s") from None
            if message.get("type") == "event":
                self.events.append(message)
            elif message.get("id") == command_id:
                if message.get("type") == "error":
                    raise BiDiError(method, message.get("error", "?"), message.get("message", ""))
                return message["result"]

    # ------------------------------------------------------------------ pages and scripts
    def navigate(self, url: str) -> None:
        self.command("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page (promises are awaited); a thrown error raises."""
        result = self.command("script.evaluate", {"expression": expression, "target": {"context": self.context},
                                                  "awaitPromise": True, "resultOwnership": "none"})
        if result["type"] == "exception":
            details = result["exceptionDetails"]
            raise BiDiError("script.evaluate", "javascript error", f"{details.get('text')} in {expression!r}")
        return _value(result["result"])

    def wait_for(self, expression: str, message: str, timeout_s: float = 90) -> object:
        """Polls until the expression is truthy and returns its value; ``message`` says what never happened."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout_s:.0f} s: {message}")
            time.sleep(POLL_S)

    def text(self, css: str) -> str:
        return str(self.evaluate(f"document.querySelector({json.dumps(css)})?.textContent ?? ''"))

    # ------------------------------------------------------------------ real input (input.performActions)
    def click(self, css: str) -> None:
        """A real mouse click (move, press, release) at the middle of the element, as a user would click."""
        box = self.evaluate(f"""(() => {{
            const element = document.querySelector({json.dumps(css)});
            if (!element) return null;
            element.scrollIntoView({{block: "center"}});
            const r = element.getBoundingClientRect();
            const x = Math.round(r.left + r.width / 2), y = Math.round(r.top + r.height / 2);
            return {{x, y, width: r.width, height: r.height, hit: element.contains(document.elementFromPoint(x, y))}};
        }})()""")
        if not isinstance(box, dict) or not box["width"] or not box["height"]:
            raise BiDiError("click", "no such element", f"{css!r} is missing or not displayed: {box}")
        if not box["hit"]:
            raise BiDiError("click", "element click intercepted", f"another element covers the middle of {css!r}")
        self.command("input.performActions", {"context": self.context, "actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [{"type": "pointerMove", "x": box["x"], "y": box["y"], "origin": "viewport"},
                        {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]}]})

    def keys(self, *strokes: str | Sequence[str]) -> None:
        """Real key presses. Each stroke is a key (``"n"``, ``"Enter"``), a text typed key by key (``"ana"``), or
        a chord held together (``("Control", "a")``)."""
        actions: list[dict] = []
        for stroke in strokes:
            if isinstance(stroke, str):
                for key in [KEYS[stroke]] if stroke in KEYS else list(stroke):
                    actions += [{"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]
            else:
                chord = [KEYS.get(key, key) for key in stroke]
                actions += [{"type": "keyDown", "value": key} for key in chord]
                actions += [{"type": "keyUp", "value": key} for key in reversed(chord)]
        self.command("input.performActions", {"context": self.context, "actions": [
            {"type": "key", "id": "keyboard", "actions": actions}]})

    # ------------------------------------------------------------------ what the page said and showed
    def errors(self) -> list[dict]:
        """Error-level log entries so far (console.error and uncaught JavaScript errors), as BiDi reported them."""
        self.command("script.evaluate", {"expression": "0", "target": {"context": self.context},
                                         "awaitPromise": False})  # a round trip: events sent before it are in
        return [event["params"] for event in self.events
                if event.get("method") == "log.entryAdded" and event["params"].get("level") == "error"]

    def screenshot(self, path: str | Path) -> None:
        data = self.command("browsingContext.captureScreenshot", {"context": self.context})["data"]
        Path(path).write_bytes(base64.b64decode(data))


def _bidi_port(profile: Path, process: subprocess.Popen, log: Path) -> int:
    """Waits until Firefox writes the port it listens on into the profile."""
    deadline = time.monotonic() + START_TIMEOUT_S
    server_file = profile / "WebDriverBiDiServer.json"
    while True:
        if server_file.exists():
            try:
                return int(json.loads(server_file.read_text())["ws_port"])
            except (ValueError, KeyError):
                pass  # being written
        if process.poll() is not None:
            raise RuntimeError(f"firefox-esr exited with status {process.returncode} before listening:\n"
                               f"{log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"firefox-esr did not open its WebDriver BiDi port within {START_TIMEOUT_S} s:\n"
                               f"{log.read_text(errors='replace')[-2000:]}")
        time.sleep(POLL_S)


def _connect(port: int) -> websocket.WebSocket:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            # Firefox refuses a handshake with an Origin header (a web page must not drive the browser)
            return websocket.create_connection(f"ws://127.0.0.1:{port}/session", timeout=COMMAND_TIMEOUT_S,
                                               suppress_origin=True)
        except (OSError, websocket.WebSocketException):
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S * 5)


def _stop(process: subprocess.Popen) -> None:
    """Ends Firefox and every process it started (they share the process group it leads)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left: a hung leader, content processes
    except ProcessLookupError:
        pass
    process.wait(timeout=15)


@contextmanager
def firefox(width: int = 1366, height: int = 768, binary: str = FIREFOX) -> Iterator[Firefox]:
    """Headless Firefox with a fresh profile and a BiDi session whose tab has a ``width`` × ``height`` viewport."""
    profile = Path(tempfile.mkdtemp(prefix="taxonet-firefox-"))
    log = profile.parent / f"{profile.name}.log"
    (profile / "user.js").write_text(_user_js(PREFS))
    with log.open("wb") as output:
        process = subprocess.Popen([binary, "--headless", "--no-remote", "--remote-debugging-port=0",
                                    "--profile", str(profile), "about:blank"],
                                   stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1"})
    connection: websocket.WebSocket | None = None
    try:
        connection = _connect(_bidi_port(profile, process, log))
        browser = Firefox(connection)
        browser.command("session.new", {"capabilities": {"alwaysMatch": {"acceptInsecureCerts": False}}})
        browser.command("session.subscribe", {"events": ["log.entryAdded"]})
        browser.context = browser.command("browsingContext.getTree", {"maxDepth": 0})["contexts"][0]["context"]
        browser.command("browsingContext.setViewport", {"context": browser.context,
                                                        "viewport": {"width": width, "height": height}})
        yield browser
    finally:
        if connection is not None:
            try:
                connection.settimeout(10)
                connection.send(json.dumps({"id": 0, "method": "session.end", "params": {}}))
                connection.close()
            except (OSError, websocket.WebSocketException):
                pass  # Firefox is killed next anyway
        _stop(process)
        shutil.rmtree(profile, ignore_errors=True)
        log.unlink(missing_ok=True)
