"""Real networks, on both hosts: waiting for connectivity, HTTP(S) proxies (fake_server's proxy mode
and a real tinyproxy), requests renewed through task_will_begin_delayed_request, secret headers by
origin, TLS settings that reach the daemon (client certificates, minimum version, pinning), and no
secret under the session directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import (
    HERE,
    LONG,
    FakeClock,
    Ledger,
    MiB,
    Recorder,
    TinyProxy,
    download,
    read_pid_file,
    sha,
    stop_daemon,
    wait_until,
)

D = bg.DelayedRequestDisposition


class Net(Recorder):
    """A Recorder that also records waiting periods and challenges (answered by *answer*)."""

    def __init__(self, answer=None) -> None:
        super().__init__()
        self.waiting: list[int] = []
        self.waited = threading.Event()
        self.challenges: list[bg.AuthChallenge] = []
        self.answer = answer

    def task_is_waiting_for_connectivity(self, session, task):
        self.waiting.append(task.identifier)
        self.waited.set()

    def task_did_receive_challenge(self, session, task, challenge):
        self.challenges.append(challenge)
        if self.answer is None:
            return bg.AuthChallengeDisposition.PERFORM_DEFAULT_HANDLING, None
        return self.answer(challenge)


class Renewer(Net):
    """A Net that answers task_will_begin_delayed_request with *renew(request)* and records each question."""

    def __init__(self, renew, answer=None) -> None:
        super().__init__(answer)
        self.renew = renew
        self.renewals: list[tuple[int, str, dict]] = []

    def task_will_begin_delayed_request(self, session, task, request):
        self.renewals.append((task.identifier, request.url, {k.lower(): v for k, v in request.headers.items()}))
        return self.renew(request)


def journal_codes(session: bg.Session, record_type: str = "backoff") -> list[int]:
    """The ``code`` of each *record_type* record in the session's journal (read as a file)."""
    path = os.path.join(session.configuration.directory, "journal.jsonl")
    with open(path, "rb") as f:
        lines = [json.loads(line) for line in f if line.endswith(b"\n")]
    return [line.get("code") for line in lines if line.get("t") == record_type]


def kill_daemon(directory: str) -> None:
    """SIGKILL the session's daemon and wait for it to be gone."""
    daemon = read_pid_file(directory)
    assert daemon is not None and daemon.kill()


# ---------------------------------------------------------------------------
# waiting for connectivity: the decisions
# ---------------------------------------------------------------------------

OFFLINE = bg._Interrupted(bg.ErrorCode.CANNOT_CONNECT_TO_HOST, "connection refused", offline=True)


def test_waiting_for_connectivity_consumes_no_retry_and_is_capped_at_30_s():
    """Offline attempts wait 0.5, 1, 2 ... capped at 30 s, for ever (only timeout_for_resource ends them), and
    leave Retry untouched; a session that does not wait spends its Retry budget instead."""
    retry, waiting, delays = bg.Retry(), 0, []
    for n in range(1, 500):
        plan = bg.plan_retry(retry, OFFLINE, waiting, waits_for_connectivity=True, fails_on_unknown_host=False,
                             rng=lambda: 0.0)
        assert plan.delay is not None and plan.retry is retry and plan.waiting == n
        waiting = plan.waiting
        delays.append(plan.delay)
    assert delays[:8] == [0.5, 1, 2, 4, 8, 16, 30, 30] and max(delays) == bg.CONNECTIVITY_BACKOFF_MAX
    plans, waiting = [], 0
    for _ in range(12):
        plans.append(bg.plan_retry(retry, OFFLINE, 0, waits_for_connectivity=False, fails_on_unknown_host=False))
        if plans[-1].delay is None:
            break
        retry = plans[-1].retry
    assert len(plans) == bg.DEFAULT_RETRY_TOTAL + 1 and plans[-1].why == "retries exhausted"


def test_a_server_error_keeps_using_retry_while_waiting_is_on():
    """A response that went wrong (a 503, a cut body) is not a lack of connectivity: Retry decides (and the count of
    a waiting period stands: only a response ends it)."""
    bad = bg._Interrupted(bg.ErrorCode.BAD_SERVER_RESPONSE, "HTTP 503")
    plan = bg.plan_retry(bg.Retry(total=1), bad, 3, waits_for_connectivity=True, fails_on_unknown_host=False)
    assert plan.waiting == 3 and plan.retry.attempts == 1
    assert bg.plan_retry(plan.retry, bad, 0, waits_for_connectivity=True, fails_on_unknown_host=False).delay is None


@pytest.mark.parametrize("err, code", [
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), bg.ErrorCode.CANNOT_FIND_HOST),
    (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), bg.ErrorCode.DNS_LOOKUP_FAILED),
    (ConnectionRefusedError(111, "Connection refused"), bg.ErrorCode.CANNOT_CONNECT_TO_HOST),
    (OSError(101, "Network is unreachable"), bg.ErrorCode.NOT_CONNECTED_TO_INTERNET),
    (OSError(113, "No route to host"), bg.ErrorCode.CANNOT_CONNECT_TO_HOST),
    (socket.timeout("timed out"), bg.ErrorCode.TIMED_OUT),
], ids=["no-such-name", "no-resolver", "refused", "no-network", "no-route", "connect-timeout"])
def test_every_failure_to_reach_a_server_is_offline(err, code):
    """What a failed connect means: each is offline (the task waits), with the code it reports."""
    outcome = bg.connect_failure(err, "example.com:443")
    assert outcome.offline and outcome.code is code and outcome.message.startswith("example.com:443: ")


def test_fails_on_unknown_host_fails_at_once_only_for_a_name_that_does_not_exist():
    """fails_on_unknown_host ends the task at the first "no such name"; other offline failures still wait."""
    unknown = bg.connect_failure(socket.gaierror(socket.EAI_NONAME, "unknown"), "gone.invalid:80")
    plan = bg.plan_retry(bg.Retry(), unknown, 0, waits_for_connectivity=True, fails_on_unknown_host=True)
    assert plan.delay is None and plan.why == "fails_on_unknown_host"
    assert bg.plan_retry(bg.Retry(), OFFLINE, 0, waits_for_connectivity=True, fails_on_unknown_host=True).waiting == 1
    assert bg.plan_retry(bg.Retry(), unknown, 0, waits_for_connectivity=True, fails_on_unknown_host=False).waiting


def test_background_sessions_wait_for_connectivity_and_default_ones_do_not(tmp_path):
    """waits_for_connectivity defaults as on iOS: True for background configurations, False for default()."""
    assert bg.Configuration.background("test.w", directory=str(tmp_path / "w")).waits_for_connectivity
    assert not bg.Configuration.default().waits_for_connectivity
    with pytest.raises(bg.InvalidArgumentError):
        bg.Configuration.default(waits_for_connectivity="yes")


# ---------------------------------------------------------------------------
# waiting for connectivity: sessions
# ---------------------------------------------------------------------------


def test_server_down_longer_than_the_retry_budget_then_back(server, sessions):
    """The server goes away mid-download for longer than the whole Retry budget: the task waits (RUNNING,
    waiting, with the last error), the waiting hook fires once, and when the server is back the download
    resumes with Range and is byte-exact."""
    data = fs.blob_bytes(3 * MiB, seed=131)
    server.add_blob("/w.bin", data, default_fault=fs.Fault(throttle=2 * MiB))  # 1.5 s: the stop lands mid-body
    rec = Net()
    budget = bg.Retry(total=3, backoff_factor=0.01, backoff_max=0.05)
    s = sessions.open(rec, retry=budget)
    task = download(s, server.url("/w.bin"))
    wait_until(received(task, 200_000), what="the first 200,000 bytes")
    server.stop()  # cuts the response: the server is gone
    refused = int(bg.ErrorCode.CANNOT_CONNECT_TO_HOST)
    wait_until(lambda: journal_codes(s).count(refused) > 3 * (budget.total + 1),
               what="three times the attempts Retry allows, all refused")
    assert rec.waited.wait(LONG)
    assert task.state is bg.TaskState.RUNNING and task.is_waiting_for_connectivity
    assert task.last_attempt_error.code is bg.ErrorCode.CANNOT_CONNECT_TO_HOST
    server.start()  # same port
    assert s.wait(LONG)
    assert rec.errors[task.identifier] is None and sha(rec.files[task.identifier]) == sha(data)
    assert rec.waiting == [task.identifier]  # once for the whole waiting period
    assert int(server.requests("/w.bin")[-1].header("range")[6:-1]) >= 200_000
    assert not task.is_waiting_for_connectivity


def test_waiting_outlasts_the_default_retry_budget_in_virtual_time(server, tmp_path):
    """With the default Retry (about 4 minutes of attempts) the task waits on, 30 s apart at most; virtual time."""
    data = fs.blob_bytes(100_000, seed=132)
    server.add_blob("/v.bin", data)
    server.stop()
    clock, rec = FakeClock(), Net()
    cfg = bg.Configuration.background("test.v", directory=str(tmp_path / "v"), host="inprocess")
    s = bg.Session(cfg, rec, _clock=clock)
    try:
        began = clock.monotonic()
        task = download(s, server.url("/v.bin"))
        budget = sum(bg.Retry().backoff_factor * 2 ** n if n < 7 else bg.DEFAULT_BACKOFF_MAX for n in range(10))
        wait_until(lambda: clock.monotonic() - began > 2 * budget, what="twice the default Retry budget")
        assert task.state is bg.TaskState.RUNNING and rec.waiting == [task.identifier]
        assert max(clock.waits) <= bg.CONNECTIVITY_BACKOFF_MAX
        server.start()
        assert s.wait(LONG)
    finally:
        s.close()
    assert sha(rec.files[task.identifier]) == sha(data)


def test_timeout_for_resource_ends_the_wait_with_the_last_error(server, tmp_path):
    """A server that never comes back: the task waits until timeout_for_resource, then fails TIMED_OUT, saying why
    it waited (virtual time)."""
    server.stop()
    clock, rec = FakeClock(), Net()
    cfg = bg.Configuration.background("test.t", directory=str(tmp_path / "t"), host="inprocess",
                                      timeout_for_resource=600.0)
    s = bg.Session(cfg, rec, _clock=clock)
    try:
        task = download(s, server.url("/gone.bin"))
        assert s.wait(LONG)
    finally:
        s.close()
    err = rec.errors[task.identifier]
    assert err.code is bg.ErrorCode.TIMED_OUT and "connection refused" in err.message
    assert rec.waiting == [task.identifier] and max(clock.waits) <= bg.CONNECTIVITY_BACKOFF_MAX


@pytest.mark.parametrize("fails", [False, True], ids=["waits", "fails-fast"])
def test_a_name_that_does_not_exist_waits_unless_told_to_fail_fast(inproc, monkeypatch, fails):
    """A host name the resolver says does not exist waits like no network at all (VPN names, captive portals and
    offline resolvers answer so too); fails_on_unknown_host=True fails it at once with CANNOT_FIND_HOST."""
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        if host == "gone.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    rec = Net()
    s = inproc.open(rec, fails_on_unknown_host=fails)
    task = download(s, "http://gone.invalid/photo.jpg")
    if fails:
        assert s.wait(LONG)
        assert rec.errors[task.identifier].code is bg.ErrorCode.CANNOT_FIND_HOST and rec.waiting == []
        assert journal_codes(s) == []  # no second attempt
    else:
        assert rec.waited.wait(LONG)
        assert task.state is bg.TaskState.RUNNING
        assert task.last_attempt_error.code is bg.ErrorCode.CANNOT_FIND_HOST
        task.cancel()
        assert s.wait(LONG)


# ---------------------------------------------------------------------------
# proxies: the rules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("host, port, no_proxy, bypass", [
    ("example.com", 80, ["example.com"], True),
    ("www.example.com", 80, [".example.com"], True),
    ("www.example.com", 80, ["example.com"], True),
    ("badexample.com", 80, ["example.com"], False),
    ("example.com", 8080, ["example.com:8080"], True),
    ("example.com", 80, ["example.com:8080"], False),
    ("EXAMPLE.com", 80, ["example.COM"], True),
    ("10.1.2.3", 80, ["10.1.2.3"], True),
    ("10.1.2.3", 80, ["10.0.0.0/8"], False),
    ("anything", 80, ["*"], True),
    ("example.com", 80, [], False),
])
def test_no_proxy_follows_urllib(host, port, no_proxy, bypass):
    """no_proxy as urllib reads it: exact names, domain suffixes (leading dot optional), host:port, '*'; no CIDR."""
    assert bg.bypasses_proxy(host, port, no_proxy) is bypass
    assert urllib.request.proxy_bypass_environment(f"{host}:{port}", {"no": ",".join(no_proxy)}) == bypass


@pytest.mark.parametrize("environ", [
    {"http_proxy": "http://a:1", "HTTP_PROXY": "http://b:2"},
    {"HTTPS_PROXY": "http://b:2", "no_proxy": "x.example"},
    {"HTTP_PROXY": "http://b:2", "http_proxy": ""},
    {"HTTP_PROXY": "http://b:2", "REQUEST_METHOD": "GET"},
    {"all_proxy": "http://c:3", "https_proxy": "http://d:4"},
    {"ALL_PROXY": "socks5://e:5", "https_proxy": "f:6"},
], ids=["lower-wins", "upper", "empty-lower-removes", "httpoxy", "all-is-the-fallback", "socks-ignored"])
def test_environment_proxies_are_read_as_urllib_reads_them(environ):
    """The environment's proxies: urllib's getproxies_environment, then all_proxy where a scheme has none."""
    ours = bg._resolve_proxies("environment", environ)
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.lower() in PROXY_VARIABLES or n == "REQUEST_METHOD"]:
            mp.delenv(name)
        for name, value in environ.items():
            mp.setenv(name, value)
        theirs = urllib.request.getproxies_environment()
    for scheme in ("http", "https"):
        want = theirs.get(scheme) or theirs.get("all")
        if want and want.startswith("socks"):
            want = None
        got = ours and getattr(ours, scheme)
        assert (got and f"{got.host}:{got.port}") == (want and want.split("://")[-1])
    assert (ours.no_proxy if ours else ()) == tuple(filter(None, theirs.get("no", "").split(",")))


@pytest.mark.parametrize("proxies", [{"ftp": "http://p:1"}, {"http": "https://p:1"}, {"http": "socks5://p:1"},
                                     {"http": "http://p:1/path"}, {"http": 3128}, "system", {"no": [1]}])
def test_bad_proxies_are_refused_without_echoing_the_url(proxies):
    """A proxies mapping bgsession cannot use is an InvalidArgumentError (a proxy URL is never repeated: it may
    hold a password)."""
    with pytest.raises(bg.InvalidArgumentError) as info:
        bg.Configuration.default(proxies=proxies)
    assert "p:1" not in str(info.value)


def test_proxy_credentials_stay_out_of_repr_and_messages():
    """A proxy URL's password is in memory only: not in the configuration's repr, not in the proxy's name."""
    config = bg.Configuration.default(proxies={"https": "http://ann:s3cr%40t@proxy.example:3128"})
    proxy = config.proxies.https
    assert (proxy.host, proxy.port, proxy.credential.user, proxy.credential.password) == (
        "proxy.example", 3128, "ann", "s3cr@t")
    assert "s3cr" not in repr(config) and str(proxy) == "proxy proxy.example:3128"


# ---------------------------------------------------------------------------
# proxies: sessions, through fake_server's proxy and a real tinyproxy
# ---------------------------------------------------------------------------


class FakeProxy:
    """fake_server in proxy mode, seen like TinyProxy: url(), requests() as request lines, stop/start."""

    def __init__(self) -> None:
        self.server = fs.FakeServer(proxy=True).start()

    def url(self, user=None, password=None) -> str:
        return self.server.proxy_url(user, password)

    def requests(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.server.requests()]

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(params=["fake_server", "tinyproxy"])
def any_proxy(request, tmp_path):
    if request.param == "fake_server":
        proxy = FakeProxy()
        yield proxy
        proxy.stop()
    else:
        yield request.getfixturevalue("tinyproxy")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A server certificate (127.0.0.1, photos.invalid), its pin, and a client certificate whose key is encrypted."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    files = {name: str(d / f"{name}.pem") for name in ("cert", "key", "client", "client_key")}
    password = "key-pass-6d1f0c"
    for cert, key, subject, extra in (("cert", "key", "/CN=127.0.0.1",
                                       ["-nodes", "-addext", "subjectAltName=IP:127.0.0.1,DNS:photos.invalid"]),
                                      ("client", "client_key", "/CN=bgsession-test-client",
                                       ["-passout", f"pass:{password}"])):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-keyout", files[key], "-out", files[cert], "-days", "2", "-subj", subject, *extra],
                       check=True, capture_output=True)
    with open(files["cert"]) as f:
        pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()
    return {**files, "password": password, "pin": pin}


def tls_server(pki, *, client_certificate=False, maximum=None) -> fs.FakeServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    if client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["client"])
    if maximum is not None:
        ctx.maximum_version = maximum
    return fs.FakeServer(tls=ctx).start()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_downloads_and_uploads_go_through_the_proxy(server, sessions, any_proxy, pki, scheme, tmp_path):
    """http in absolute form, https through a CONNECT tunnel: a download and an upload, through the proxy."""
    origin = server if scheme == "http" else tls_server(pki)
    try:
        data = fs.blob_bytes(300_000, seed=133)
        origin.add_blob("/d.bin", data)
        origin.add_upload("/u.bin")
        source = tmp_path / "up.bin"
        source.write_bytes(fs.blob_bytes(120_000, seed=134))
        rec = Recorder()
        rec.expect = 2
        s = sessions.open(rec, proxies={scheme: any_proxy.url()}, tls=bg.TLS(cafile=pki["cert"]))
        task = download(s, origin.url("/d.bin"))
        up = s.upload_task(origin.url("/u.bin"), from_file=str(source))
        up.resume()
        assert s.wait(LONG)
        assert sha(rec.files[task.identifier]) == sha(data)
        assert origin.uploads("/u.bin") == [source.read_bytes()] and up.response.status == 201
        seen = any_proxy.requests()
        authority = f"127.0.0.1:{origin.port}"
        if scheme == "http":
            assert f"GET http://{authority}/d.bin" in " ".join(seen) and f"PUT http://{authority}/u.bin" in " ".join(
                seen)
        else:
            assert any(line.startswith(f"CONNECT {authority}") for line in seen)
    finally:
        if origin is not server:
            origin.stop()


def test_a_resume_goes_through_the_proxy_with_range(server, sessions, any_proxy):
    """A cut response resumes through the proxy with a validated Range request; the file is exact."""
    data = fs.blob_bytes(1 * MiB, seed=135)
    server.add_blob("/r.bin", data, faults=[fs.Fault(cut_after=400_000)])
    rec = Recorder()
    s = sessions.open(rec, proxies={"http": any_proxy.url()})
    task = download(s, server.url("/r.bin"))
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    second = server.requests("/r.bin")[-1]
    assert second.header("range") == "bytes=400000-" and second.header("if-range")
    assert len([line for line in any_proxy.requests() if "/r.bin" in line]) == 2


def test_names_only_the_proxy_resolves_are_reached_through_it(server, sessions):
    """The client never resolves a proxied name itself: a name no DNS knows works through the proxy."""
    proxy = fs.FakeServer(proxy=True).start()
    try:
        proxy.map_host("photos.invalid")
        server.add_blob("/n.bin", size=50_000, seed=136)
        rec = Recorder()
        s = sessions.open(rec, proxies={"http": proxy.proxy_url()})
        task = download(s, f"http://photos.invalid:{server.port}/n.bin")
        assert s.wait(LONG)
        assert len(rec.files[task.identifier]) == 50_000 and rec.errors[task.identifier] is None
    finally:
        proxy.stop()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_407_asks_the_challenge_hook_with_a_proxy_space(server, sessions, pki, scheme):
    """A proxy's 407 (to a request, or to CONNECT) reaches task_did_receive_challenge, marked is_proxy; the
    credential it returns gets the transfer through."""
    origin = server if scheme == "http" else tls_server(pki)
    proxy = fs.FakeServer(proxy=True).start()
    try:
        proxy.proxy_auth = fs.BasicAuth("pat", "proxy-pass-19c2", realm="corp")
        data = fs.blob_bytes(100_000, seed=137)
        origin.add_blob("/p.bin", data)
        rec = Net(lambda ch: (bg.AuthChallengeDisposition.USE_CREDENTIAL, bg.Credential("pat", "proxy-pass-19c2")))
        s = sessions.open(rec, proxies={scheme: proxy.proxy_url()}, tls=bg.TLS(cafile=pki["cert"]))
        task = download(s, origin.url("/p.bin"))
        assert s.wait(LONG)
        assert sha(rec.files[task.identifier]) == sha(data)
        [challenge] = rec.challenges
        space = challenge.protection_space
        assert (space.is_proxy, space.host, space.port, space.realm, space.scheme) == (
            True, "127.0.0.1", proxy.port, "corp", "basic")
        assert challenge.failure_response.status == 407
    finally:
        proxy.stop()
        if origin is not server:
            origin.stop()


def test_a_407_nobody_answers_fails_clearly(server, sessions):
    """A 407 the app does not answer fails the task with USER_AUTHENTICATION_REQUIRED (a proxy's page is not the
    resource)."""
    proxy = fs.FakeServer(proxy=True).start()
    try:
        proxy.proxy_auth = fs.BasicAuth("pat", "pw")
        server.add_blob("/p.bin", size=1000)
        rec = Net()
        s = sessions.open(rec, proxies={"http": proxy.proxy_url()})
        task = download(s, server.url("/p.bin"))
        assert s.wait(LONG)
        assert rec.errors[task.identifier].code is bg.ErrorCode.USER_AUTHENTICATION_REQUIRED
        assert task.identifier not in rec.files
    finally:
        proxy.stop()


def test_the_proxy_url_credential_is_sent_without_asking(server, sessions, tmp_path):
    """Credentials in the proxy URL go to the proxy from the first request (a real tinyproxy with BasicAuth)."""
    if shutil.which("tinyproxy") is None:
        pytest.skip("needs tinyproxy (apt-get install tinyproxy-bin)")
    guarded = TinyProxy(tmp_path, auth=("pat", "proxy-pass-77e1"))
    guarded.start()
    try:
        server.add_blob("/g.bin", size=10_000, seed=138)
        rec = Net()
        s = sessions.open(rec, proxies={"http": guarded.url("pat", "proxy-pass-77e1")})
        task = download(s, server.url("/g.bin"))
        assert s.wait(LONG)
        assert len(rec.files[task.identifier]) == 10_000 and rec.challenges == []
        assert server.requests("/g.bin")[0].header("proxy-authorization") is None  # the proxy keeps it
    finally:
        guarded.stop()


def test_no_proxy_bypasses_the_proxy(server, sessions):
    """A host in no_proxy is reached directly."""
    proxy = fs.FakeServer(proxy=True).start()
    try:
        server.add_blob("/b.bin", size=1000)
        rec = Recorder()
        s = sessions.open(rec, proxies={"http": proxy.proxy_url(), "no": "localhost, 127.0.0.1"})
        download(s, server.url("/b.bin"))
        assert s.wait(LONG)
        assert proxy.requests() == [] and len(server.requests("/b.bin")) == 1
    finally:
        proxy.stop()


def test_the_daemon_uses_the_apps_proxies_not_its_own_environment(server, daemons, monkeypatch):
    """Environment proxies are read when the configuration is made, in the app: the daemon it starts (with the
    environment of that moment) uses the configuration's, whatever its own environment says."""
    proxy = fs.FakeServer(proxy=True).start()
    try:
        server.add_blob("/e.bin", size=20_000, seed=139)
        monkeypatch.setenv("HTTP_PROXY", proxy.proxy_url())
        via_proxy = daemons.config("a")  # proxies="environment": this proxy
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # the daemon is started with this one
        direct = daemons.config("b", proxies=None)
        for config in (via_proxy, direct):
            rec = Recorder()
            s = bg.Session(config, rec)
            daemons.opened.append(s)
            download(s, server.url("/e.bin"))
            assert s.wait(LONG)
            assert rec.errors == {1: None}
        assert len(proxy.requests()) == 1 and len(server.requests("/e.bin")) == 2
    finally:
        proxy.stop()


def test_a_proxy_that_dies_mid_transfer_means_waiting_then_a_resume_through_it(server, sessions):
    """The proxy goes away mid-download: the task waits for connectivity (hook once), and when the proxy is back it
    resumes with Range through it; the file is exact."""
    proxy = fs.FakeServer(proxy=True).start()
    try:
        data = fs.blob_bytes(1 * MiB, seed=140)
        server.add_blob("/x.bin", data)
        hold = server.hold_at("/x.bin", 300_000)
        rec = Net()
        s = sessions.open(rec, proxies={"http": proxy.proxy_url()})
        task = download(s, server.url("/x.bin"))
        assert hold.wait(LONG)
        proxy.stop()  # cuts the relayed response
        hold.release()
        assert rec.waited.wait(LONG)
        assert task.last_attempt_error.code is bg.ErrorCode.CANNOT_CONNECT_TO_HOST
        assert "proxy 127.0.0.1" in task.last_attempt_error.message
        kept = task.count_of_bytes_received  # what came through before the proxy died
        assert kept > 0
        proxy.start()  # same port
        assert s.wait(LONG)
        assert sha(rec.files[task.identifier]) == sha(data) and rec.waiting == [task.identifier]
        assert [r.header("range") for r in proxy.requests()] == [None, f"bytes={kept}-"]
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------
# renewing requests: task_will_begin_delayed_request
# ---------------------------------------------------------------------------


def test_an_expired_presigned_url_is_renewed_through_the_hook(server, sessions):
    """A presigned URL starts answering 403 mid-download: the hook gives a freshly signed URL, and the download goes
    on from where it was (Range + If-Range); the file is exact."""
    data = fs.blob_bytes(1 * MiB, seed=141)
    signer = fs.SignedURLs()
    server.add_blob("/photo.jpg", data, auth=signer, faults=[fs.Fault(cut_after=300_000)])
    server.on_bytes("/photo.jpg", 300_000, lambda path, served: signer.expire())
    rec = Renewer(lambda request: (D.USE_NEW_REQUEST, bg.Request(signer.sign(server.url("/photo.jpg")))))
    s = sessions.open(rec)
    task = download(s, signer.sign(server.url("/photo.jpg")))
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data) and rec.statuses[task.identifier] == 200
    assert len(rec.renewals) == 1
    answers = [(r.status, r.header("range")) for r in server.requests("/photo.jpg")]
    assert answers == [(200, None), (403, "bytes=300000-"), (206, "bytes=300000-")]
    assert server.requests("/photo.jpg")[-1].header("if-range")
    assert task.current_request.url != task.original_request.url


def test_a_delayed_task_asks_the_hook_as_it_begins(server, sessions):
    """A task with an earliest begin date asks task_will_begin_delayed_request when its date comes, before its first
    request (iOS's own case): the presigned URL it was made with has expired meanwhile, the hook gives a fresh one,
    and the server sees only that one."""
    signer = fs.SignedURLs()
    data = fs.blob_bytes(50_000, seed=146)
    server.add_blob("/later.jpg", data, auth=signer)
    made_with = signer.sign(server.url("/later.jpg"))
    signer.expire()
    rec = Renewer(lambda request: (D.USE_NEW_REQUEST, bg.Request(signer.sign(server.url("/later.jpg")))))
    s = sessions.open(rec)
    task = s.download_task(bg.Request(made_with, earliest_begin_date=time.time() + 0.5))
    task.resume()
    assert s.wait(LONG)
    assert sha(rec.files[task.identifier]) == sha(data)
    assert [url for _, url, _ in rec.renewals] == [made_with]
    assert [r.status for r in server.requests("/later.jpg")] == [200]


@pytest.mark.parametrize("delegate", ["continues", "has no hook"])
def test_a_403_that_is_not_renewed_is_the_result(server, sessions, delegate):
    """CONTINUE_LOADING (or a delegate without the hook, which is never asked) keeps the 403 as the response."""
    server.add_blob("/f.jpg", size=1000, auth=fs.SignedURLs())
    rec = Renewer(lambda request: (D.CONTINUE_LOADING, None)) if delegate == "continues" else Net()
    s = sessions.open(rec)
    task = download(s, server.url("/f.jpg"))
    assert s.wait(LONG)
    assert rec.statuses[task.identifier] == 403 and rec.errors[task.identifier] is None
    assert len(getattr(rec, "renewals", [])) == (1 if delegate == "continues" else 0)


def test_cancel_from_the_hook_ends_the_task_cancelled(server, sessions):
    """CANCEL ends the task with CANCELLED."""
    server.add_blob("/c.jpg", size=1000, auth=fs.BearerAuth("t"))
    rec = Renewer(lambda request: (D.CANCEL, None))
    s = sessions.open(rec)
    task = download(s, server.url("/c.jpg"))
    assert s.wait(LONG)
    assert rec.errors[task.identifier].code is bg.ErrorCode.CANCELLED


def test_a_relaunch_asks_for_the_secret_headers_before_sending(server, inproc):
    """In-process: the app that held a request's token exits; at the next launch the hook is asked before any
    request goes, and the new token (rotated meanwhile) is sent; no request ever goes without one."""
    data = fs.blob_bytes(1 * MiB, seed=142)
    auth = fs.BearerAuth("tok-first-5c1b")
    server.add_blob("/private.bin", data, auth=auth)
    hold = server.hold_at("/private.bin", 300_000)
    s = inproc.open(Recorder())
    download(s, bg.Request(server.url("/private.bin"), headers={"Authorization": "Bearer tok-first-5c1b"}))
    assert hold.wait(LONG)
    inproc.close_all()  # the app exits; its token lived in its memory only
    hold.release()
    auth.token = "tok-second-8e2a"
    rec = Renewer(lambda request: (D.USE_NEW_REQUEST, bg.Request(request.url, headers={
        "Authorization": "Bearer tok-second-8e2a"})))
    s2 = inproc.open(rec)
    assert s2.wait(LONG)
    [(tid, url, headers)] = rec.renewals
    assert url == server.url("/private.bin") and "authorization" not in headers
    assert sha(rec.files[tid]) == sha(data)
    assert [r.header("authorization") for r in server.requests("/private.bin")] == [
        "Bearer tok-first-5c1b", "Bearer tok-second-8e2a"]


RENEW_APP = textwrap.dedent('''
    import hashlib, json, os, sys, threading
    sys.path.insert(0, {here!r})
    import bgsession as bg

    directory, ledger_path, token_file, url = sys.argv[1:5]
    background = os.environ.get(bg.BACKGROUND_EVENTS_ENV)

    class Ledger:
        @staticmethod
        def append(**record):
            record.update(pid=os.getpid(), background=bool(background))
            fd = os.open(ledger_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, json.dumps(record).encode() + b"\\n")
                os.fsync(fd)
            finally:
                os.close(fd)

    ledger = Ledger()
    ledger.append(event="launch")

    def token():
        with open(token_file) as f:
            return f.read().strip()

    done = threading.Event()

    class App(bg.SessionDelegate):
        def task_will_begin_delayed_request(self, session, task, request):
            ledger.append(event="renew", id=task.identifier, had_token="Authorization" in request.headers)
            return (bg.DelayedRequestDisposition.USE_NEW_REQUEST,
                    bg.Request(request.url, headers={{"Authorization": "Bearer " + token()}}))

        def download_task_did_finish_downloading(self, session, task, location):
            with open(location, "rb") as f:
                ledger.append(event="finish", sha=hashlib.sha256(f.read()).hexdigest())

        def task_did_complete(self, session, task, error):
            ledger.append(event="complete", error=str(error) if error else None)

        def did_finish_events_for_background_session(self, session):
            ledger.append(event="handler")
            done.set()

    session = bg.Session(bg.Configuration.background(
        "test.renew", directory=directory, host="daemon", daemon_idle_timeout=1.0,
        relaunch_command=[sys.executable, os.path.abspath(__file__), directory, ledger_path, token_file, "-"],
        retry=bg.Retry(backoff_factor=0.01, backoff_max=0.05)), App())
    if url != "-":
        session.download_task(bg.Request(url, headers={{"Authorization": "Bearer " + token()}})).resume()
        ledger.append(event="resumed")
        threading.Event().wait()  # the foreground app lives until the test kills it
    if background:
        done.wait(60)
        session.wait(60)
    session.close()
    ledger.append(event="exit")
''')


def scan(directory: str, *secrets: str) -> list[str]:
    """Files under *directory* that contain any of *secrets* (bytes, as written)."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    content = f.read()
            except OSError:
                continue  # a socket
            found += [f"{path}: {secret}" for secret in secrets if secret.encode() in content]
    return found


def test_after_a_daemon_sigkill_a_bearer_request_is_renewed_by_a_relaunched_app(server, tmp_path):
    """The app that made a Bearer-token request is gone and its daemon is SIGKILLed mid-download; the next daemon
    (started by an app that never attaches) relaunches the app for task_will_begin_delayed_request, which gives the
    token (rotated meanwhile). The server never sees a request without a token; no token is on disk."""
    first, second = "tok-first-2d9e", "tok-second-a41f"
    data = fs.blob_bytes(2 * MiB, seed=143)
    auth = fs.BearerAuth(first)
    server.add_blob("/b.bin", data, auth=auth, default_fault=fs.Fault(throttle=8 * MiB))
    hold = server.hold_at("/b.bin", 500_000)
    script, directory = tmp_path / "app.py", str(tmp_path / "session")
    script.write_text(RENEW_APP.format(here=HERE))
    ledger, token_file = Ledger(str(tmp_path / "ledger.jsonl")), tmp_path / "token"
    token_file.write_text(first)
    argv = [sys.executable, str(script), directory, ledger.path, str(token_file)]
    env = {k: v for k, v in os.environ.items() if k != bg.BACKGROUND_EVENTS_ENV}
    app = subprocess.Popen(argv + [server.url("/b.bin")], env=env)
    try:
        wait_until(lambda: any(e["event"] == "resumed" for e in ledger.read()), what="resume() to return")
        assert hold.wait(LONG)
        app.kill()
        app.wait()
        kill_daemon(directory)
        token_file.write_text(second)
        auth.token = second  # rotated: the first token stops working
        hold.release()
        config = bg.Configuration.background(  # the app's own configuration (its relaunch command)
            "test.renew", directory=directory, host="daemon", daemon_idle_timeout=1.0,
            relaunch_command=[*argv, "-"], retry=bg.Retry(backoff_factor=0.01, backoff_max=0.05))
        starter = bg.Session(config, None, _deferred=True)  # starts a daemon, never attaches
        starter.close()  # the daemon, alone with a question, relaunches the app
        wait_until(lambda: any(e["event"] == "exit" for e in ledger.read()), what="the relaunched app to finish")
        entries = ledger.read()
        renewals = [e for e in entries if e["event"] == "renew"]
        assert [(e["background"], e["had_token"]) for e in renewals] == [(True, False)]
        assert [e["sha"] for e in entries if e["event"] == "finish"] == [sha(data)]
        tokens = [r.header("authorization") for r in server.requests("/b.bin")]
        assert tokens[0] == f"Bearer {first}" and set(tokens[1:]) == {f"Bearer {second}"}
        assert int(server.requests("/b.bin")[-1].header("range")[6:-1]) > 0  # resumed, not restarted
        assert scan(directory, first, second) == []
    finally:
        if app.poll() is None:
            app.kill()
        app.wait()
        stop_daemon(directory)


# ---------------------------------------------------------------------------
# secrets by origin
# ---------------------------------------------------------------------------


def test_a_redirect_to_another_origin_drops_configuration_secret_headers(server, sessions):
    """Configuration(headers=...) secrets (Authorization, Cookie) follow the same-origin rule of Request secrets."""
    other = fs.FakeServer().start()
    try:
        other.add_blob("/there.bin", size=1000)
        server.add_redirect("/here.bin", other.url("/there.bin"))
        rec = Recorder()
        s = sessions.open(rec, headers={"Authorization": "Bearer conf-7a", "Cookie": "id=conf", "X-Trace": "t1"})
        task = download(s, server.url("/here.bin"))
        assert s.wait(LONG)
        assert len(rec.files[task.identifier]) == 1000
        asked, moved = server.requests("/here.bin")[0], other.requests("/there.bin")[0]
        assert (asked.header("authorization"), asked.header("cookie"), asked.header("x-trace")) == (
            "Bearer conf-7a", "id=conf", "t1")
        assert (moved.header("authorization"), moved.header("cookie"), moved.header("x-trace")) == (None, None, "t1")
    finally:
        other.stop()


# ---------------------------------------------------------------------------
# TLS with the daemon
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_certificate", [True, False], ids=["certificate", "none"])
def test_a_client_certificate_works_on_both_hosts(pki, sessions, with_certificate):
    """A server that requires a client certificate: TLS(certfile, keyfile, key_password) gets the file, on the
    daemon host too; without one the task fails."""
    origin = tls_server(pki, client_certificate=True)
    try:
        data = fs.blob_bytes(200_000, seed=144)
        origin.add_blob("/c.bin", data)
        tls = bg.TLS(cafile=pki["cert"], certfile=pki["client"], keyfile=pki["client_key"],
                     key_password=pki["password"]) if with_certificate else bg.TLS(cafile=pki["cert"])
        rec = Recorder()
        s = sessions.open(rec, tls=tls, retry=bg.Retry(total=1, backoff_factor=0.01))
        task = download(s, origin.url("/c.bin"))
        assert s.wait(LONG)
        if with_certificate:
            assert sha(rec.files[task.identifier]) == sha(data)
        else:
            assert rec.errors[task.identifier] is not None and task.identifier not in rec.files
    finally:
        origin.stop()


@pytest.mark.parametrize("minimum", [None, "TLSv1.3"])
def test_a_minimum_version_reaches_the_daemon(pki, sessions, minimum):
    """TLS(minimum_version="TLSv1.3") refuses a TLS 1.2 server on both hosts (SECURE_CONNECTION_FAILED)."""
    origin = tls_server(pki, maximum=ssl.TLSVersion.TLSv1_2)
    try:
        origin.add_blob("/m.bin", size=1000)
        rec = Recorder()
        s = sessions.open(rec, tls=bg.TLS(cafile=pki["cert"], minimum_version=minimum))
        task = download(s, origin.url("/m.bin"))
        assert s.wait(LONG)
        if minimum is None:
            assert len(rec.files[task.identifier]) == 1000
        else:
            assert rec.errors[task.identifier].code is bg.ErrorCode.SECURE_CONNECTION_FAILED
    finally:
        origin.stop()


@pytest.mark.parametrize("right", [True, False], ids=["right-pin", "wrong-pin"])
def test_pinning_compares_the_sha256_of_the_servers_certificate(pki, sessions, right):
    """The pinned SHA-256 of the server's DER certificate lets the download through; another fails it with a clear
    SERVER_CERTIFICATE_UNTRUSTED."""
    origin = tls_server(pki)
    try:
        origin.add_blob("/pin.bin", size=1000)
        pin = pki["pin"] if right else "ab" * 32
        rec = Recorder()
        s = sessions.open(rec, tls=bg.TLS(cafile=pki["cert"], pinned_certificates_sha256=[pin]))
        task = download(s, origin.url("/pin.bin"))
        assert s.wait(LONG)
        if right:
            assert len(rec.files[task.identifier]) == 1000
        else:
            err = rec.errors[task.identifier]
            assert err.code is bg.ErrorCode.SERVER_CERTIFICATE_UNTRUSTED and "pinned" in err.message
            assert pki["pin"] in err.message and task.identifier not in rec.files
    finally:
        origin.stop()


def test_an_ssl_context_is_refused_with_the_daemon_host(daemons, pki):
    """An ssl.SSLContext cannot reach the daemon whole: Session() refuses it with a clear error, nothing is started."""
    config = daemons.config(ssl_context=ssl.create_default_context(cafile=pki["cert"]))
    with pytest.raises(bg.InvalidArgumentError, match=r"tls=bgsession\.TLS"):
        bg.Session(config)
    assert read_pid_file(config.directory) is None


@pytest.mark.parametrize("kwargs", [{"keyfile": "/k.pem"}, {"minimum_version": "SSLv3"},
                                    {"pinned_certificates_sha256": "ab" * 32},
                                    {"pinned_certificates_sha256": ["xyz"]}, {"cafile": 3}, {"key_password": b"pw"}])
def test_bad_tls_values_are_refused(kwargs):
    """TLS(...) checks its fields when it is made."""
    with pytest.raises(bg.InvalidArgumentError):
        bg.TLS(**kwargs)


def test_a_wrong_key_password_is_a_clear_error_at_session(pki, sessions):
    """A client key that cannot be loaded (wrong password) fails Session(), not every task later."""
    tls = bg.TLS(certfile=pki["client"], keyfile=pki["client_key"], key_password="wrong")
    with pytest.raises(bg.InvalidArgumentError, match="TLS"):
        sessions.open(Recorder(), tls=tls)
    with pytest.raises(bg.InvalidArgumentError):
        bg.Configuration.default(tls=tls, ssl_context=ssl.create_default_context())


def test_no_secret_reaches_the_session_directory(pki, sessions):
    """A Bearer token, a proxy password (the proxy URL's) and a client key's password, and the pins, used through a
    CONNECT tunnel with a cut and a resume: none of them is in any file under the session directory."""
    origin = tls_server(pki, client_certificate=True)
    proxy = fs.FakeServer(proxy=True).start()
    try:
        token, proxy_password = "tok-scan-4e8b", "proxy-pass-scan-0b3d"
        proxy.proxy_auth = fs.BasicAuth("pat", proxy_password)
        data = fs.blob_bytes(600_000, seed=145)
        origin.add_blob("/s.bin", data, auth=fs.BearerAuth(token), faults=[fs.Fault(cut_after=200_000)])
        tls = bg.TLS(cafile=pki["cert"], certfile=pki["client"], keyfile=pki["client_key"],
                     key_password=pki["password"], pinned_certificates_sha256=[pki["pin"]])
        rec = Recorder()
        s = sessions.open(rec, tls=tls, proxies={"https": proxy.proxy_url("pat", proxy_password)})
        task = download(s, bg.Request(origin.url("/s.bin"), headers={"Authorization": f"Bearer {token}"}))
        assert s.wait(LONG)
        assert sha(rec.files[task.identifier]) == sha(data)
        sessions.close_all()
        assert scan(s.configuration.directory, token, proxy_password, pki["password"], pki["pin"]) == []
    finally:
        proxy.stop()
        origin.stop()


def test_task_info_from_a_newer_daemon_keeps_the_fields_it_knows():
    """A TaskInfo with fields this module does not know (a newer daemon's) is read, those fields left out."""
    info = bg.TaskInfo(1, "download", None, bg.Phase.WAITING_RETRY, {"url": "http://x/"}, "http://x/", waiting=True,
                       last_error={"code": -1004, "message": "refused"}, next_retry=5.0)
    assert bg.TaskInfo.from_wire({**info.to_wire(), "from_the_future": 1}) == info


class _DrippingHandshake:
    """A TLS server that never finishes its handshake: it announces a 16 KiB handshake record, then sends it a byte
    every 0.2 s, each well within any read timeout. Counts the connections it accepts."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(bytes([0x16, 0x03, 0x03, 0x40, 0x00]))  # a handshake record of 16,384 bytes follows
                while not self.stopping.wait(0.2):  # the pace of the drip, not a synchronisation
                    conn.sendall(b"\x00")
            except OSError:
                return  # the client gave up

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()


def test_a_tls_handshake_dripped_a_byte_at_a_time_ends_within_timeout_for_request(pki, sessions):
    """Each byte of the dripped handshake comes well within timeout_for_request, so a bound per read never fires;
    the handshake as a whole is bounded: each attempt ends, the retry comes, and the task fails with the reason."""
    server = _DrippingHandshake()
    try:
        rec = Recorder()
        s = sessions.open(rec, tls=bg.TLS(cafile=pki["cert"]), timeout_for_request=1.0,
                          retry=bg.Retry(total=1, backoff_factor=0.01))
        task = download(s, f"https://127.0.0.1:{server.port}/drip.bin")
        assert s.wait(LONG), "an attempt outlived its handshake bound"
        error = rec.errors[task.identifier]
        assert error is not None and "TLS handshake" in error.message, error
        assert server.connections == 2  # the attempt and its one retry
    finally:
        server.stop()


class _HeadersWithTheFirstBytes:
    """An HTTP server whose first answer sends its headers and the first 1,000 bytes of the body in one write, then
    holds until the test cuts the connection with a reset; a second request gets the rest (206)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.cut, self.requests = data, threading.Event(), []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for number in range(2):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(4096)
                self.requests.append(head.decode("latin-1"))
                fields = b"ETag: \"v1\"\r\nAccept-Ranges: bytes\r\n"
                if number == 0:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: %d\r\n\r\n" % len(self.data)
                                 + self.data[:1000])
                    self.cut.wait(LONG)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                else:  # (a reset: the client's read fails, it does not see an end)
                    rest = self.data[1000:]
                    conn.sendall(b"HTTP/1.1 206 Partial Content\r\n" + fields + b"Content-Range: bytes 1000-%d/%d\r\n"
                                 b"Content-Length: %d\r\n\r\n" % (len(self.data) - 1, len(self.data), len(rest)) + rest)

    def stop(self) -> None:
        self.cut.set()
        self.listener.close()


def test_bytes_that_come_with_the_headers_are_written_at_once_and_never_fetched_again(sessions):
    """The first body bytes can arrive in the same packet as the headers, and wait in the response reader's buffer: a
    link that stalls right after must not keep them from the disk and the progress hook until it moves again, and a
    reset must not lose them (found: a quarter of stalled downloads showed 0 bytes; the retry fetched them again)."""
    data = fs.blob_bytes(100_000, seed=5)
    server = _HeadersWithTheFirstBytes(data)
    try:
        rec = Recorder()
        s = sessions.open(rec, timeout_for_request=LONG)
        task = download(s, f"http://127.0.0.1:{server.port}/first.bin")
        wait_until(lambda: task.count_of_bytes_received == 1000, timeout=SHORT, what="the bytes sent with the headers")
        server.cut.set()
        assert s.wait(LONG)
        assert rec.errors[task.identifier] is None and sha(rec.files[task.identifier]) == sha(data)
        assert "range: bytes=1000-" in server.requests[1].lower()
    finally:
        server.stop()
