"""The web console in-process (FastAPI TestClient, no processes): login and the session
cookie, CSRF and origin checks, pages and static files served (and refused without a
session), the token in no response or log; ``POST /v1/validate`` and the timeline endpoint."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.fakes import fake_host
from vmforge.api import create_app
from vmforge.api.app import mark_transport
from vmforge.api.web import SESSION_COOKIE, STATIC, Sessions
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir
from vmforge.spec import load_request

TOKEN = "web-unit-token-8c1d2e3f4a5b6c7d"
PAGES = ("/", "/create", "/images", "/vms/web-1")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0vV8eY2GQ2Yk0yqQ8m9z4sCz8W4S0kM4vQ7m1cQ9x me@host"


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[VmManager]:
    m = VmManager(DataDir(tmp_path / "data").ensure(), host=fake_host())
    yield m
    m.close()


@pytest.fixture
def client(manager: VmManager) -> Iterator[TestClient]:
    app = create_app(manager, TOKEN, supervise=False, stream_limit=0.2)
    with TestClient(app, follow_redirects=False) as c:
        yield c


def login(c: TestClient) -> str:
    """Log in through the form; the page's CSRF token."""
    r = c.post("/login", data={"token": TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/"
    page = c.get("/")
    assert page.status_code == 200
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert m, page.text[:500]
    return m.group(1)


def kernel_request(tmp_path: Path, name: str = "web-1") -> dict[str, Any]:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"\x7fELF kernel")
    initrd.write_bytes(b"initrd")
    return {"name": name, "spec": {"memory_mib": 256,
                                   "kernel": {"kernel": str(kernel), "initrd": str(initrd)}}}


# -- without a session: nothing
def test_pages_redirect_to_the_login_form_and_the_api_refuses(client: TestClient) -> None:
    for path in PAGES:
        r = client.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"] == ("/login" if path == "/" else f"/login?next={path}")
    for method, path in (("GET", "/v1/vms"), ("GET", "/v1/events"), ("POST", "/v1/validate"),
                         ("GET", "/v1/images"), ("GET", "/v1/vms/web-1/timeline")):
        assert client.request(method, path).status_code == 401, path
    form = client.get("/login")
    assert form.status_code == 200
    assert '<form method="post" action="/login"' in form.text
    assert 'name="token"' in form.text and '<label for="token">' in form.text
    assert form.headers["content-security-policy"].startswith("default-src 'self'")
    assert form.headers["x-frame-options"] == "DENY"
    # a made-up cookie is no session
    client.cookies.set(SESSION_COOKIE, "made-up")
    assert client.get("/").status_code == 303
    assert client.get("/v1/vms").status_code == 401


def test_wrong_token_sets_no_cookie(client: TestClient, caplog: pytest.LogCaptureFixture
                                    ) -> None:
    caplog.set_level(logging.DEBUG)
    for token in ("wrong", TOKEN + "x", "", TOKEN[:-1]):
        r = client.post("/login", data={"token": token})
        assert r.status_code == 401, token
        assert "set-cookie" not in r.headers
        assert 'id="login-error"' in r.text and "hidden class" not in r.text.split(
            'id="login-error"')[1][:20]
    r = client.post("/login", content=b'{"token": "%s"}' % TOKEN.encode(),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "set-cookie" not in r.headers
    assert client.get("/").status_code == 303
    assert TOKEN not in caplog.text


def test_login_sets_an_httponly_strict_session_cookie_not_the_token(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    r = client.post("/login", data={"token": TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    assert "secure" not in attrs  # plain HTTP here; set over TLS
    assert TOKEN not in cookie and TOKEN not in r.headers.get("location", "")
    for path in PAGES:
        page = client.get(path)
        assert page.status_code == 200, path
        assert TOKEN not in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert page.headers["cache-control"] == "no-store"
    assert client.get("/v1/vms").json() == []  # the cookie works for the API too
    assert client.get("/login").status_code == 303  # already logged in
    assert TOKEN not in caplog.text


def test_state_changes_need_the_csrf_token(client: TestClient, tmp_path: Path,
                                           manager: VmManager) -> None:
    csrf = login(client)
    req = kernel_request(tmp_path)
    r = client.post("/v1/vms", params={"start": False}, json=req)
    assert r.status_code == 403 and "X-CSRF-Token" in r.json()["message"]
    r = client.post("/v1/vms", params={"start": False}, json=req,
                    headers={"X-CSRF-Token": csrf + "x"})
    assert r.status_code == 403
    assert manager.vms() == []
    r = client.post("/v1/vms", params={"start": False}, json=req,
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    assert client.delete("/v1/vms/web-1").status_code == 403
    assert client.delete("/v1/vms/web-1", headers={"X-CSRF-Token": csrf}).status_code == 200
    # Another session's token does not do
    other = TestClient(client.app, follow_redirects=False)
    other_csrf = login(other)
    assert other_csrf != csrf
    r = client.post("/v1/validate", json={}, headers={"X-CSRF-Token": other_csrf})
    assert r.status_code == 403
    # GETs need none
    assert client.get("/v1/vms").status_code == 200


def test_cross_origin_requests_are_refused(client: TestClient) -> None:
    csrf = login(client)
    ok = {"X-CSRF-Token": csrf}
    r = client.post("/v1/validate", json={}, headers={**ok, "Origin": "http://testserver"})
    assert r.status_code == 200
    for origin in ("http://evil.example", "null", "http://testserver.evil.example"):
        r = client.post("/v1/validate", json={}, headers={**ok, "Origin": origin})
        assert r.status_code == 403 and r.json()["message"] == "cross-origin request refused"
    # login CSRF: a foreign page posting the form
    fresh = TestClient(client.app, follow_redirects=False)
    r = fresh.post("/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers


def test_websocket_exec_with_the_cookie_only_from_this_origin(client: TestClient) -> None:
    from starlette.websockets import WebSocketDisconnect
    login(client)
    with pytest.raises(WebSocketDisconnect) as info:
        with client.websocket_connect("/v1/vms/web-1/exec/ws",
                                      headers={"Origin": "http://evil.example"}) as ws:
            ws.receive_text()
    assert info.value.code == 1008
    # same origin: the session is the credential (the VM does not exist: an error message)
    with client.websocket_connect("/v1/vms/web-1/exec/ws",
                                  headers={"Origin": "http://testserver"}) as ws:
        ws.send_text('{"argv": ["true"]}')
        reply = ws.receive_json()
    assert reply["error"]["error"] == "VmNotFound"
    fresh = TestClient(client.app)
    with pytest.raises(WebSocketDisconnect) as info:  # no cookie, no token: refused
        with fresh.websocket_connect("/v1/vms/web-1/exec/ws") as ws:
            ws.receive_text()
    assert info.value.code == 1008


def test_bearer_token_needs_no_csrf(client: TestClient) -> None:
    r = client.post("/v1/validate", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    page = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200


def test_logout_ends_the_session(client: TestClient) -> None:
    csrf = login(client)
    sid = client.cookies.get(SESSION_COOKIE)
    assert client.post("/logout").status_code == 403  # CSRF applies to logout too
    r = client.post("/logout", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert 'max-age=0' in r.headers["set-cookie"].lower() or "expires" in \
        r.headers["set-cookie"].lower()
    client.cookies.set(SESSION_COOKIE, sid or "")
    assert client.get("/v1/vms").status_code == 401  # the old cookie is dead
    assert client.get("/").status_code == 303


def test_login_returns_to_the_page_asked_for_and_only_to_this_site(client: TestClient
                                                                   ) -> None:
    form = client.get("/login", params={"next": "/vms/web-1"})
    assert 'name="next" value="/vms/web-1"' in form.text
    r = client.post("/login", data={"token": TOKEN, "next": "/vms/web-1"})
    assert r.status_code == 303 and r.headers["location"] == "/vms/web-1"
    for bad in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "x"):
        fresh = TestClient(client.app, follow_redirects=False)
        assert 'name="next" value="/"' in fresh.get("/login", params={"next": bad}).text
        r = fresh.post("/login", data={"token": TOKEN, "next": bad})
        assert r.headers["location"] == "/", bad


def test_a_new_login_gets_a_new_session_id(client: TestClient) -> None:
    login(client)
    first = client.cookies.get(SESSION_COOKIE)
    login(client)
    assert client.cookies.get(SESSION_COOKIE) != first
    client.cookies.set(SESSION_COOKIE, first or "")
    assert client.get("/v1/vms").status_code == 401


def test_sessions_expire_and_are_bounded() -> None:
    s = Sessions(ttl=-1)
    sid, _ = s.new()
    assert s.find(sid) is None
    s = Sessions(cap=3)
    sids = [s.new()[0] for _ in range(5)]
    assert len(s) == 3 and s.find(sids[0]) is None and s.find(sids[-1]) is not None
    assert s.find("x" * 500) is None and s.find("") is None


def test_unix_socket_needs_no_login_but_checks_origin(manager: VmManager) -> None:
    app = create_app(manager, TOKEN, supervise=False)
    with TestClient(mark_transport(app, "unix"), follow_redirects=False) as c:
        for path in PAGES:
            r = c.get(path)
            assert r.status_code == 200, path
            assert 'content="">' in r.text  # no CSRF token: no cookie is involved
        assert c.get("/login").status_code == 303
        assert c.post("/v1/validate", json={}).status_code == 200
        # a socket forwarded to a local port must not be driven by other sites
        r = c.post("/v1/validate", json={}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403


def test_static_files(client: TestClient) -> None:
    names = sorted(p.name for p in STATIC.iterdir())
    for name in ("style.css", "common.js", "vms.js", "create.js", "vm.js", "images.js",
                 "login.html", "vms.html", "create.html", "vm.html", "images.html"):
        assert name in names
    r = client.get("/static/vms.js")  # no data in them: served without a session
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/../web.py").status_code == 404
    assert client.get("/static/nope.js").status_code == 404


def test_pages_are_accessible_plain_html() -> None:
    """Every form control has a label; no inline script or style (the CSP forbids them);
    the DOM is built without innerHTML."""
    for page in STATIC.glob("*.html"):
        text = page.read_text()
        assert '<html lang="en">' in text and 'name="viewport"' in text, page
        assert "<script>" not in text and "style=" not in text and " on" + "click=" not in text
        ids = set(re.findall(r'<label[^>]* for="([^"]+)"', text))
        for _tag, attrs in re.findall(r"<(input|select|textarea)\b([^>]*)>", text):
            if 'type="hidden"' in attrs or 'type="radio"' in attrs or 'type="checkbox"' in attrs:
                continue
            m = re.search(r'\bid="([^"]+)"', attrs)
            assert m and (m.group(1) in ids or "aria-label" in attrs), (page.name, attrs)
    for js in STATIC.glob("*.js"):
        assert ".innerHTML" not in js.read_text(), js


def test_vm_page_refuses_bad_names(client: TestClient) -> None:
    login(client)
    assert client.get("/vms/..%2Fx").status_code == 404
    assert client.get("/vms/a_b").status_code == 404


# -- POST /v1/validate
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_validate_yaml_error_has_line_and_column(client: TestClient, manager: VmManager
                                                 ) -> None:
    ud = "#cloud-config\nhostname: a\n  packages: [git]\n"
    r = client.post("/v1/validate", headers=AUTH, json={"request": {
        "name": "web-1", "spec": {"kernel": {"image": "minimal"},
                                  "cloud_init": {"user_data": ud}}}})
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is False
    (err,) = body["errors"]
    assert err["field"] == "spec.cloud_init.user_data" and err["error"] == "SeedError"
    assert (err["line"], err["column"]) == (3, 11), err
    assert "line 3, column 11" in err["message"]
    assert manager.vms() == []


def test_validate_schema_problems_are_listed_one_by_one(client: TestClient) -> None:
    ud = "#cloud-config\nhostname: 3\npackages: nginx\nusers: [{name: a, shell: 7}]\n"
    r = client.post("/v1/validate", headers=AUTH, json={"user_data": ud,
                                                        "network_config": "version: 3\n"})
    errs = r.json()["errors"]
    ud_errs = [e for e in errs if e["field"] == "user_data"]
    assert len(ud_errs) >= 2 and all(e["line"] for e in ud_errs), ud_errs
    assert any(e["field"] == "network_config" and "version" in e["message"] for e in errs)


def test_validate_spec_errors_name_each_field(client: TestClient) -> None:
    r = client.post("/v1/validate", headers=AUTH, json={"request": {
        "name": "a_b", "spec": {"memory_mib": 1, "cpu_cores": 0, "bogus": True}}})
    fields = sorted(e["field"] for e in r.json()["errors"])
    assert fields == ["name", "spec.bogus", "spec.cpu_cores", "spec.memory_mib"]
    assert r.json()["yaml"] is None
    r = client.post("/v1/validate", headers=AUTH, json={"request": {
        "name": "a", "spec": {"disks": [{"id": "d", "backing_file": "/nonexistent.qcow2"}]}}})
    (err,) = r.json()["errors"]
    assert err["field"] == "spec.disks[0].backing_file"  # found by planning, as create would
    r = client.post("/v1/validate", headers=AUTH, json={"document": "name: a\nspec:\n  x: [1\n"})
    (err,) = r.json()["errors"]
    assert err["line"] == 4 and err["column"] == 1, err
    assert client.post("/v1/validate", headers=AUTH, json={"bogus": 1}).status_code == 422


def test_validate_gives_yaml_that_vmforge_run_reads_back(client: TestClient,
                                                         tmp_path: Path) -> None:
    req = kernel_request(tmp_path)
    req["spec"].update(cpu_cores=2, firmware="FIRMWARE_BIOS",
                       nics=[{"id": "net0", "forwards": [{"host_port": 2222,
                                                          "guest_port": 22}]}],
                       cloud_init={"user_data": "#cloud-config\nhostname: web-1\n",
                                   "meta_data": "instance-id: web-1\n"})
    body = client.post("/v1/validate", headers=AUTH, json={"request": req}).json()
    assert body["ok"] is True and body["errors"] == [], body
    f = tmp_path / "web-1.yaml"
    f.write_text(body["yaml"])
    assert "user_data: |\n" in body["yaml"]  # block scalars for documents
    assert load_request(f).model_dump() == load_request_from(req, tmp_path).model_dump()
    assert yaml.safe_load(body["yaml"]) == body["request"]


def load_request_from(data: dict[str, Any], tmp: Path) -> Any:
    f = tmp / "from-json.yaml"
    f.write_text(yaml.safe_dump(data))
    return load_request(f)


def test_validate_ssh_key_fills_a_default_user(client: TestClient, tmp_path: Path) -> None:
    req = kernel_request(tmp_path)
    body = client.post("/v1/validate", headers=AUTH, json={
        "request": req, "ssh_key": KEY, "ssh_user": "alice"}).json()
    assert body["ok"], body
    doc = yaml.safe_load(body["user_data"].split("\n", 1)[1])
    user = next(u for u in doc["users"] if isinstance(u, dict))
    assert user["name"] == "alice" and user["ssh_authorized_keys"] == [KEY]
    assert doc["hostname"] == "web-1"
    assert body["request"]["spec"]["cloud_init"]["user_data"] == body["user_data"]
    # user-data of its own is kept
    req["spec"]["cloud_init"] = {"user_data": "#cloud-config\nhostname: x\n"}
    body = client.post("/v1/validate", headers=AUTH, json={"request": req, "ssh_key": KEY}).json()
    assert body["request"]["spec"]["cloud_init"]["user_data"] == "#cloud-config\nhostname: x\n"
    bad = client.post("/v1/validate", headers=AUTH, json={"ssh_key": "not a key"}).json()
    assert [e["field"] for e in bad["errors"]] == ["ssh_key"]


def test_validate_accepts_builtin_images_create_would_build(client: TestClient) -> None:
    body = client.post("/v1/validate", headers=AUTH, json={"request": {
        "name": "a", "spec": {"kernel": {"image": "minimal"}}}}).json()
    assert body["ok"], body
    body = client.post("/v1/validate", headers=AUTH, json={"request": {
        "name": "a", "spec": {"kernel": {"image": "nosuch"}}}}).json()
    assert [e["field"] for e in body["errors"]] == ["spec.kernel.image"]


def test_timeline_of_a_vm_that_never_ran(client: TestClient, tmp_path: Path) -> None:
    assert client.post("/v1/vms", params={"start": False}, headers=AUTH,
                       json=kernel_request(tmp_path)).status_code == 201
    r = client.get("/v1/vms/web-1/timeline", headers=AUTH)
    assert r.status_code == 200 and r.json()["vm"] == "web-1"
    assert r.json()["summary"] == "no boot recorded"
    svg = client.get("/v1/vms/web-1/timeline", params={"format": "svg"}, headers=AUTH)
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
    assert svg.text.startswith("<?xml") and "<svg" in svg.text
    assert client.get("/v1/vms/nope/timeline", headers=AUTH).status_code == 404
    assert client.get("/v1/vms/web-1/timeline", params={"format": "png"},
                      headers=AUTH).status_code == 422
    client.delete("/v1/vms/web-1", headers=AUTH)


def test_openapi_lists_the_new_endpoints_but_no_pages(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/validate" in paths and "/v1/vms/{name}/timeline" in paths
    assert not any(p in paths for p in ("/", "/login", "/logout", "/create", "/images"))


@pytest.mark.parametrize("body", [
    {"request": {"name": "a", "spec": {"cloud_init": ["x"]}}},
    {"request": {"name": "a", "spec": {"cloud_init": {"user_data": 7}}}},
    {"request": {"name": "a", "spec": {"disks": [{"id": "d", "backing_file": "\u0000x"}]}}},
    {"request": {"name": "a", "spec": {"cdroms": [{"id": "c", "iso_path": "/dev/null"}]}}},
    {"request": {"spec": None}},
    {"document": "- just\n- a list\n"},
    {"document": "a: &x [*x]\n"},
    {"document": "{}", "request": {"name": "a"}},
    {"user_data": "\u001f\u008b not gzip"},
    {"network_config": "network: {version: 1, config: [{}]}"},
    {"meta_data": "[1, 2]"},
    {"vendor_data": "#!/bin/sh\necho hi\n"},
])
def test_validate_answers_odd_input_with_problems_not_500(client: TestClient,
                                                          body: dict[str, Any]) -> None:
    r = client.post("/v1/validate", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ok"] is (body == {"vendor_data": "#!/bin/sh\necho hi\n"}), out
    assert all(e["message"] for e in out["errors"])
