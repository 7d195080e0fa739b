"""What the browser tests share: Debian's Chromium driven by Playwright, the UI server in its own process as a user
starts it, and a UI whose one job has trained (the sample viewer's and the loss chart's tests look at it).

The ``browser`` and ``trained_ui`` fixtures (conftest.py) are built from this. Screenshots go to test-artifacts/ui/
(ignored); ``make screenshots`` copies the ones the docs show into docs/images/."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
from conftest import cli_env, demo_dataset, wait_for, wait_status_of

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
DEMO = resources.files("zimage_lora") / "demo" / "dataset"
TIMEOUT_MS = 20_000


def browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -r requirements-dev.txt)"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


def launch_browser():
    """Chromium for one test module (a generator: the fixture yields what it yields). Without Playwright or
    /usr/bin/chromium the tests skip, unless ZIMAGE_LORA_REQUIRE_BROWSER=1 (CI), where they fail."""
    problem = browser_missing()
    if problem:
        if os.environ.get("ZIMAGE_LORA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests are required here (ZIMAGE_LORA_REQUIRE_BROWSER=1), but {problem}")
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UiServer:
    """``zimage-lora ui`` in its own process on a free port; ``stop`` also stops the jobs and comparisons it left
    running (and lets held trainers go). ``devices`` replaces the machine's devices the UI offers
    (``ZIMAGE_LORA_UI_DEVICES``)."""

    def __init__(self, data: Path, token: str | None = None, fault: str | None = None, devices: str | None = None):
        self.data = data
        self.token = token
        self.holds = data.parent / f"{data.name}-holds"  # where trainers held by a ``wait`` fault say so (faults.py)
        self.holds.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / f"{data.name}-server.log"
        args = [sys.executable, "-m", "zimage_lora.cli", "ui", "--data", str(data), "--port", str(self.port)]
        if token:
            args += ["--host", "127.0.0.1", "--token", token]
        with open(self.log, "wb") as out:
            env = {**cli_env(fault), "ZIMAGE_LORA_FAULT_DIR": str(self.holds)}
            if devices:
                env["ZIMAGE_LORA_UI_DEVICES"] = devices
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> UiServer:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("/api/jobs")
                return self
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"the UI server did not start:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def api(self, path: str, method: str = "GET", body: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, data=data, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def wait_for_hold(self, name: str, timeout: float = 120) -> None:
        """Until a trainer of this server is held at the fault point ``name`` (``held-<name>``)."""
        wait_for(lambda: (self.holds / f"held-{name}").exists(), timeout, f"a trainer held at {name}")

    def release(self, name: str) -> None:
        (self.holds / f"release-{name}").touch()

    def wait_job(self, name: str, *statuses: str, timeout: float = 180) -> dict:
        """The job once its status is one of ``statuses`` (with its log in the failure when it never gets there)."""
        return wait_status_of(lambda: self.api(f"/api/jobs/{name}"), f"job {name}", statuses, timeout)

    def stop(self) -> None:
        for held in self.holds.glob("held-*"):  # a trainer still held goes on, so it can stop
            self.release(held.name.removeprefix("held-"))
        try:
            for job in self.api("/api/jobs")["jobs"]:
                if job["status"] in ("queued", "running"):
                    self.api(f"/api/jobs/{job['name']}/stop", "POST")
            for found in self.api("/api/comparisons")["comparisons"]:
                if found["status"] in ("queued", "running"):
                    self.api(f"/api/comparisons/{found['id']}/stop", "POST")
        except Exception:  # noqa: BLE001 - best effort: the server may be gone already
            pass
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def by(testid: str) -> str:
    return f'[data-testid="{testid}"]'


def new_page(browser, width: int = 1280, height: int = 900, **options):
    """A fresh browser context at this size and its page, with the tests' timeout; ``page.errors`` collects the
    JavaScript errors the page raises (a test asserts there are none)."""
    context = browser.new_context(viewport={"width": width, "height": height}, **options)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    return context, page


# --- a UI whose one job has trained ---------------------------------------------------------------------------------

TRAINED_JOB = "viewer"
TRAINED_PROMPTS = ["a photo of [trigger] sitting", {"prompt": "a red car in the snow", "lora_scale": 0.8}]


def start_trained_ui(root: Path, tiny_model_dir: Path, tiny_adapter: Path):
    """A generator: the UI on a data folder with the tiny model and three demo pictures, where the job TRAINED_JOB
    (8 steps, checkpoints every 2, two prompts previewed every 2 steps at 64 px, the second at LoRA weight 0.8) has
    run to the end; yields the server, stops it after."""
    from test_ui_api import job_config

    data = root / "data"
    shutil.copytree(tiny_model_dir, data / "models" / "tiny")
    demo_dataset(data / "datasets" / "fox", 3)
    ui = UiServer(data).wait_ready()
    try:
        override = {
            "train": {"steps": 8},
            "save": {"every": 2, "keep": 4},
            "sample": {"every": 2, "steps": 2, "guidance": 1.5, "seed": 42, "prompts": TRAINED_PROMPTS},
        }
        ui.api("/api/jobs", "POST", {"config": job_config(TRAINED_JOB, tiny_adapter, override)})
        ui.api(f"/api/jobs/{TRAINED_JOB}/start", "POST")
        ui.wait_job(TRAINED_JOB, "done")
        yield ui
    finally:
        ui.stop()
