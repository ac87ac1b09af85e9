"""The live view's server over real loopback HTTP: the token rule, the loopback-name and origin
checks, hostile form input, no secrets, pcap and explain downloads, slow and vanished pages.
The client is the standard library's HTTP client; captures are checked with tshark."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from emulator.lab import Lab
from emulator.web import parse_address
from emulator.web.address import AddressError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fetch(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = 30) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def base(lab: Lab) -> str:
    return f"http://{lab.ui_address.host}:{lab.ui.port}"


@pytest.fixture(scope="module")
def loopback_lab():
    with Lab(ui="127.0.0.1:0") as lab:
        yield lab


@pytest.fixture(scope="module")
def token_lab():
    # 127.0.0.2 is loopback to the kernel but not one of the token-free names: the rule applies.
    with Lab(ui="127.0.0.2:0") as lab:
        yield lab


# ---------------------------------------------------------------------- addresses
@pytest.mark.parametrize("spec,host,port,token", [
    ("8080", "127.0.0.1", 8080, False), ("127.0.0.1:0", "127.0.0.1", 0, False),
    ("localhost:9000", "localhost", 9000, False), ("[::1]:9000", "::1", 9000, False),
    ("127.0.0.2:9000", "127.0.0.2", 9000, True), ("0.0.0.0:9000", "0.0.0.0", 9000, True),
    ("[::]:1", "::", 1, True)])
def test_address_and_token_rule(spec, host, port, token):
    a = parse_address(spec)
    assert (a.host, a.port, a.needs_token) == (host, port, token)
    if token:
        assert len(a.token) >= 24 and a.token in a.url()
        assert parse_address(spec).token != a.token            # fresh every start


@pytest.mark.parametrize("spec", ["", ":80", "host:port", "127.0.0.1:70000", "[::1]9000", "-1"])
def test_bad_addresses_are_refused(spec):
    with pytest.raises(AddressError):
        parse_address(spec)


# ---------------------------------------------------------------------- the token
def test_beyond_loopback_names_the_page_needs_the_token(token_lab):
    url, token = base(token_lab), token_lab.ui_address.token
    for path in ("/", "/api/lab", "/api/matrix", "/api/events", "/assets/live.js", "/conn/c1/pcap"):
        status, body, _ = fetch(url + path)
        assert status == 403, path
        assert b"token" in body
    assert fetch(url + "/?token=" + "x" * len(token))[0] == 403
    assert fetch(url + "/api/rows/np-uns-off/run", data=b"")[0] == 403
    status, body, headers = fetch(f"{url}/?token={token}")
    assert status == 200 and b"<title>" in body
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"]
    assert fetch(url + "/api/lab", headers={"Cookie": cookie})[0] == 200
    assert fetch(url + "/api/lab", headers={"X-Rpcauth-Token": token})[0] == 200


def test_serve_prints_the_token_and_a_warning_beyond_loopback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", "serve", "--smb-port", "0", "--epm-port", "0",
                             "--emsmdb-port", "0", "--ui", "127.0.0.2:0"], cwd=str(tmp_path), env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "live view at" in line:
                break
        text = "".join(lines)
        assert "WARNING" in text and "Token:" in text, text
        url = text.split("live view at ", 1)[1].split()[0]
        token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"][0]
        assert token in text.split("Token:", 1)[1]
        root = url.split("/?")[0]
        assert fetch(root + "/api/lab")[0] == 403
        assert fetch(url)[0] == 200
    finally:
        proc.terminate()
        proc.wait(30)


# ---------------------------------------------------------------------- loopback checks
def test_loopback_page_answers_only_loopback_names(loopback_lab):
    url = base(loopback_lab)
    assert fetch(url + "/api/lab")[0] == 200
    assert fetch(url + "/api/lab", headers={"Host": f"localhost:{loopback_lab.ui.port}"})[0] == 200
    status, body, _ = fetch(url + "/api/lab", headers={"Host": "attacker.example"})
    assert status == 403 and b"loopback" in body


def test_form_posts_from_another_site_are_refused(loopback_lab):
    status, body, _ = fetch(base(loopback_lab) + "/api/rows/np-uns-off/run", data=b"",
                            headers={"Origin": "http://attacker.example"})
    assert status == 403 and b"another site" in body


# ---------------------------------------------------------------------- hostile input
WHATIF = "/api/whatif"


@pytest.mark.parametrize("form,message", [
    ({"mailbox": "x" * (1 << 20)}, "mailbox: 1048576 characters is too long"),
    ({"mailbox": "/o=Corp/ou=Site/cn=Recipients/bob"}, "is not a mailbox DN"),
    ({"mailbox": "cn=bob"}, "is not a mailbox DN"),
    ({"mailbox": "/o=Corp/cn=" + "a" * 65}, "is not a mailbox DN"),
    ({"logged_on": "eve"}, "logged_on: unknown user 'eve'"),
    ({"typed": "eve:pw"}, "typed: unknown user 'eve'"),
    ({"ipc_session": "eve"}, "ipc_session: unknown user 'eve'"),
    ({"ipc_session": "bob:guess"}, "user's name only"),
    ({"logged_on": "<script>"}, "is not a user name"),
    ({"typed": "bob:" + "p" * 300}, "1 to 256 characters"),
    ({"binding_order": "ncacn_np,ncacn_np"}, "at most once"),
    ({"binding_order": "ncacn_http"}, "unknown protocol sequence"),
    ({"binding_order": ""}, "at least one"),
    ({"use_network_security": "maybe"}, "on or off"),
    ({"call": "EcDoRpc"}, "EcDoConnect or EcDoConnectEx"),
    ({"surprise": "1"}, "unknown field"),
])
def test_hostile_what_if_input_gets_a_clear_400(loopback_lab, form, message):
    status, body, headers = fetch(base(loopback_lab) + WHATIF, data=urllib.parse.urlencode(form).encode())
    text = body.decode()
    assert status == 400, text
    assert message in text
    assert "Traceback" not in text and len(text) < 400
    assert headers["Content-Type"].startswith("text/plain")


def test_oversized_and_broken_bodies_and_unknown_rows_then_the_server_still_serves(loopback_lab):
    url = base(loopback_lab)
    status, body, _ = fetch(url + WHATIF, data=b"mailbox=" + b"y" * (3 << 20))
    assert status == 413 and b"exceeded" in body.lower()
    status, body, _ = fetch(url + WHATIF, data=b"\xff\xfe=\x00%zz&&&==",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and b"Traceback" not in body
    status, body, _ = fetch(url + "/api/rows/" + "z" * 500 + "/run", data=b"")
    assert status == 404 and len(body) < 200
    assert fetch(url + "/assets/../../setup.cfg")[0] == 404
    # Still serving: a valid what-if runs end to end.
    status, body, _ = fetch(url + WHATIF, data=b"binding_order=ncacn_ip_tcp&typed=bob&logged_on=alice")
    assert status == 200, body
    assert json.loads(body)["client"]["acting_user"] == "CORP\\bob"


def test_no_secret_leaves_the_server(loopback_lab):
    url = base(loopback_lab)
    fetch(url + "/api/rows/tcp-uns-off/run", data=b"")
    lab_doc = fetch(url + "/api/lab")[1].decode()
    assert json.loads(lab_doc)["users"][0]["password"] == "set"
    with urllib.request.urlopen(url + "/api/events", timeout=30) as r:
        snapshot = b""
        while b"\n\n" not in snapshot.split(b"event: snapshot", 1)[-1]:
            snapshot += r.read1(65536)
    for doc in (lab_doc, fetch(url + "/api/matrix")[1].decode(), snapshot.decode()):
        for user in ("alice", "bob", "carol", "mallory"):
            assert loopback_lab.password(user) not in doc


# ---------------------------------------------------------------------- downloads
def test_pcap_and_explain_of_a_connection(loopback_lab):
    url = base(loopback_lab)
    status, body, _ = fetch(url + "/api/rows/np-uns-off/run", data=b"")
    conn = json.loads(body)["conns"][-1]
    deadline = time.monotonic() + 20
    while json.loads(fetch(f"{url}/api/conns/{conn}")[1])["closed"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    status, pcap, headers = fetch(f"{url}/conn/{conn}/pcap")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    assert pcap[:4] == bytes.fromhex("d4c3b2a1")
    status, text, _ = fetch(f"{url}/conn/{conn}/explain")
    msg = json.loads(fetch(f"{url}/api/conns/{conn}")[1])
    verdicts = [v for f in msg["final"] for v in f["verdicts"]]
    assert any("inherited from the SMB session" in v for v in verdicts)
    for v in verdicts:                       # the page's verdict lines are explain's
        assert f"Verdict: {v}" in text.decode()
    if shutil.which("tshark"):
        path = os.path.join(loopback_lab.captures_dir, f"{conn}-download.pcap")
        with open(path, "wb") as fh:
            fh.write(pcap)
        out = subprocess.run(["tshark", "-n", "-r", path, "-Y", "ntlmssp.auth.username", "-T", "fields",
                              "-e", "ntlmssp.auth.username"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "alice" in out.stdout
    assert fetch(f"{url}/conn/c999999/pcap")[0] == 404


# ---------------------------------------------------------------------- pages that go away
def test_vanished_and_silent_pages_cost_nothing(loopback_lab):
    url = base(loopback_lab)
    host, port = loopback_lab.ui_address.host, loopback_lab.ui.port
    socks = []
    for _ in range(20):
        s = socket.create_connection((host, port))
        s.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        socks.append(s)
    time.sleep(0.5)
    for s in socks[:10]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()                               # reset: the page vanished
    for _ in range(3):
        status, body, _ = fetch(url + WHATIF, data=b"binding_order=ncacn_ip_tcp&typed=bob&logged_on=alice")
        assert status == 200
    time.sleep(0.5)
    assert loopback_lab.ui.hub.subscribers <= 10
    for s in socks[10:]:
        s.close()
    assert fetch(url + "/api/lab")[0] == 200


def test_a_page_that_does_not_keep_up_is_dropped(loopback_lab):
    """A page that never reads: once its unsent bytes pass the bound it is cut off, and the
    pages that do read, and the server, go on."""
    from emulator.web.broadcast import MAX_BUFFERED

    host, port = loopback_lab.ui_address.host, loopback_lab.ui.port
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    silent.connect((host, port))
    silent.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    time.sleep(0.5)
    hub, loop = loopback_lab.ui.hub, loopback_lab._loop
    before = hub.dropped
    big = {"filler": "x" * (256 << 10)}
    deadline = time.monotonic() + 30
    while hub.dropped == before and time.monotonic() < deadline:
        loop.call_soon_threadsafe(hub.publish, "row", big)
        time.sleep(0.01)
    assert hub.dropped > before, f"a page holding {MAX_BUFFERED} unsent bytes was not dropped"
    silent.settimeout(5)
    with pytest.raises(OSError):                # the server cut it off
        while silent.recv(1 << 20):
            pass
    silent.close()
    assert fetch(base(loopback_lab) + "/api/lab")[0] == 200


# ---------------------------------------------------------------------- the command line
def _rpcauth(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emulator.cli", *args], env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_bad_ui_addresses_are_refused_by_the_cli():
    for cmd in (["serve", "--smb-port", "0", "--epm-port", "0", "--emsmdb-port", "0"], ["matrix"]):
        proc = _rpcauth(*cmd, "--ui", "127.0.0.1:http")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2
        assert "--ui" in err and "port must be a number" in err and "Traceback" not in err


def test_matrix_ui_runs_the_rows_live_prints_the_table_and_keeps_serving(tmp_path):
    rows = tmp_path / "rows.yaml"
    rows.write_text(
        "rows:\n"
        "  - id: np-uns-off\n"
        "    binding_order: [ncacn_np, ncacn_ip_tcp]\n"
        "    use_network_security: false\n"
        "    typed: bob\n"
        "    expect: {prompt_shown: true, acting_user: \"CORP\\\\alice\", auth_layer: smb_session_setup,\n"
        "             outcome: denied, status_name: ecLoginPerm, typed_on_wire: false}\n"
        "  - id: no-smb\n"
        "    binding_order: [ncacn_np, ncacn_ip_tcp]\n"
        "    use_network_security: true\n"
        "    typed: bob\n"
        "    disable: [smb]\n"
        "    expect: {acting_user: \"CORP\\\\bob\", auth_layer: rpc_bind, outcome: opened}\n")
    proc = _rpcauth("matrix", "--scenarios", str(rows), "--ui", "127.0.0.1:0")
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if "live view at " in line:
                url = line.split("live view at ", 1)[1].strip()
        assert url, "no live view URL printed"
        table = ""
        while "rows as the KB says" not in table and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            table += line
        assert "2/2 rows as the KB says" in table, table
        doc = json.loads(fetch(url + "api/matrix")[1])
        assert [r["id"] for r in doc["rows"]] == ["np-uns-off", "no-smb"]
        results = {r["id"]: r for r in doc["results"]}
        assert results["np-uns-off"]["ok"] and results["no-smb"]["ok"]
        assert results["np-uns-off"]["cells"]["acting_user"]["text"] == "✓ CORP\\alice"
        assert results["no-smb"]["cells"]["auth_layer"]["text"] == "✓ rpc_bind"
    finally:
        proc.send_signal(2)
        proc.wait(30)
    assert proc.returncode == 0


# ---------------------------------------------------------------------- a flood
def test_a_flood_of_connections_sends_a_count_not_ladders(loopback_lab):
    from emulator.web.broadcast import MAX_VIEWS_PER_TICK

    view = loopback_lab.ui
    fetch(base(loopback_lab) + WHATIF, data=b"binding_order=ncacn_ip_tcp&typed=bob&logged_on=alice")
    known = list(view.conns.views)[-(MAX_VIEWS_PER_TICK + 2):]
    calm = view._render(known[-1:])
    assert calm["conns"] and "svg" in calm["conns"][0]
    view._last_flood = float("-inf")
    flood = view._render(known)
    assert flood["conns"] == [] and flood["skipped"] == len(known)
    assert flood["latest"]["conn"] == known[-1] and "acting as" in flood["latest"]["words"]
    assert view._render(known) is None            # at most one flood notice a second


def test_a_page_that_accepts_gzip_gets_one_stream_it_can_decode(loopback_lab):
    """Messages are deflated once for every page and appended to each page's gzip stream; a
    page that joined at any time must decode all of them, the snapshot first."""
    host, port = loopback_lab.ui_address.host, loopback_lab.ui.port
    streams = []
    for _ in range(2):
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\nAccept-Encoding: gzip\r\n\r\n".encode())
        streams.append(s)
        fetch(base(loopback_lab) + WHATIF, data=b"binding_order=ncacn_ip_tcp&typed=bob&logged_on=alice")
    for s in streams:
        raw = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            head, sep, body = raw.partition(b"\r\n\r\n")
            if sep and b"event: whatif" in _dechunked_gunzip(body):
                break
            raw += s.recv(65536)
        s.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head
        text = _dechunked_gunzip(body).decode()
        assert text.startswith("retry: 2000\n\nevent: snapshot\n")
        assert "event: whatif" in text
        for user in ("alice", "bob"):
            assert loopback_lab.password(user) not in text


def _dechunked_gunzip(body: bytes) -> bytes:
    import zlib

    data, rest = b"", body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep or not size_line:
            break
        size = int(size_line, 16)
        if len(rest) < size + 2:
            break
        data, rest = data + rest[:size], rest[size + 2:]
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
