"""Render a page in Debian's headless Chromium and report what a user would see, over the DevTools protocol.

Why the DevTools protocol (spoken over aiohttp's WebSocket client, already a dependency)
rather than ``chromium --screenshot``: the protocol reports console messages, uncaught
exceptions and failed loads as events (not log lines to parse), lets the test measure the
rendered charts (each ``svg.chart``'s box and its non-empty bars) and takes a full-page
screenshot in the same session. No extra package (playwright would bring its own browser).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

MEASURE = """(() => {
  const charts = [...document.querySelectorAll('svg.chart')].map(svg => {
    const box = svg.getBoundingClientRect();
    const bars = [...svg.querySelectorAll('rect.bar')].filter(r => {
      const b = r.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length;
    return {label: svg.getAttribute('aria-label'), width: box.width, height: box.height, bars};
  });
  return JSON.stringify({charts, title: document.title, text: document.body.innerText.length,
                         audio: document.querySelectorAll('audio').length});
})()"""


@dataclass
class Rendered:
    charts: list[dict[str, Any]]
    title: str
    text_length: int
    audio: int
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads


async def render(page: Path, screenshot: Path, *, width: int = 1200, height: int = 900,
                 timeout_s: float = 60.0) -> Rendered:
    """Load ``page`` (a local file), collect every error, measure its charts, save a full-page PNG."""
    profile = tempfile.mkdtemp(prefix="ct-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        browser_ws = await asyncio.wait_for(asyncio.to_thread(_devtools_url, proc), timeout_s)
        port = re.search(r":(\d+)/", browser_ws).group(1)  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(page_ws, max_msg_size=0) as ws:
                return await asyncio.wait_for(_session(ws, page, screenshot), timeout_s)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"DevTools listening on (ws://\S+)", line)
        if m:
            return m.group(1)
    raise RuntimeError(f"chromium exited ({proc.wait()}) without a DevTools endpoint")


async def _session(ws: aiohttp.ClientWebSocketResponse, page: Path, screenshot: Path) -> Rendered:
    ids = itertools.count(1)
    pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
    errors: list[str] = []
    loaded = asyncio.Event()

    async def reader() -> None:
        async for msg in ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in pending:
                pending.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.loadEventFired":
                loaded.set()
            elif method == "Runtime.exceptionThrown":
                errors.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")

    async def call(method: str, **params: Any) -> dict[str, Any]:
        i = next(ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending[i] = fut
        await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        reply = await fut
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    task = asyncio.create_task(reader())
    try:
        for domain in ("Page", "Runtime", "Log"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=page.resolve().as_uri())
        await loaded.wait()
        await asyncio.sleep(0.5)  # late console messages
        measured = json.loads((await call("Runtime.evaluate", expression=MEASURE, returnByValue=True))["result"]["value"])
        shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return Rendered(charts=measured["charts"], title=measured["title"], text_length=measured["text"],
                    audio=measured["audio"], errors=errors)
