"""`runyard ui` in a real browser: Debian's headless Chromium driven by Selenium
(scripts/services.d/chromium.sh installs both), against a `runyard ui` process serving an
instance whose runs are launched through the CLI and run by the default run launcher.

Each test checks what the page shows and that what it did reached storage. Screenshots go
to .ci/artifacts/ui/ (or $RUNYARD_ARTIFACTS/ui). Under CI=true a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runyard.events import EventType
from runyard.instance import Instance
from runyard.storage import RunFilter, RunStatus

RUNYARD = Path(sys.executable).parent / "runyard"
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("RUNYARD_ARTIFACTS") or REPO / ".ci" / "artifacts") / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# Steps wait for files beside the job file, so a test decides when they end (and the UI
# process, which re-executes runs, needs no environment of the test's).
JOBS = '''
import time
from pathlib import Path
from runyard import RetryPolicy, job, step

HERE = Path(__file__).parent

def wait_for(name, timeout=120):
    deadline = time.time() + timeout
    while not (HERE / name).exists() and time.time() < deadline:
        time.sleep(0.05)

@step
def chatter() -> int:
    print("hello from chatter", flush=True)
    wait_for("release")
    print("chatter is done", flush=True)
    return 1

@step
def tidy(x: int) -> int:
    return x + 1

@job
def slow():
    tidy(chatter())

@step
def talker() -> int:
    wait_for("go")
    print("hello from talker", flush=True)
    wait_for("release")
    print("talker is done", flush=True)
    return 1

@job
def talk():
    tidy(talker())

@step
def first() -> int:
    return 20

@step
def second(x: int) -> int:
    if not (HERE / "fixed").exists():
        raise RuntimeError("the fixed file is missing")
    return x + 1

@step(retry=RetryPolicy(max_retries=2))
def wobbly(context, x: int) -> int:
    if context.attempt < 2:
        raise RuntimeError(f"wobbly fails attempt {context.attempt}")
    return x

@job
def flaky():
    x = first()
    second(x)
    wobbly(x)
'''


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        message = f"{', '.join(missing)} not found: run `bash scripts/services.sh chromium`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def _no_script_errors(browser: Any) -> Iterator[None]:
    """A script error in any page a test opened fails the test (the page may look fine)."""
    browser.get_log("browser")  # drop what earlier tests left
    yield
    errors = [e["message"] for e in browser.get_log("browser") if e.get("level") == "SEVERE"
              and e.get("source") == "javascript"]
    assert errors == [], errors


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ui-home")
    (root / "jobs.py").write_text(JOBS)
    return root


@pytest.fixture(scope="module")
def ui_url(home: Path) -> Iterator[str]:
    env = {**os.environ, "RUNYARD_HOME": str(home / "instance")}
    env.pop("RUNYARD_UI_TOKEN", None)
    proc = subprocess.Popen([str(RUNYARD), "ui", "--port", "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "http://" in line, f"runyard ui printed {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        yield line.split(" at ", 1)[1].split()[0].rstrip("/")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def instance(home: Path, monkeypatch: pytest.MonkeyPatch) -> Instance:
    monkeypatch.setenv("RUNYARD_HOME", str(home / "instance"))
    return Instance.from_env()


def launch(home: Path, job: str, *, wait: bool = False) -> str:
    env = {**os.environ, "RUNYARD_HOME": str(home / "instance")}
    proc = subprocess.run([str(RUNYARD), "job", "launch", "-f", str(home / "jobs.py"), "-j", job,
                           *(["--wait"] if wait else [])],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    run_id = proc.stdout.strip().split()[0] if not wait else None
    if run_id is None:
        runs = Instance(home / "instance").storage.list_runs(limit=1)
        run_id = runs[0].run_id
    return run_id


def until(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def shot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def text_of(driver: Any, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return driver.find_element("css selector", css).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def run_row_status(driver: Any, run_id: str) -> str:
    return text_of(driver, f'tr[data-run-id="{run_id}"] .status')


@pytest.fixture(autouse=True)
def _clean_release(home: Path) -> Iterator[None]:
    for name in ("go", "release", "fixed"):
        (home / name).unlink(missing_ok=True)
    yield
    for name in ("go", "release"):  # let any run a failed test left waiting end
        (home / name).write_text("")


def test_runs_page_follows_a_running_job_to_its_end(browser: Any, ui_url: str, home: Path,
                                                    instance: Instance) -> None:
    run_id = launch(home, "slow")
    browser.get(ui_url + "/")
    browser.execute_script("window.__sameDocument = true")  # gone if the page reloads
    until(lambda: run_row_status(browser, run_id) == "STARTED", what="the run to show STARTED")
    shot(browser, "runs-running")
    (home / "release").write_text("")
    until(lambda: run_row_status(browser, run_id) == "SUCCESS", 60, "the run to show SUCCESS")
    assert browser.execute_script("return window.__sameDocument") is True, "the page reloaded"
    assert instance.storage.get_run(run_id).status is RunStatus.SUCCESS
    row = text_of(browser, f'tr[data-run-id="{run_id}"]')
    assert "slow" in row and "s" in text_of(browser, f'tr[data-run-id="{run_id}"] .duration')
    shot(browser, "runs-finished")
    # Filters are applied by storage: another job's filter hides the run.
    browser.get(ui_url + "/?job=flaky")
    assert browser.find_elements("css selector", f'tr[data-run-id="{run_id}"]') == []
    browser.get(ui_url + "/?status=SUCCESS&job=slow")
    # The table may be redrawn by the page's first refresh right after load; wait for it.
    until(lambda: run_row_status(browser, run_id) == "SUCCESS", what="the filtered page to list the run")


def test_run_page_shows_a_log_line_as_it_arrives(browser: Any, ui_url: str, home: Path, instance: Instance) -> None:
    """A real step, run by the default run launcher and executor, prints while the page is
    open and then waits on a file: its line reaches the page while it still runs."""
    run_id = launch(home, "talk")
    until(lambda: instance.storage.get_run(run_id).status is RunStatus.STARTED, what="the run to start")
    browser.get(f"{ui_url}/runs/{run_id}")
    # Rows for every step of the run once its graph is loaded, run or not.
    until(lambda: browser.execute_script("return document.body.dataset.steps") == "2", what="the timeline")
    # Choose the step by clicking its row of the timeline (the first row, below the time axis).
    from selenium.webdriver import ActionChains

    canvas = browser.find_element("id", "gantt")
    ActionChains(browser).move_to_element_with_offset(canvas, -canvas.size["width"] // 2 + 20,
                                                      -canvas.size["height"] // 2 + 20 + 9).click().perform()
    until(lambda: text_of(browser, "#step-name") == "talker", what="the step to be chosen")
    # The executor stores STEP_START as the step begins, not when it ends.
    until(lambda: text_of(browser, "#step-state") == "running", 10, "the step to show running")
    assert "hello from talker" not in text_of(browser, "#logs")
    (home / "go").write_text("")  # the step prints now, with the page open
    let_go = time.monotonic()
    until(lambda: "hello from talker" in text_of(browser, "#logs"), 10, "the step's print in the page")
    latency = time.monotonic() - let_go
    # Still running: the line came while the step waits, not with its end.
    assert text_of(browser, "#step-state") == "running"
    assert instance.storage.get_events(run_id, step_key="talker", types=[EventType.STEP_SUCCESS]) == []
    assert "talker is done" not in text_of(browser, "#logs")
    # File poll (0.05 s), the executor's read (0.2 s), the engine's batch (0.25 s) and the
    # page's poll (0.3 s): about a second; the bound leaves room for a loaded CI machine
    # (benchmarks/bench_ui.py measures the latency itself).
    assert latency < 5, latency
    shot(browser, "run-live-log")
    (home / "release").write_text("")
    until(lambda: "talker is done" in text_of(browser, "#logs"), 60, "the step's last line")
    until(lambda: text_of(browser, "#run-status") == "SUCCESS", 60, "the run to end")
    assert text_of(browser, "#step-state") != "running"
    assert "RUN_SUCCESS" in text_of(browser, "#event-log")
    assert text_of(browser, "#executor-name")  # the resolved executor is shown
    shot(browser, "run-finished")


def test_cancel_from_the_page_once(browser: Any, ui_url: str, home: Path, instance: Instance) -> None:
    run_id = launch(home, "slow")
    until(lambda: instance.storage.get_run(run_id).status is RunStatus.STARTED, what="the run to start")
    browser.get(f"{ui_url}/runs/{run_id}")
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")  # a second tab, loaded before the cancel
    browser.get(f"{ui_url}/runs/{run_id}")
    second = browser.current_window_handle
    browser.switch_to.window(first)
    browser.find_element("id", "cancel-button").click()
    until(lambda: text_of(browser, "#run-status") == "CANCELED", 60, "the page to show CANCELED")
    assert "cancel requested" in text_of(browser, "#event-log")
    shot(browser, "run-canceled")
    browser.switch_to.window(second)
    # The second tab's button may already be hidden by its live refresh: submit its form as a click would.
    browser.execute_script("document.getElementById('cancel-form').submit()")
    until(lambda: "already" in text_of(browser, "#error-message"), what="the second cancel to be refused")
    shot(browser, "run-cancel-refused")
    browser.close()
    browser.switch_to.window(first)
    assert instance.storage.get_run(run_id).status is RunStatus.CANCELED
    cancels = [e for e in instance.storage.get_events(run_id, types=[EventType.ENGINE])
               if e.event.data.get("action") == "cancel"]
    assert len(cancels) == 1, cancels
    assert len(instance.storage.get_events(run_id, types=[EventType.RUN_CANCELED])) == 1


def test_reexecute_from_failure_once(browser: Any, ui_url: str, home: Path, instance: Instance) -> None:
    parent_id = launch(home, "flaky", wait=True)
    assert instance.storage.get_run(parent_id).status is RunStatus.FAILURE
    browser.get(f"{ui_url}/runs/{parent_id}")
    until(lambda: "the fixed file is missing" in text_of(browser, "#failures"), what="the failure to be shown")
    browser.find_element("css selector", "#failures summary").click()
    assert "RuntimeError" in text_of(browser, "#failures pre")  # the traceback
    # The retried step's two attempts are two bars: the failed one that was retried, then the success.
    attempts = browser.execute_script(
        "return window.__runyard.steps.get('wobbly').attempts.map(a => [a.n, a.outcome, a.end >= a.start])")
    assert attempts == [[1, "retry", True], [2, "success", True]]
    shot(browser, "run-failed")
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(f"{ui_url}/runs/{parent_id}")
    second = browser.current_window_handle
    browser.switch_to.window(first)
    (home / "fixed").write_text("")
    browser.find_element("id", "reexecute-button").click()
    until(lambda: f"/runs/{parent_id}" not in browser.current_url, what="the page of the new run")
    child_id = browser.current_url.rsplit("/", 1)[1].split("?")[0]
    until(lambda: text_of(browser, "#run-status") == "SUCCESS", 90, "the re-execution to succeed")
    assert "steps second" in text_of(browser, ".meta")
    shot(browser, "run-reexecuted")
    browser.switch_to.window(second)
    browser.find_element("id", "reexecute-button").click()
    until(lambda: "was re-executed" in text_of(browser, "#error-message"), what="the second re-execution refused")
    shot(browser, "run-reexecute-refused")
    browser.close()
    browser.switch_to.window(first)
    children, count = instance.storage.page_runs(RunFilter(parent_run_id=parent_id))
    assert count == 1 and children[0].run_id == child_id
    child = children[0]
    assert child.status is RunStatus.SUCCESS
    assert list(child.step_selection or []) == ["second"]  # only what did not succeed
    notes = [e.event for e in instance.storage.get_events(parent_id, types=[EventType.ENGINE])]
    assert [n.data.get("child_run_id") for n in notes if n.data.get("action") == "reexecute"] == [child_id]
