"""Screenshots of an apex-ray run in the MLflow UI, for docs/mlflow.md.

    python docs/mlflow_screenshots.py --train                 # a short run logged to a fresh server, then the shots
    python docs/mlflow_screenshots.py --backend-store-uri sqlite:///runs/apex/mlflow.db [--run-id ID]

Starts ``mlflow server`` on 127.0.0.1 over the store (with ``--train``: a new sqlite store in
``--work-dir``, and a short training through ``python -m apex_ray.train`` that logs to that server,
registering its EMA), then drives headless Chromium over the DevTools protocol: each page is opened
by its hash route, the script waits until the page shows the text that proves it has rendered
(the MLflow UI is a single-page app: a plain ``chromium --screenshot`` catches its loading spinner,
and ``--virtual-time-budget`` never ends on its polling), and captures it. PNGs are written to
``--out`` (``docs/images/mlflow_*.png``), quantised to 256 colours to stay small.

Needs Chromium (``apt-get install chromium``; ``--chromium`` or ``$CHROMIUM`` to pick another) and
aiohttp (a dependency of ``ray[default]``) for the DevTools websocket; no browser packages from pip.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "apex-ray"
REGISTERED = "apex-shapes-ema"
TRAINING = ["train.steps=6", "train.global_batch=4", "data.num_samples=48", "train.log_every=1", "train.eval_every=3",
            "train.checkpoint_every=6", "eval.grid_nfe=[1,2]", "eval.score_nfe=[1]", "eval.grid_size=8",
            "tracking.run_name=mlflow-docs", f"tracking.register_model={REGISTERED}",
            "tracking.tags={purpose: docs}"]
"""The run behind the screenshots: the embedded default (tiny SANA from the shipped teacher,
ShapeEval, 2 CPU workers), 6 steps with evaluations at steps 3 and 6 (the image panel's slider has
steps 0, 3 and 6 where the step-0 evaluation is on)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.time() > deadline or (process is not None and process.poll() is not None):
                raise RuntimeError(f"{url} did not answer in {seconds:.0f} s") from None
            time.sleep(0.5)


@contextlib.contextmanager
def started(command: list[str], url: str, seconds: float = 120, **popen) -> Iterator[subprocess.Popen]:
    """``command`` in its own process group, once ``url`` answers; the whole group is stopped after."""
    process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        wait_for(url, seconds, process)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # mlflow server's job runners can linger after SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def mlflow_server(backend_store_uri: str, artifacts: Path, log: Path):
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts)]
    return f"http://127.0.0.1:{port}", started(command, f"http://127.0.0.1:{port}/health",
                                               stdout=log.open("w"), stderr=subprocess.STDOUT)


def rest(base: str, endpoint: str, body: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def train(uri: str, work: Path) -> None:
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}  # a 1-minute run: a sample every 2 s
    command = [sys.executable, "-m", "apex_ray.train", f"output_dir={work / 'run'}", f"tracking.tracking_uri={uri}",
               *TRAINING]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, env=env, check=True)


# --- DevTools ---------------------------------------------------------------------------------


class Page:
    """One Chromium tab over the DevTools protocol (``Page``, ``Runtime``, ``Input``, ``Emulation``)."""

    def __init__(self, socket_) -> None:
        self.socket = socket_
        self.next_id = 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.socket.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.socket.receive_json()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    async def size(self, width: int, height: int) -> None:
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)

    async def open(self, url: str, *expect: str, timeout: float = 120, settle: float = 3.0) -> None:
        """Navigate to ``url`` and wait until the page's text holds every string of ``expect``,
        then ``settle`` seconds more (charts draw after their data arrives). Each page is a fresh
        load of the app: a hash route followed inside the app keeps the previous page's state."""
        await self.call("Page.navigate", url="about:blank")
        await self.call("Page.navigate", url=url)
        await self.wait_for_text(*expect, timeout=timeout)
        await asyncio.sleep(settle)

    async def wait_until(self, expression: str, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not await self.evaluate(expression):
            if time.time() > deadline:
                text = await self.evaluate("document.body ? document.body.innerText.slice(0, 400) : ''")
                raise RuntimeError(f"the page did not show {what} in {timeout:.0f} s; it shows: {text!r}")
            await asyncio.sleep(0.5)

    async def wait_for_text(self, *expect: str, timeout: float = 120) -> None:
        await self.wait_until(f"(() => {{ const t = document.body ? document.body.innerText : '';"
                              f" return {json.dumps(list(expect))}.every(w => t.includes(w)); }})()",
                              " and ".join(map(repr, expect)), timeout)

    async def click(self, selector: str, containing: str = "") -> None:
        """Click the last (innermost) element matching ``selector`` whose text holds ``containing``."""
        found = await self.evaluate(
            f"(() => {{ const hits = [...document.querySelectorAll({json.dumps(selector)})]"
            f"  .filter(e => (e.innerText || '').includes({json.dumps(containing)}));"
            " if (!hits.length) return false; hits[hits.length - 1].click(); return true; })()")
        if not found:
            raise RuntimeError(f"nothing to click: {selector} holding {containing!r}")

    async def type_into(self, selector: str, text: str, index: int = 0, enter: bool = False) -> None:
        """Replace the value of the ``index``-th ``selector`` input by typing ``text`` (React sees real input events)."""
        await self.evaluate(f"(() => {{ const e = document.querySelectorAll({json.dumps(selector)})[{index}];"
                            " e.focus(); e.select(); })()")
        await self.call("Input.insertText", text=text)
        if enter:
            for kind in ("keyDown", "keyUp"):
                await self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    async def screenshot(self, file: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        save_small_png(base64.b64decode(shot["data"]), file)
        print(f"wrote {file} ({file.stat().st_size // 1024} KB)", flush=True)


UI_SETTINGS = """try {
  localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('machine_learning'));
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  Object.keys(localStorage).filter(k => k.startsWith('MLflowLocalStorage')).forEach(k => localStorage.removeItem(k));
} catch (e) {}"""
"""Run before each page's own scripts: the sidebar's "Model training" mode (the UI opens in
"GenAI" mode), and the MLflow Assistant side panel closed (it opens on a first visit and would take
a third of every shot). The same choices a user makes with two clicks; they persist in the browser.
The pages' own saved view state (a chart search, ...) is dropped, so that each shot starts from the
default view."""

IMAGES_LOADED = "document.images.length > 0 && [...document.images].every(i => i.complete && i.naturalWidth > 0)"


def save_small_png(data: bytes, file: Path) -> None:
    """The screenshot in 256 colours (UI pages have few; a 1600 x 1000 page stays well under 300 KB)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(file, optimize=True)


@contextlib.contextmanager
def chromium(binary: str, width: int, height: int) -> Iterator[str]:
    """Headless Chromium with a DevTools port; yields its HTTP endpoint."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="apex-ray-chromium-")
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--remote-debugging-port={port}", "--remote-allow-origins=*", "about:blank"]
    try:
        with started(command, f"http://127.0.0.1:{port}/json/version", 60,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            yield f"http://127.0.0.1:{port}"
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def take_screenshots(devtools: str, ui: str, ids: dict, out: Path, width: int, height: int) -> list[Path]:
    import aiohttp

    with urllib.request.urlopen(f"{devtools}/json/list", timeout=10) as response:
        target = next(t for t in json.loads(response.read()) if t["type"] == "page")
    written = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Page.addScriptToEvaluateOnNewDocument", source=UI_SETTINGS)
            experiment = f"{ui}/#/experiments/{ids['experiment_id']}"
            run = f"{experiment}/runs/{ids['run_id']}"

            async def shot(name: str) -> None:
                file = out / f"mlflow_{name}.png"
                await page.screenshot(file)
                written.append(file)

            # The run page: description, datasets, tags, registered model, logged models, metrics.
            await page.size(width, int(height * 2))  # the page down to its logged models
            await page.open(run, ids["run_name"], "Description", "Datasets", ids["dataset"])
            await shot("run_overview")
            await page.size(width, height)
            # The prepared set's drawer: digest, source, profile.
            await page.click("span, a, div, button", ids["dataset"] + " (")
            await page.wait_for_text("Source")
            await asyncio.sleep(2)
            await shot("dataset")
            # Model metrics: the loss parts, filtered with the tab's search box.
            search = "input[placeholder='Search metric charts']"
            await page.open(f"{run}/model-metrics", "Auto-refresh")
            await page.type_into(search, "loss")
            await page.wait_for_text("loss_adv")
            await scroll_to_text(page, "Model metrics")  # past the image cards, which the search keeps
            await asyncio.sleep(3)
            await shot("model_metrics")
            # The sample grids at the last evaluation (each card's step box), scrolled past the run's
            # parameters the image cards list above the picture.
            await page.open(f"{run}/model-metrics", "Auto-refresh")
            await page.type_into(search, "samples/")  # the charts below the fold are not drawn until scrolled to
            await page.wait_until(IMAGES_LOADED, "the sample images")
            cards = await page.evaluate("document.querySelectorAll('input[type=number]').length")
            for index in range(cards):
                await page.type_into("input[type=number]", str(ids["last_step"]), index, enter=True)
                await asyncio.sleep(2)
            await page.evaluate("document.activeElement && document.activeElement.blur()")
            await page.wait_until(IMAGES_LOADED + f" && [...document.images].every(i => i.src.includes('step%2B{ids['last_step']}%2B'))",
                                  f"the step-{ids['last_step']} images")
            await page.evaluate("[...document.images].forEach(i => i.scrollIntoView({block: 'center'}));"
                                " document.images[0].scrollIntoView({block: 'center'})")
            await asyncio.sleep(2)
            await shot("images")
            await page.open(f"{run}/system-metrics", "cpu_utilization_percentage")
            await scroll_to_text(page, "System metrics")  # the tab lists the image cards first too
            await asyncio.sleep(2)
            await shot("system_metrics")
            await page.open(f"{experiment}/models", "ema", "student")
            await shot("logged_models")
            await page.open(f"{experiment}/models/{ids['ema']}", "ema", ids["run_name"])
            await shot("logged_model")
            await page.open(f"{experiment}/models/{ids['ema']}/artifacts", "README.md")
            await page.click("span, div, a", "README.md")
            await page.wait_for_text("mlflow.pyfunc.load_model")
            await asyncio.sleep(2)
            await shot("model_card")
            await page.open(f"{run}/artifacts", "config.yaml")
            await page.click("span, div, a", "config.yaml")
            await page.wait_for_text("objective:", "tracking:")
            await asyncio.sleep(2)
            await shot("artifacts")
            if ids.get("registered"):
                await page.open(f"{ui}/#/models/{urllib.parse.quote(ids['registered'])}", ids["registered"], "Version 1")
                await shot("registered_model")
    return written


async def scroll_to_text(page: Page, text: str) -> None:
    """Scroll the innermost element whose text starts with ``text`` to the top of its scroll area."""
    await page.evaluate(f"(() => {{ const hit = [...document.querySelectorAll('*')].reverse()"
                        f"  .find(e => (e.innerText || '').trim().startsWith({json.dumps(text)}));"
                        " if (hit) hit.scrollIntoView({block: 'start'}); })()")


def run_ids(ui: str, run_id: str | None, experiment: str) -> dict:
    """What the pages are found by: the run (default: the experiment's latest finished run), its
    EMA logged model, its dataset input, the registered model of its EMA (if any)."""
    found = rest(ui, f"experiments/get-by-name?experiment_name={urllib.parse.quote(experiment)}")["experiment"]
    if run_id is None:
        runs = rest(ui, "runs/search", {"experiment_ids": [found["experiment_id"]], "max_results": 1,
                                        "filter": "attributes.status = 'FINISHED'",
                                        "order_by": ["attributes.start_time DESC"]}).get("runs", [])
        if not runs:
            raise SystemExit(f"no finished run in experiment {experiment!r}: pass --run-id or --train")
        run_id = runs[0]["info"]["run_id"]
    run = rest(ui, f"runs/get?run_id={run_id}")["run"]
    models = rest(ui, "logged-models/search", {"experiment_ids": [found["experiment_id"]],
                                               "filter": f"source_run_id = '{run_id}'"}).get("models", [])
    by_name = {m["info"]["name"]: m["info"]["model_id"] for m in models}
    inputs = run.get("inputs", {}).get("dataset_inputs", [])
    if "ema" not in by_name or not inputs:
        raise SystemExit(f"run {run_id} has no EMA logged model or no dataset input: these screenshots need a run "
                         "of apex-ray with MLflow logged models (--train makes one)")
    history = rest(ui, "metrics/get-history?" + urllib.parse.urlencode({"run_id": run_id, "metric_key": "loss"}))
    last_step = max(m["step"] for m in history["metrics"])
    versions = rest(ui, "model-versions/search?" + urllib.parse.urlencode({"filter": f"run_id = '{run_id}'"}))
    versions = versions.get("model_versions", [])
    return {"experiment_id": found["experiment_id"], "run_id": run_id, "run_name": run["info"]["run_name"],
            "ema": by_name["ema"], "dataset": inputs[0]["dataset"]["name"],
            "registered": versions[0]["name"] if versions else None, "last_step": last_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--train", action="store_true", help="make a short run on a fresh server first")
    which.add_argument("--backend-store-uri", help="an existing store, e.g. sqlite:///runs/apex/mlflow.db")
    parser.add_argument("--run-id", help="default: the experiment's latest finished run")
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--work-dir", type=Path, help="where the server's log (and with --train its store and the run) "
                        "go; default: a new temp dir")
    parser.add_argument("--artifacts-destination", type=Path, help="the server's proxied artifact root (default: "
                        "<work-dir>/server-artifacts); a store written through an earlier `mlflow server` needs its own")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium") or "chromium")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="apex-ray-mlflow-docs-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work / 'server.db'}" if args.train else args.backend_store_uri
    if args.train and (work / "run").exists():
        raise SystemExit(f"{work / 'run'} exists: --train needs a fresh --work-dir (the run name would resume)")
    ui, server = mlflow_server(store, args.artifacts_destination or work / "server-artifacts", work / "server.log")
    with server:
        print(f"MLflow UI at {ui} over {store}", flush=True)
        if args.train:
            train(ui, work)
        ids = run_ids(ui, args.run_id, args.experiment)
        with chromium(args.chromium, args.width, args.height) as devtools:
            asyncio.run(take_screenshots(devtools, ui, ids, args.out, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
