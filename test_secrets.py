"""Secrets at rest: one scan of every place bgsession writes, for every source of a secret.

Sources: request headers (``Authorization``, ``Cookie``, ``Proxy-Authorization``), headers marked secret (by the
``Request`` and by the ``Configuration``), the configuration's own headers, a URL's ``user:password@`` (also one a
redirect hands over), credentials a challenge hook answers with, response cookies and response headers marked
secret. Places: the session directory (journal, snapshot, damaged copies, ``tmp/``, ``daemon.log``, every file
*name*), resume data, ``bgsession status --json``, and the command-line tool's own session and output.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys

import bgsession as bg
import fake_server as fs
from testkit import *
from testkit import HERE, LONG, MiB, Recorder, download, received, sha, stop_daemon, wait_until

BGSESSION = os.path.join(HERE, "bgsession.py")


def _secret(name: str) -> str:
    return f"{name}{secrets.token_hex(10)}"  # letters and digits: the same percent-encoded


#: Where proxy credentials join the scan once proxies exist (issue 13): add the proxy URL's password (and the
#: ``Proxy-Authorization`` value bgsession builds from it) here, and route the scanned session through the proxy.
PROXY_SECRETS: list[str] = []


class Secrets:
    """Every secret of the scenario, and the forms a leak could take (raw, in a Basic header, percent-encoded)."""

    def __init__(self) -> None:
        self.authorization = _secret("authorization")
        self.cookie = _secret("cookie")
        self.proxy_authorization = _secret("proxyauth")
        self.request_marked = _secret("requestmarked")
        self.config_marked = _secret("configmarked")
        self.config_header = _secret("configheader")
        self.userinfo = _secret("userinfo")
        self.redirect_userinfo = _secret("redirectuserinfo")
        self.challenge = _secret("challenge")
        self.set_cookie = _secret("setcookie")
        self.response_marked = _secret("responsemarked")
        self.cli_userinfo = _secret("cliuserinfo")

    def needles(self) -> dict[str, bytes]:
        values = {name: value for name, value in vars(self).items()}
        values.update({f"proxy{i}": value for i, value in enumerate(PROXY_SECRETS)})
        forms = {name: value.encode() for name, value in values.items()}
        for user, password in (("alice", self.userinfo), ("bob", self.redirect_userinfo), ("carol", self.challenge),
                               ("dave", self.cli_userinfo)):
            forms[f"basic {user}"] = base64.b64encode(f"{user}:{password}".encode())
        return forms


def _scan(where: str, data: bytes, needles: dict[str, bytes]) -> list[str]:
    return [f"{where}: {name}" for name, needle in needles.items() if needle in data]


def _scan_tree(root: str, needles: dict[str, bytes]) -> list[str]:
    """Every file's name and bytes under *root* (sockets and other non-files by name only)."""
    found: list[str] = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found += _scan(f"name {os.path.relpath(path, root)}", os.fsencode(name), needles)
            if name in files and os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    found += _scan(os.path.relpath(path, root), f.read(), needles)
    return found


class Hook(Recorder):
    """Answers challenges with the credential of the realm (memory only: the hook is the source)."""

    def __init__(self, s: Secrets) -> None:
        super().__init__()
        self.credentials = {"alice": bg.Credential("alice", s.userinfo), "carol": bg.Credential("carol", s.challenge)}
        self.challenges: list[str | None] = []

    def task_did_receive_challenge(self, session, task, challenge):
        self.challenges.append(challenge.protection_space.realm)
        cred = self.credentials.get(challenge.protection_space.realm or "")
        if cred is None or challenge.previous_failure_count:
            return bg.AuthChallengeDisposition.CANCEL_AUTHENTICATION_CHALLENGE, None
        return bg.AuthChallengeDisposition.USE_CREDENTIAL, cred


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error", BGSESSION, *args], capture_output=True, text=True,
                          timeout=LONG)


def test_no_secret_reaches_any_file_or_output(server, sessions, tmp_path):
    """No secret, from any source, reaches any file bgsession writes, any file name, resume data, status or the CLI."""
    s = Secrets()
    needles = s.needles()
    cookies = {"Set-Cookie": f"session={s.set_cookie}; HttpOnly", "X-Response-Token": s.response_marked}
    data = fs.blob_bytes(2 * MiB, seed=181)
    for name in ("/suspended.bin", "/cancelled.bin"):
        server.add_blob(name, data, auth=fs.BasicAuth("alice", s.userinfo, realm="alice"), headers=cookies)
    holds = {name: server.hold_at(name, 256 << 10) for name in ("/suspended.bin", "/cancelled.bin")}
    server.add_blob("/cookie.bin", data[:1000], headers=cookies)
    server.add_blob("/digest.bin", data[:2000], auth=fs.DigestAuth("carol", s.challenge, realm="carol"))
    server.add_blob("/bob.bin", data[:3000], auth=fs.BasicAuth("bob", s.redirect_userinfo, realm="bob"))
    server.add_redirect("/to-bob", f"http://bob:{s.redirect_userinfo}@127.0.0.1:{server.port}/bob.bin")
    headers = {"Authorization": f"Bearer {s.authorization}", "Cookie": f"sid={s.cookie}",
               "Proxy-Authorization": f"Basic {s.proxy_authorization}", "X-Api-Key": s.request_marked,
               "X-Config-Token": s.config_marked}

    def request(path: str) -> bg.Request:
        return bg.Request(f"http://alice:{s.userinfo}@127.0.0.1:{server.port}{path}", headers=headers,
                          secret_headers=["X-Api-Key"])

    hook = Hook(s)
    hook.expect = 4
    options = dict(secret_headers=["X-Config-Token", "X-Response-Token"], headers={"X-Static": s.config_header})
    session = sessions.open(hook, **options)
    suspended, cancelled = (session.download_task(request(p)) for p in ("/suspended.bin", "/cancelled.bin"))
    session.resume_all([suspended, cancelled])
    for path in ("/cookie.bin", "/digest.bin", "/to-bob"):
        download(session, server.url(path))
    for task, path in ((suspended, "/suspended.bin"), (cancelled, "/cancelled.bin")):
        assert holds[path].wait(LONG)
        wait_until(received(task, 200 << 10), what=f"{path} on its way")  # (the 401 page counts too)
    suspended.suspend()
    resume_data = cancelled.cancel_producing_resume_data()
    for hold in holds.values():
        hold.release()
    assert resume_data
    assert hook.completed.wait(LONG)  # (the suspended task never completes)
    assert len(hook.files) == 3 and all(hook.errors[i] is None and hook.statuses[i] == 200 for i in hook.files)
    assert sorted(set(hook.challenges)) == ["carol"]  # alice and bob: answered by the URLs' userinfo, not asked
    request_seen = server.requests("/suspended.bin")[-1]
    assert request_seen.header("x-api-key") == s.request_marked  # the secrets were sent, from memory
    assert request_seen.header("x-config-token") == s.config_marked

    resumed = session.download_task_with_resume_data(resume_data)  # the secrets are gone: the hook answers
    resumed.resume()
    wait_until(lambda: [t.identifier for t in session.get_tasks()] == [suspended.identifier],
               what="every task but the suspended one to be delivered")
    assert sha(hook.files[resumed.identifier]) == sha(data) and "alice" in hook.challenges
    directory = session.configuration.directory
    sessions.close_all()
    stop_daemon(directory)
    sessions.open(hook, **options).get_tasks()  # reopened: the journal is folded into a snapshot
    sessions.close_all()
    stop_daemon(directory)
    assert os.path.exists(os.path.join(directory, "snapshot.json"))
    status = _cli("status", "--json", "--session", "test.s", "--state-dir", directory)
    assert status.returncode == 0, status.stderr
    assert [t["state"] for t in json.loads(status.stdout)] == ["suspended"]

    state = str(tmp_path / "cli-state")  # the command-line tool's own session, fed a URL with a password
    server.add_blob("/dave.bin", data[:4000], auth=fs.BasicAuth("dave", s.cli_userinfo),
                    headers={"Set-Cookie": cookies["Set-Cookie"]})  # (the CLI marks no more headers secret)
    out = tmp_path / "out"
    out.mkdir()
    url = f"http://dave:{s.cli_userinfo}@127.0.0.1:{server.port}/dave.bin"
    cli = _cli("download", "--wait", "--state-dir", state, "-d", str(out), url)
    assert cli.returncode == 0, cli.stderr
    assert (out / "dave.bin").read_bytes() == data[:4000]
    cli_status = _cli("status", "--json", "--state-dir", state)
    stop_daemon(state)

    leaks = _scan_tree(directory, needles) + _scan_tree(state, needles) + _scan_tree(str(out), needles)
    leaks += _scan("resume data", resume_data, needles)
    leaks += _scan("status --json", status.stdout.encode() + status.stderr.encode(), needles)
    leaks += _scan("CLI output", (cli.stdout + cli.stderr + cli_status.stdout + cli_status.stderr).encode(), needles)
    assert leaks == []
    if sessions.host == "daemon":  # (the daemon's log was scanned with the directory)
        assert os.path.getsize(os.path.join(directory, "daemon.log")) > 0
