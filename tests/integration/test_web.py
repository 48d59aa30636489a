"""The web console in a real headless Chromium (Debian's chromium + chromium-driver, driven
by selenium) against a real `vmforge serve` with real VMs, over the session's data directory
with the minimal image: log in; a cloud-config with a YAML error shows line and column and
creates nothing; the wizard works from the keyboard alone; a VM created through the wizard
shows up and reaches running in the table of another tab without a reload; `uname -a` from
the VM page; a pull from a local HTTP server with its progress to 100 %; deleting an image in
use is refused with the reason; the VM deleted with confirmation.

One VM boots (the machine boots one at a time in tests). Screenshots of every page go to
$VMFORGE_WEB_SHOTS (default /tmp/vmforge-web-shots). The browser, its driver and the daemon
are stopped by PID at the end, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.integration.imageserver import Server
from tests.integration.test_daemon import Daemon
from vmforge.paths import DataDir
from vmforge.spec import load_request

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = Path(os.environ.get("VMFORGE_WEB_SHOTS", "/tmp/vmforge-web-shots"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
VM = "web-1"
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0vV8eY2GQ2Yk0yqQ8m9z4sCz8W4S0kM4vQ7m1cQ9x "
       "tester@web")
T = TypeVar("T")

selenium = pytest.importorskip("selenium", reason="pip install selenium (the test extra)")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


class Browser:
    """A headless Chromium with a fresh profile; stopped by PID (driver and browser)."""

    def __init__(self, tmp: Path, base: str) -> None:
        self.profile = tmp / "profile"
        self.base = base
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ARGS:
            opts.add_argument(a)
        opts.add_argument(f"--user-data-dir={self.profile}")
        opts.add_argument("--window-size=1280,900")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.downloads = tmp / "downloads"
        self.downloads.mkdir()
        opts.add_experimental_option("prefs", {
            "download.default_directory": str(self.downloads),
            "download.prompt_for_download": False})
        from selenium.webdriver.chrome.service import Service
        self.service = Service(CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
        self.d: WebDriver = webdriver.Chrome(service=self.service, options=opts)
        self.js_errors: list[str] = []

    def get(self, path: str) -> None:
        self.d.get(self.base + path)

    def wait(self, cond: Callable[[WebDriver], T], timeout: float = 30, what: str = "") -> T:
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1, ignored_exceptions=(
                NoSuchElementException, StaleElementReferenceException)).until(cond)
        except Exception:
            self.shot(f"failed-{what or 'wait'}")
            requests = self.d.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name + ' ' + "
                "Math.round(e.startTime) + '+' + Math.round(e.duration))")
            print("requests of the page:", *requests, sep="\n  ")
            raise

    def el(self, css: str) -> Any:
        return self.d.find_element(By.CSS_SELECTOR, css)

    def els(self, css: str) -> list[Any]:
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def shot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.d.save_screenshot(str(path))
        return path

    def collect_errors(self) -> list[str]:
        """JavaScript errors logged since the last call (failed fetches are expected)."""
        for entry in self.d.get_log("browser"):
            msg = entry.get("message", "")
            if entry.get("level") == "SEVERE" and "Failed to load resource" not in msg:
                self.js_errors.append(msg)
        out, self.js_errors = self.js_errors, []
        return out

    def click(self, css: str) -> None:
        """Click what ``css`` finds, again if the page re-rendered it meanwhile."""
        for _ in range(20):
            try:
                self.el(css).click()
                return
            except StaleElementReferenceException:
                time.sleep(0.1)
        self.el(css).click()

    def active(self) -> Any:
        return self.d.switch_to.active_element

    def keys(self, *keys: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        ActionChains(self.d).send_keys(*keys).perform()

    def tab_to(self, found: Callable[[Any], bool], limit: int = 60) -> None:
        """Press Tab until the focused element is the one wanted."""
        for _ in range(limit):
            if found(self.active()):
                return
            self.keys(Keys.TAB)
        raise AssertionError("not reachable with Tab")

    def close(self) -> None:
        driver_pid = self.service.process.pid if self.service.process else None
        try:
            self.d.quit()
        finally:
            # Whatever of ours outlived quit(): the driver, and browsers with our profile.
            pids = [driver_pid] if driver_pid else []
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    try:
                        if str(self.profile).encode() in (proc / "cmdline").read_bytes():
                            pids.append(int(proc.name))
                    except OSError:
                        continue
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def daemon(vm_data: DataDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(vm_data, tmp_path_factory.mktemp("webd"))
    d.start()
    try:
        yield d
    finally:
        try:
            with d.unix() as c:
                for vm in c.vms():
                    if vm["name"] in (VM, "kb-vm", "web-bad"):
                        c.delete(vm["name"], force=True, stop_timeout=0)
        finally:
            d.stop()
            for log in d.logs:  # the token appears in no log, also not the login form's
                assert d.token not in log.read_text(errors="replace")


@pytest.fixture(scope="module")
def browser(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromium-driver are not installed (scripts/install-deps.sh)")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    b = Browser(tmp_path_factory.mktemp("browser"), f"http://127.0.0.1:{daemon.port}")
    try:
        yield b
    finally:
        b.close()


def log_in(b: Browser, token: str) -> None:
    b.get("/")
    b.wait(lambda d: "/login" in d.current_url, what="login-form")
    field = b.el("#token")
    field.clear()
    field.send_keys(token)
    b.el("#login-submit").click()
    b.wait(lambda d: "/login" not in d.current_url, what="login")


def vm_names(daemon: Daemon) -> list[str]:
    with daemon.unix() as c:
        return [v["name"] for v in c.vms()]


def open_wizard(b: Browser) -> None:
    b.get("/create")
    b.wait(lambda d: "minimal:" in b.el("#image").get_attribute("textContent"),
           what="images-listed")


def next_step(b: Browser, step: int) -> None:
    b.el(f"section[data-step='{step}'] .next").click()
    b.wait(lambda d: b.el(f"section[data-step='{step + 1}']").is_displayed())


# ---------------------------------------------------------------------------- the tests

def test_login(browser: Browser, daemon: Daemon) -> None:
    b = browser
    assert httpx.get(f"{b.base}/v1/vms").status_code == 401
    assert httpx.get(f"{b.base}/", follow_redirects=False).status_code == 303
    b.get("/")
    b.wait(lambda d: "/login" in d.current_url)
    b.shot("01-login")
    b.el("#token").send_keys("not-the-token")
    b.el("#login-submit").click()
    b.wait(lambda d: b.el("#login-error").is_displayed(), what="login-error")
    assert "not the daemon's token" in b.el("#login-error").text
    assert not [c for c in b.d.get_cookies() if c["name"] == "vmforge_session"]
    log_in(b, daemon.token)
    cookie = next(c for c in b.d.get_cookies() if c["name"] == "vmforge_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert daemon.token not in cookie["value"] and daemon.token not in b.d.current_url
    assert "vmforge_session" not in b.d.execute_script("return document.cookie")
    b.wait(lambda d: b.el("#live").text == "connected", what="sse")
    # The page's own code cannot change anything without the CSRF token either.
    status = b.d.execute_async_script(
        "const done = arguments[0]; fetch('/v1/validate', {method: 'POST', headers: "
        "{'Content-Type': 'application/json'}, body: '{}'}).then(r => done(r.status))")
    assert status == 403
    assert b.collect_errors() == []


def test_yaml_error_shows_line_and_column_and_creates_nothing(browser: Browser,
                                                              daemon: Daemon) -> None:
    b = browser
    open_wizard(b)
    b.el("#name").send_keys("web-bad")
    next_step(b, 0)
    assert Select(b.el("#image")).first_selected_option.get_attribute("value").startswith(
        "minimal:")
    next_step(b, 1)
    next_step(b, 2)
    b.el("#user-data").send_keys("#cloud-config\nhostname: web-bad\n  packages: [git]\n")
    item = b.wait(lambda d: b.els("#user-data-errors li"), what="yaml-error")[0]
    assert (item.get_attribute("data-line"), item.get_attribute("data-column")) == ("3", "11")
    assert "line 3, column 11" in item.text and "spec.cloud_init.user_data" in item.text
    assert b.el("#user-data").get_attribute("aria-invalid") == "true"
    b.shot("02-wizard-yaml-error")
    # "Go to line 3, column 11" puts the caret there
    item.find_element(By.CSS_SELECTOR, "button").click()
    caret = b.d.execute_script("const t = document.getElementById('user-data');"
                               "return [document.activeElement.id, t.selectionStart]")
    assert caret == ["user-data", len("#cloud-config\nhostname: web-bad\n") + 10]
    next_step(b, 3)
    b.el("#create").click()
    b.wait(lambda d: b.el("#summary").is_displayed(), what="summary")
    assert "line 3, column 11" in b.el("#summary").text
    time.sleep(0.5)
    assert "/create" in b.d.current_url
    assert "web-bad" not in vm_names(daemon)
    assert not (daemon.data.vms / "web-bad").exists()
    b.shot("03-wizard-refused")
    assert b.collect_errors() == []


def test_wizard_by_keyboard_alone(browser: Browser, daemon: Daemon) -> None:
    """Tab, typing, Enter and Space only: every stop has a label; Enter in a field goes to
    the next step; the VM is created (not started: one boot at a time here)."""
    b = browser
    open_wizard(b)
    assert b.active().get_attribute("id") == "name"  # focus starts in the first field
    b.keys("kb-vm")
    stops = []
    for _ in range(5):
        b.keys(Keys.TAB)
        stops.append(b.active().get_attribute("id") or b.active().text)
    assert stops[:4] == ["cpus", "memory", "firmware", "machine"], stops
    assert stops[4] == "Next: disks and boot"
    # every control reached by Tab on this step has a label
    labelled = b.d.execute_script(
        "return [...document.querySelectorAll('section[data-step=\"0\"] input, "
        "section[data-step=\"0\"] select')].every(e => e.labels && e.labels.length)")
    assert labelled
    b.keys(Keys.ENTER)
    b.wait(lambda d: b.active().get_attribute("id") == "h-disks", what="kb-step2")
    b.keys(Keys.TAB)  # the checked radio of "Boot from"
    assert b.active().get_attribute("value") == "image"
    b.keys(Keys.TAB)
    assert b.active().get_attribute("id") == "image"
    # Back (a button, pressed with Enter), then Enter in the name field also moves on
    b.el("section[data-step='1'] .back").send_keys(Keys.ENTER)
    b.wait(lambda d: b.active().get_attribute("id") == "h-basics")
    b.keys(Keys.TAB)
    assert b.active().get_attribute("id") == "name"
    b.keys(Keys.ENTER)
    b.wait(lambda d: b.active().get_attribute("id") == "h-disks")
    # on to cloud-init with each step's Next button
    for _ in range(2):
        nxt = b.el("section:not([hidden]) .next")
        b.tab_to(lambda e, n=nxt: e == n)
        b.keys(Keys.ENTER)
    b.wait(lambda d: b.active().get_attribute("id") == "h-ci", what="kb-ci")
    b.tab_to(lambda e: e.get_attribute("id") == "user-data")
    b.keys("#cloud-config", Keys.ENTER, "hostname: kb-vm", Keys.ENTER)
    nxt = b.el("section[data-step='3'] .next")
    b.tab_to(lambda e: e == nxt)
    b.keys(Keys.ENTER)
    b.wait(lambda d: "name: kb-vm" in b.el("#yaml").text and
           "hostname: kb-vm" in b.el("#yaml").text, what="kb-yaml")
    b.tab_to(lambda e: e.get_attribute("id") == "start")
    b.keys(Keys.SPACE)  # do not start it
    assert b.el("#start").is_selected() is False
    b.keys(Keys.TAB, Keys.TAB)  # Back, Create
    assert b.active().get_attribute("id") == "create"
    b.shot("04-wizard-keyboard-review")
    b.keys(Keys.ENTER)
    b.wait(lambda d: "/?created=kb-vm" in d.current_url, what="kb-created")
    with daemon.unix() as c:
        assert c.get("kb-vm")["state"] == "created"
        c.delete("kb-vm")
    assert b.collect_errors() == []


def test_create_from_the_minimal_image_and_watch_it_run(browser: Browser,
                                                        daemon: Daemon) -> None:
    b = browser
    b.get("/")
    b.wait(lambda d: b.el("#live").text == "connected", what="sse")
    table_tab = b.d.current_window_handle
    assert not b.els(f"tr[data-vm='{VM}']")
    loaded_at = b.el("body").get_attribute("data-loaded-at")
    b.d.switch_to.new_window("tab")
    open_wizard(b)
    b.el("#name").send_keys(VM)
    b.el("#memory").clear()
    b.el("#memory").send_keys("256")
    next_step(b, 0)
    next_step(b, 1)
    next_step(b, 2)
    b.el("#ssh-key").send_keys(KEY)  # fills user-data with a default user holding it

    def filled(_: Any) -> bool:
        doc = yaml.safe_load(b.el("#user-data").get_attribute("value") or "null")
        users = doc.get("users", []) if isinstance(doc, dict) else []
        return any(isinstance(u, dict) and u.get("name") == "vmforge" and
                   u.get("ssh_authorized_keys") == [KEY] for u in users)
    b.wait(filled, what="ssh-key")
    b.shot("05-wizard-cloud-init")
    next_step(b, 3)
    b.wait(lambda d: f"name: {VM}" in b.el("#yaml").text and "ssh_authorized_keys" in
           b.el("#yaml").text and b.el("#summary").get_attribute("hidden"), what="review")
    # the YAML offered for download is the request, and `vmforge run -f` reads it
    href = b.el("#download").get_attribute("href")
    assert href.startswith("blob:") and b.el("#download").get_attribute("download") == \
        f"{VM}.yaml"
    b.el("#download").click()
    spec_file = b.downloads / f"{VM}.yaml"
    b.wait(lambda d: spec_file.exists() and spec_file.read_text().endswith("\n"),
           what="yaml-downloaded")
    assert spec_file.read_text() == b.el("#yaml").get_attribute("textContent")
    req = load_request(spec_file)
    assert req.name == VM and req.spec.memory_mib == 256 and req.spec.kernel is not None
    assert req.spec.cloud_init is not None and req.spec.cloud_init.user_data is not None
    assert KEY in yaml.safe_load(req.spec.cloud_init.user_data)["users"][1][
        "ssh_authorized_keys"]
    b.shot("06-wizard-review")
    b.el("#create").click()
    b.wait(lambda d: f"/?created={VM}" in d.current_url, what="created")
    b.d.close()
    b.d.switch_to.window(table_tab)
    # the other tab, loaded before the VM existed, shows it and follows it to running
    seen: list[tuple[str, str]] = []

    def progressed(_: Any) -> bool:
        rows = b.els(f"tr[data-vm='{VM}']")
        if rows:
            st = (rows[0].get_attribute("data-state"), rows[0].get_attribute("data-ready"))
            if not seen or seen[-1] != st:
                seen.append(st)
            return st == ("running", "true")
        return False
    b.wait(progressed, timeout=240, what="running")
    assert b.el("body").get_attribute("data-loaded-at") == loaded_at, "the page was reloaded"
    print("states seen in the table:", seen)
    row = b.el(f"tr[data-vm='{VM}']")
    cells = {td.get_attribute("data-label"): td.text for td in
             row.find_elements(By.CSS_SELECTOR, "td")}
    assert cells["Backend"] == "qemu" and cells["Accel"] in ("kvm", "tcg")
    assert cells["CPUs"] == "1" and cells["Memory"] == "256 MiB"
    assert cells["Boot time"].endswith(" s") and cells["IP"].startswith("NAT")
    b.shot("07-vms-running")
    b.d.set_window_size(390, 844)  # a phone
    time.sleep(0.3)
    b.shot("08-vms-phone")
    b.d.set_window_size(1280, 900)
    assert b.collect_errors() == []


def test_vm_page_exec_console_files_timeline(browser: Browser, daemon: Daemon,
                                             tmp_path: Path) -> None:
    b = browser
    b.get(f"/vms/{VM}")
    b.wait(lambda d: "vmforge: ready" in b.el("#console").get_attribute("textContent"),
           what="console")
    b.el("#cmd").send_keys("uname -a")
    b.el("#run").click()
    b.wait(lambda d: b.el("#exec-out").get_attribute("data-done") == "true", what="exec")
    assert b.el("#exec-out").text.startswith("Linux web-1 ")
    assert b.el("#exec-status").text.startswith("exit code 0")
    # a failing command shows its stderr and exit code
    b.el("#cmd").clear()
    b.el("#cmd").send_keys("echo oops >&2; exit 3")
    b.el("#run").click()
    b.wait(lambda d: b.el("#exec-status").text.startswith("exit code 3"), what="exec-3")
    assert b.el("#exec-out .stderr").text == "oops"
    # upload, then read it back through exec
    src = tmp_path / "hello.txt"
    src.write_text("hello from the browser\n")
    b.el("#up-file").send_keys(str(src))
    b.el("#up-path").send_keys("/tmp/hello.txt")
    b.el("#upload").click()
    b.wait(lambda d: b.el("#up-status").get_attribute("data-done"), what="upload")
    assert b.el("#up-status").get_attribute("data-done") == "ok", b.el("#up-status").text
    with daemon.unix() as c:
        assert c.exec(VM, ["cat", "/tmp/hello.txt"]).stdout == b"hello from the browser\n"
    b.el("#down-path").send_keys("/tmp/hello.txt")
    b.el("#download").click()
    b.wait(lambda d: b.el("#up-status").text.startswith("downloaded /tmp/hello.txt (23 bytes"),
           what="download")
    b.wait(lambda d: (b.downloads / "hello.txt").exists(), what="downloaded-file")
    assert (b.downloads / "hello.txt").read_text() == "hello from the browser\n"
    b.el("#health-btn").click()
    b.wait(lambda d: b.els("#health-facts"), what="health")
    assert b.el("#health-facts dd .ok").text == "yes"
    # the boot timeline: a picture (and a table saying the same)
    b.wait(lambda d: b.el("#timeline-summary").text.startswith("ready in"), what="timeline")
    b.wait(lambda d: b.d.execute_script(
        "const i = document.getElementById('timeline-img'); return i.complete && "
        "i.naturalWidth > 0"), what="timeline-img")
    assert len(b.els("#timeline-table tbody tr")) >= 2
    b.shot("09-vm-page")
    b.d.set_window_size(1280, 2600)
    b.shot("10-vm-page-full")
    b.d.set_window_size(1280, 900)
    assert b.collect_errors() == []


def test_images_pull_with_progress_lineage_and_refused_delete(browser: Browser,
                                                              daemon: Daemon,
                                                              tmp_path: Path) -> None:
    b = browser
    with Server() as srv:
        srv.rate = 1.5e6  # about two seconds: the bar is seen on its way
        b.get("/images")
        b.wait(lambda d: b.els("tr[data-ref^='minimal:']"), what="images")
        b.el("#pull-url").send_keys(f"{srv.url}/disk.img")
        b.el("#pull-name").send_keys("web-pulled")
        b.el("#pull-sha").send_keys(srv.sha)
        b.el("#pull").click()
        seen: list[str] = []

        def finished(_: Any) -> bool:
            box = b.els(".job")
            if not box:
                return False
            pct = box[0].find_element(By.CSS_SELECTOR, ".pct").text
            if pct and (not seen or seen[-1] != pct):
                seen.append(pct)
                if pct != "100 %" and len(seen) == 2:
                    b.shot("11-images-pulling")
            return box[0].get_attribute("data-state") != "running"
        b.wait(finished, timeout=60, what="pull")
    job = b.el(".job")
    assert job.get_attribute("data-state") == "succeeded", job.text
    assert job.find_element(By.CSS_SELECTOR, ".pct").text == "100 %"
    assert job.find_element(By.CSS_SELECTOR, "progress").get_attribute("value") == "100"
    assert any(p != "100 %" for p in seen), seen  # it was seen before the end
    b.wait(lambda d: b.els("tr[data-ref='web-pulled:1']"), what="pulled-row")
    # import a file that is on the node
    raw = tmp_path / "imported.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    b.el("#import-path").send_keys(str(raw))
    b.el("#import-name").send_keys("web-imported")
    b.el("#import").click()
    b.wait(lambda d: b.els("tr[data-ref='web-imported:1']"), what="imported-row")
    assert b.el(".job").get_attribute("data-state") == "succeeded"
    assert "Import web-imported" in b.el(".job").text

    # a child image (as a golden build makes): lineage parent -> child; the parent is in use
    from vmforge.images.importing import import_disk
    from vmforge.node.manager import VmManager
    disk = tmp_path / "child.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    m = VmManager(daemon.data)
    try:
        import_disk(m.library, disk, "web-child", source="test",
                    parent=m.library.resolve("web-pulled:1"))
    finally:
        m.close()
    b.get("/images")
    b.wait(lambda d: b.els("tr[data-ref='web-child:1']"), what="child-row")
    assert "web-pulled:1 → web-child:1" in b.el("tr[data-ref='web-child:1'] .lineage").text
    assert VM in b.el("tr[data-ref^='minimal:'] .users").text
    for ref, why in (("web-pulled:1", "in use by image web-child:1"),
                     (b.el("tr[data-ref^='minimal:']").get_attribute("data-ref"),
                      f"in use by VM {VM}")):
        b.click(f"tr[data-ref='{ref}'] button")
        b.wait(lambda d: b.el("#confirm-dialog").is_displayed())
        b.el("#confirm-ok").click()
        b.wait(lambda d, w=why: w in b.el("#error").text, what="refused")
        assert b.el(f"tr[data-ref='{ref}']")  # still there
    b.shot("12-images-refused")
    for ref in ("web-child:1", "web-pulled:1", "web-imported:1"):  # children first
        b.click(f"tr[data-ref='{ref}'] button")
        b.wait(lambda d: b.el("#confirm-dialog").is_displayed())
        b.el("#confirm-ok").click()
        b.wait(lambda d, r=ref: not b.els(f"tr[data-ref='{r}']"), what="image-deleted")
    assert b.collect_errors() == []


def test_delete_the_vm_with_confirmation(browser: Browser, daemon: Daemon) -> None:
    b = browser
    b.get("/")
    b.wait(lambda d: b.els(f"tr[data-vm='{VM}']") and b.el("#live").text == "connected")
    delete = b.el(f"tr[data-vm='{VM}'] button[aria-label='Delete {VM}']")
    delete.click()
    dialog = b.wait(lambda d: b.el("#confirm-dialog").is_displayed() and
                    b.el("#confirm-dialog"), what="dialog")
    assert f"Delete VM {VM}?" in dialog.text and "stopped first" in dialog.text
    assert b.active().get_attribute("id") == "confirm-cancel"  # the safe choice has focus
    b.shot("13-delete-confirm")
    b.keys(Keys.ESCAPE)
    b.wait(lambda d: not b.el("#confirm-dialog").is_displayed())
    assert VM in vm_names(daemon)
    delete.click()
    b.wait(lambda d: b.el("#confirm-dialog").is_displayed())
    b.el("#confirm-ok").click()
    b.wait(lambda d: not b.els(f"tr[data-vm='{VM}']"), timeout=60, what="deleted")
    assert VM not in vm_names(daemon)
    assert not (daemon.data.vms / VM).exists()
    b.shot("14-vms-after-delete")
    assert b.collect_errors() == []
