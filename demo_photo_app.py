"""demo_photo_app — the photo-message app of the AFNetworking 2.0 / iOS 7 background-transfer answer, ported.

The seed: an app receives photo messages and downloads each photo with a
background session (a shared ``AFURLSessionManager`` subclass). Its questions were
*"where do I put the completion blocks so they still run after the app was
killed?"* and *"how do I update newPhotoMsg when the download finishes?"*. The
answers, as this file shows them:

* Set the blocks at *session level*, in the manager subclass's ``__init__``
  (``BackgroundSessionManager``), and create that manager in every launch
  (``PhotoApp.did_finish_launching``). Task-level blocks die with the process;
  session-level ones are registered again each time the session is re-created.
* Find the ``PhotoMessage`` from the task itself: its ``description``
  (``"photo:<id>"``) is persisted with the task and survives relaunches.
* Check the HTTP status in the finish block: a 404 page is a finished download
  too; return None to keep no file.
* In a background launch, save the completion handler in
  ``handle_events_for_background_url_session`` and call it from the
  did-finish-events block — exactly once.
* A shared photo's link expires (a presigned URL answering 403) in the middle of
  its download: the delayed-request block asks the messaging service for a fresh
  link, and the download goes on from where it was (``Range`` + ``If-Range``).

``python demo_photo_app.py`` runs the whole story by itself: a fake photo server,
the app launched as a real process, killed with SIGKILL in the middle of a
download, relaunched in the background, and a check of every file by SHA-256.
``python demo_photo_app.py app --state DIR`` is the app itself (the story launches
it that way). Standard library only (plus the project's own modules).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import appdelegate
import bgsession

__version__ = "0.1.0"

#: Where the transfers run when --host is not given. "daemon" once the daemon host is built:
#: this is the one line to change.
DEFAULT_HOST = "daemon"
HOSTS = ("inprocess", "daemon")
#: The session identifier of the app's shared background session.
DEFAULT_IDENTIFIER = "com.example.photos"
#: PhotoMessage states.
DOWNLOADING, FINISHED, FAILED = "downloading", "finished", "failed"
#: Task descriptions the app owns: "photo:<message id>".
DESCRIPTION_PREFIX = "photo:"
#: Seconds the story waits for one app process, and at most how many background launches it makes.
STORY_LAUNCH_TIMEOUT = 120.0
STORY_MAX_BACKGROUND_LAUNCHES = 4
#: Bytes per second of the throttled photo (so the kill lands in the middle of its download).
STORY_THROTTLE = 1 << 20


# ============================================================================
# The app's model: PhotoMessage and its small JSON store
# ============================================================================


@dataclasses.dataclass
class PhotoMessage:
    """A message carrying a photo: ``state`` is downloading, finished or failed."""

    id: str
    url: str
    state: str = DOWNLOADING
    resource_path: str | None = None  # the photo in Documents, once downloaded
    error: str | None = None

    @property
    def name(self) -> str:
        return _name_from_url(self.url)


def _atomic_write_json(path: str, value: Any) -> None:
    """Same-directory temp file (0600) -> write -> fsync -> os.replace -> fsync the directory."""
    directory = os.path.dirname(path)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    data = json.dumps(value, indent=1, sort_keys=True).encode("utf-8") + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the original error matters, not this one
            os.unlink(tmp)
        raise
    if os.name == "posix":
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _append_line(path: str, record: Mapping[str, Any]) -> None:
    """Append one JSON line and fsync it (a log that survives SIGKILL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            return [json.loads(line) for line in f if line.endswith(b"\n")]
    except FileNotFoundError:
        return []


class PhotoStore:
    """The app's PhotoMessages in ``messages.json``, rewritten atomically on every change (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, PhotoMessage]:
        try:
            with open(self.path, "rb") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return {}
        return {m["id"]: PhotoMessage(**m) for m in raw}

    def messages(self) -> list[PhotoMessage]:
        with self._lock:
            return sorted(self._load().values(), key=lambda m: (len(m.id), m.id))

    def get(self, message_id: str) -> PhotoMessage | None:
        with self._lock:
            return self._load().get(message_id)

    def save(self, message: PhotoMessage) -> None:
        with self._lock:
            messages = self._load()
            messages[message.id] = message
            _atomic_write_json(self.path, [dataclasses.asdict(m) for m in messages.values()])


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """Where the app keeps its things: everything lives under ``state``."""

    state: str
    identifier: str = DEFAULT_IDENTIFIER
    host: str = DEFAULT_HOST

    @property
    def session_directory(self) -> str:
        return os.path.join(self.state, "session")

    @property
    def documents(self) -> str:
        return os.path.join(self.state, "Documents")

    @property
    def store_path(self) -> str:
        return os.path.join(self.state, "messages.json")

    @property
    def inbox_path(self) -> str:
        """New messages, dropped here by the messaging service (in the story: by the story)."""
        return os.path.join(self.state, "inbox.json")

    @property
    def account_path(self) -> str:
        """The user's photo-server account (the app's keychain): {"user": ..., "password": ...}."""
        return os.path.join(self.state, "account.json")

    @property
    def launches_path(self) -> str:
        """One JSON line per launch and per completion-handler call (so the story can count them)."""
        return os.path.join(self.state, "launches.jsonl")

    def app_argv(self) -> list[str]:
        """The command that launches this app (the daemon host's relaunch_command)."""
        return [sys.executable, os.path.abspath(__file__), "app", "--state", self.state,
                "--identifier", self.identifier, "--host", self.host]


_say_lock = threading.Lock()


def _say(text: str) -> None:
    """One line of the app's narration (whole lines: hooks and the main thread both talk)."""
    app = appdelegate.shared_application()
    kind = "app, background launch" if app is not None and app.is_background_launch else "app"
    with _say_lock:
        sys.stdout.write(f"      [{kind}] {text}\n")
        sys.stdout.flush()


# ============================================================================
# The shared background session manager (the seed's BackgroundSessionManager)
# ============================================================================


class BackgroundSessionManager(bgsession.SessionManager):
    """The one background session of the app, with its session-level blocks.

    Every block is set in ``__init__``: bgsession delivers no event before the
    whole construction (this ``__init__`` included) has returned, so none is missed.
    """

    _settings: AppSettings | None = None
    _shared: BackgroundSessionManager | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def configure(cls, settings: AppSettings) -> None:
        """Say where the app lives; call once per launch, before :meth:`shared_manager`."""
        cls._settings = settings

    @classmethod
    def shared_manager(cls) -> BackgroundSessionManager:
        """The process-wide manager, created on first use (``+[BackgroundSessionManager sharedManager]``)."""
        with cls._shared_lock:
            if cls._shared is None:
                if cls._settings is None:
                    raise RuntimeError("call BackgroundSessionManager.configure(settings) first")
                cls._shared = cls(cls._settings)
            return cls._shared

    def __init__(self, settings: AppSettings) -> None:
        relaunch = settings.app_argv() if settings.host == "daemon" else None
        configuration = bgsession.Configuration.background(
            settings.identifier, directory=settings.session_directory, host=settings.host,
            relaunch_command=relaunch)
        super().__init__(configuration)
        self.settings = settings
        self.store = PhotoStore(settings.store_path)
        self._handler_lock = threading.Lock()
        self.saved_completion_handler: appdelegate.CompletionHandler | None = None
        self._configure_download_finished()
        self._configure_task_completion()
        self._configure_background_session_finished()
        self._configure_authentication()
        self._configure_expired_links()

    # -- the session-level blocks ------------------------------------------------------------
    def _configure_download_finished(self) -> None:
        documents = self.settings.documents

        def destination(session: bgsession.Session, task: bgsession.DownloadTask, location: str) -> str | None:
            name = _photo_name(task)
            status = task.response.status if task.response is not None else None
            if status != 200:
                _say(f"{name}: HTTP {status}, no file kept")
                return None  # a 404 page is not a photo
            os.makedirs(documents, exist_ok=True)
            path = os.path.join(documents, name)
            message = self.message_for(task)
            if message is not None:
                message.resource_path = path
                self.store.save(message)
            return path  # the manager moves the file there

        self.set_download_task_did_finish_downloading(destination)

    def _configure_task_completion(self) -> None:
        def completed(session: bgsession.Session, task: bgsession.Task,
                      error: bgsession.TransferError | None) -> None:
            message = self.message_for(task)  # the seed's question: "how do I update newPhotoMsg?"
            if message is None:
                return
            status = task.response.status if task.response is not None else None
            if error is not None:
                message.state, message.error = FAILED, str(error)
            elif status != 200:
                message.state, message.error, message.resource_path = FAILED, f"HTTP {status}", None
            else:
                message.state, message.error = FINISHED, None
                if message.resource_path is None:
                    message.resource_path = os.path.join(self.settings.documents, _photo_name(task))
            self.store.save(message)
            _say(f"message {message.id} ({message.name}): {message.state}"
                 + (f" ({message.error})" if message.error else ""))

        self.set_task_did_complete(completed)

    def _configure_background_session_finished(self) -> None:
        def finished_events(session: bgsession.Session) -> None:
            with self._handler_lock:
                handler, self.saved_completion_handler = self.saved_completion_handler, None
            if handler is not None:
                _append_line(self.settings.launches_path, {"event": "completion_handler", "pid": os.getpid()})
                _say("all waiting events delivered: calling the saved completion handler")
                handler()

        self.set_did_finish_events_for_background_session(finished_events)

    def _configure_authentication(self) -> None:
        account = _load_account(self.settings.account_path)

        def challenge(session: bgsession.Session, task: bgsession.Task, challenge: bgsession.AuthChallenge
                      ) -> tuple[bgsession.AuthChallengeDisposition, bgsession.Credential | None]:
            if challenge.previous_failure_count == 0 and account is not None:
                _say(f"{_photo_name(task)}: server asks for a password (realm {challenge.protection_space.realm!r})"
                     f"; answering as {account[0]!r}")
                credential = bgsession.Credential(account[0], account[1], bgsession.CredentialPersistence.FOR_SESSION)
                return bgsession.AuthChallengeDisposition.USE_CREDENTIAL, credential
            return bgsession.AuthChallengeDisposition.CANCEL_AUTHENTICATION_CHALLENGE, None

        self.set_task_did_receive_authentication_challenge(challenge)

    def _configure_expired_links(self) -> None:
        inbox_path = self.settings.inbox_path

        def renew(session: bgsession.Session, task: bgsession.Task, request: bgsession.Request
                  ) -> tuple[bgsession.DelayedRequestDisposition, bgsession.Request | None]:
            """A 403 (or a restart without secrets): ask the messaging service (the inbox) for the message's link
            now; a fresh one replaces the expired one, and the download goes on from where it was."""
            message_id = _message_id(task)
            fresh = {item["id"]: item["url"] for item in _read_inbox(inbox_path)}.get(message_id or "")
            if fresh is None or fresh == request.url:
                return bgsession.DelayedRequestDisposition.CONTINUE_LOADING, None
            _say(f"{_photo_name(task)}: the link expired; the messaging service gave a fresh one")
            return bgsession.DelayedRequestDisposition.USE_NEW_REQUEST, bgsession.Request(fresh)

        self.set_task_will_begin_delayed_request(renew)

    # -- helpers ---------------------------------------------------------------------------------
    def save_completion_handler(self, handler: appdelegate.CompletionHandler) -> None:
        with self._handler_lock:
            self.saved_completion_handler = handler

    def message_for(self, task: bgsession.Task) -> PhotoMessage | None:
        """The PhotoMessage a task downloads, found through its persisted description."""
        message_id = _message_id(task)
        return self.store.get(message_id) if message_id is not None else None

    def photo_tasks(self) -> dict[str, bgsession.Task]:
        """Unfinished tasks by message id."""
        out = {}
        for task in self.session.get_tasks():
            message_id = _message_id(task)
            if message_id is not None:
                out[message_id] = task
        return out


def _message_id(task: bgsession.Task) -> str | None:
    """The message a task belongs to, from its persisted description (None: not a photo task)."""
    description = task.description or ""
    return description[len(DESCRIPTION_PREFIX):] if description.startswith(DESCRIPTION_PREFIX) else None


def _name_from_url(url: str) -> str:
    """The destination file name: the URL's last path segment, made safe (the seed's rule)."""
    return bgsession.sanitize_filename(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])


def _photo_name(task: bgsession.Task) -> str:
    return _name_from_url(task.original_request.url)


def _read_inbox(path: str) -> list[dict[str, str]]:
    """The messages the messaging service delivered: [{"id", "url"}] (its links may be refreshed)."""
    try:
        with open(path, "rb") as f:
            inbox = json.load(f)
    except FileNotFoundError:
        return []
    return list(inbox)


def _load_account(path: str) -> tuple[str, str] | None:
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
        return str(raw["user"]), str(raw["password"])
    except (OSError, ValueError, KeyError):
        return None


# ============================================================================
# The app delegate
# ============================================================================


class PhotoApp(appdelegate.AppDelegate):
    """The app's lifecycle: re-create the shared manager every launch; save the completion handler."""

    def did_finish_launching(self, app: appdelegate.Application, launch_options: Mapping[str, Any]) -> None:
        settings = _parse_app_args(app.argv[1:])
        _append_line(settings.launches_path, {"event": "launch", "pid": os.getpid(),
                                              "background": app.is_background_launch})
        BackgroundSessionManager.configure(settings)
        manager = BackgroundSessionManager.shared_manager()  # every launch: this re-attaches the blocks
        tasks = manager.photo_tasks()
        _say(f"pid {os.getpid()}: re-created the shared session {settings.identifier!r}: "
             f"{len(tasks)} unfinished download(s) recovered")
        if not app.is_background_launch:
            self.receive_messages(manager, tasks)
            tasks = manager.photo_tasks()  # with the ones just created
        # one journal fsync (one daemon round trip) for all; running or finished tasks stay as they are
        manager.session.resume_all(tasks.values())
        self.keep_transfers_alive(app, manager)

    def handle_events_for_background_url_session(self, app: appdelegate.Application, identifier: str,
                                                 completion_handler: appdelegate.CompletionHandler) -> None:
        _say(f"woken for the events of {identifier!r}: saved the completion handler")
        BackgroundSessionManager.shared_manager().save_completion_handler(completion_handler)

    def run(self, app: appdelegate.Application) -> None:
        manager = BackgroundSessionManager.shared_manager()
        _say("in the foreground; waiting for the downloads")
        manager.session.wait()
        _say("all downloads delivered")

    def will_terminate(self, app: appdelegate.Application) -> None:
        BackgroundSessionManager.shared_manager().session.close()

    # -- the app's own logic -------------------------------------------------------------------
    @staticmethod
    def receive_messages(manager: BackgroundSessionManager, tasks: Mapping[str, bgsession.Task]) -> None:
        """New messages from the inbox: a PhotoMessage and a (suspended) download task each.

        Idempotent across kills: a task whose description names the message is
        adopted rather than created twice; a message left downloading without a
        task (its creation never reached the journal) gets a new one.
        """
        store = manager.store
        known = {m.id: m for m in store.messages()}
        for item in _read_inbox(manager.settings.inbox_path):
            message = known.get(item["id"]) or PhotoMessage(item["id"], item["url"])
            if message.state != DOWNLOADING or message.id in tasks:
                continue
            manager.download_task(message.url, description=DESCRIPTION_PREFIX + message.id)
            store.save(message)
            _say(f"message {message.id}: {message.name} -> downloading")

    @staticmethod
    def keep_transfers_alive(app: appdelegate.Application, manager: BackgroundSessionManager) -> None:
        """In-process host: this process *is* the transfer host, so ask for time to finish them.

        (With the daemon host the transfers go on without the app; nothing to do.)
        """
        if manager.session.configuration.host != "inprocess" or not manager.photo_tasks():
            return
        task_id = appdelegate.INVALID_BACKGROUND_TASK

        def expired() -> None:
            _say("background time is up; the downloads resume at the next launch")
            app.end_background_task(task_id)

        def wait_then_end() -> None:
            manager.session.wait()
            app.end_background_task(task_id)

        task_id = app.begin_background_task(expired, name="photo downloads")
        _say("this process hosts the downloads (in-process host): asked for background time to finish them")
        threading.Thread(target=wait_then_end, name="photo-downloads", daemon=True).start()


def _parse_app_args(argv: Sequence[str]) -> AppSettings:
    parser = argparse.ArgumentParser(
        prog="demo_photo_app.py app",
        description="The photo-message app itself (the story launches it; so does the bgsession daemon). "
                    "A launch with BGSESSION_BACKGROUND_EVENTS=<identifier> set is a background launch.")
    parser.add_argument("--state", required=True, help="the app's directory (messages, Documents, session)")
    parser.add_argument("--identifier", default=DEFAULT_IDENTIFIER,
                        help=f"background session identifier (default {DEFAULT_IDENTIFIER})")
    parser.add_argument("--host", choices=HOSTS, default=DEFAULT_HOST,
                        help=f"where the transfers run (default {DEFAULT_HOST})")
    args = parser.parse_args(list(argv[1:]) if argv[:1] == ["app"] else list(argv))
    return AppSettings(os.path.abspath(args.state), args.identifier, args.host)


def app_main(argv: Sequence[str]) -> int:
    """``demo_photo_app.py app …``: run the app under appdelegate.main."""
    _parse_app_args(argv)  # --help and argument errors before anything starts
    return appdelegate.main(PhotoApp, argv=[sys.argv[0], *argv])


# ============================================================================
# The story (python demo_photo_app.py)
# ============================================================================


@dataclasses.dataclass(frozen=True)
class _Photo:
    id: str
    path: str
    size: int | None  # None: not on the server (404)
    note: str = ""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def story(host: str, workdir: str | None, seed: int) -> int:
    """Run the whole demo; returns 0 when every check passed."""
    import fake_server  # the story's stand-in for the internet; the app itself does not need it

    rng = random.Random(seed)
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="bgsession-demo-")
    workdir = os.path.abspath(workdir)
    settings = AppSettings(os.path.join(workdir, "app"), DEFAULT_IDENTIFIER, host)
    if os.path.isdir(settings.state) and os.listdir(settings.state):
        print(f"demo_photo_app.py: {settings.state} is not empty; give an empty --workdir", file=sys.stderr)
        return 2
    os.makedirs(settings.state, mode=0o700, exist_ok=True)
    print("bgsession demo: the photo-message app of the AFNetworking / iOS 7 background-transfer answer.")
    print(f"work dir {workdir}  (host {host}, seed {seed})")
    print()

    photos = [
        _Photo("1", "/photos/sunset.jpg", 96 * 1024 + rng.randrange(1024)),
        _Photo("2", "/photos/harbour.jpg", 640 * 1024 + rng.randrange(1024)),
        _Photo("3", "/photos/mountain.jpg", 2560 * 1024 + rng.randrange(1024),
               f"throttled to {_human(STORY_THROTTLE)}/s"),
        _Photo("4", "/photos/private.jpg", 200 * 1024 + rng.randrange(1024), "needs a password (Basic auth)"),
        _Photo("5", "/photos/missing.jpg", None, "404 Not Found"),
        _Photo("6", "/photos/shared.jpg", 768 * 1024 + rng.randrange(1024), "a link that expires mid-download"),
    ]
    slow, shared = photos[2], photos[5]
    signer = fake_server.SignedURLs()
    server = fake_server.FakeServer()
    server.start()
    controller: fake_server.AppController | None = None
    try:
        # -- 1. the server -----------------------------------------------------------------------
        print(f"1. Start a fake photo server at {server.base_url}")
        for i, photo in enumerate(photos):
            if photo.size is None:
                server.add_status(photo.path, 404, b"<h1>404 Not Found</h1>\n")
            else:
                auth = fake_server.BasicAuth("alice", "wonderland", realm="photos") if "password" in photo.note else (
                    signer if photo is shared else None)
                cut = [fake_server.Fault(cut_after=(photo.size or 0) // 3)] if photo is shared else None
                server.add_blob(photo.path, size=photo.size, seed=seed * 100 + i, auth=auth, faults=cut,
                                default_fault=fake_server.Fault(throttle=STORY_THROTTLE) if photo is slow else None)
            size = _human(photo.size) if photo.size is not None else ""
            print(f"     {photo.path.rsplit('/', 1)[-1]:<13} {size:>9}  {photo.note}".rstrip())
        _atomic_write_json(settings.account_path, {"user": "alice", "password": "wonderland"})
        links = {p.id: signer.sign(server.url(p.path)) if p is shared else server.url(p.path) for p in photos}
        _atomic_write_json(settings.inbox_path, [{"id": p.id, "url": links[p.id]} for p in photos])

        def expire_link(path: str, served: int) -> None:
            """The shared photo's link expires a third of the way in (and its response is cut there); the
            messaging service has a fresh one."""
            signer.expire()
            links[shared.id] = signer.sign(server.url(shared.path))
            _atomic_write_json(settings.inbox_path, [{"id": p.id, "url": links[p.id]} for p in photos])
        server.on_bytes(shared.path, (shared.size or 0) // 3, expire_link)

        # -- 2. normal launch, killed mid-download ------------------------------------------------
        assert slow.size is not None
        kill_at = rng.randrange(slow.size * 3 // 10, slow.size * 7 // 10)
        controller = fake_server.AppController(settings.app_argv(), identifier=settings.identifier)
        hold = controller.kill_when(server, slow.path, kill_at)
        print(f"2. Launch the app (a normal launch). It receives {len(photos)} photo messages")
        print("   and starts their downloads in its background session.")
        controller.launch()
        if not hold.wait(STORY_LAUNCH_TIMEOUT):
            print("   the download never reached the kill point; giving up", file=sys.stderr)
            return 1
        print(f"3. Kill the app with SIGKILL when mountain.jpg is at {_human(kill_at)} of {_human(slow.size)}.")
        print(f"     killed: exit status {controller.launches[-1][2]}; the app's store now says:")
        for message in PhotoStore(settings.store_path).messages():
            print(f"       message {message.id} {message.name:<13} {message.state}")

        # -- 3. background relaunch(es) -------------------------------------------------------------
        launches = 0
        while _unfinished(settings) and launches < STORY_MAX_BACKGROUND_LAUNCHES:
            launches += 1
            if host == "daemon":
                print(f"{3 + launches}. Wait: the bgsession daemon finishes the downloads, then relaunches the app")
                print(f"   with {bgsession.BACKGROUND_EVENTS_ENV}={settings.identifier} (the app's output goes to "
                      f"{os.path.relpath(os.path.join(settings.session_directory, 'daemon.log'), workdir)})")
                if not _wait_for_background_launch(settings, STORY_LAUNCH_TIMEOUT):
                    print("     no background launch came", file=sys.stderr)
                    break
                continue
            print(f"{3 + launches}. Relaunch the app in the background, as the system would: "
                  f"{bgsession.BACKGROUND_EVENTS_ENV}={settings.identifier}")
            controller.launch(background=True)
            code = controller.wait(STORY_LAUNCH_TIMEOUT)
            print(f"     the app exited with code {code}")
        step = 4 + launches

        # -- results ----------------------------------------------------------------------------------
        print(f"{step}. Results")
        return _report(settings, photos, server, (slow, shared), seed, hold.served or kill_at)
    finally:
        if controller is not None:
            controller.close()
        server.stop()
        print(f"   (files kept in {workdir}"
              + ("; the bgsession daemon exits by itself when idle)" if host == "daemon" else ")"))


def _unfinished(settings: AppSettings) -> bool:
    messages = PhotoStore(settings.store_path).messages()
    return not messages or any(m.state == DOWNLOADING for m in messages)


def _wait_for_background_launch(settings: AppSettings, timeout: float) -> bool:
    """Daemon host: wait until a background launch called its handler and no message is downloading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        called = any(r["event"] == "completion_handler" for r in _read_lines(settings.launches_path))
        if called and not _unfinished(settings):
            return True
        time.sleep(0.1)
    return False


def _report(settings: AppSettings, photos: Sequence[_Photo], server: Any, watched: tuple[_Photo, _Photo], seed: int,
            killed_at: int) -> int:
    import fake_server

    ok, (slow, shared) = True, watched
    messages = {m.id: m for m in PhotoStore(settings.store_path).messages()}
    for i, photo in enumerate(photos):
        message = messages.get(photo.id)
        name = photo.path.rsplit("/", 1)[-1]
        if message is None:
            print(f"     message {photo.id} {name:<13} never received  FAIL")
            ok = False
            continue
        if photo.size is None:
            kept = os.path.exists(os.path.join(settings.documents, name))
            good = message.state == FAILED and message.resource_path is None and not kept
            print(f"     message {photo.id} {name:<13} {message.state:<9} {message.error}, no file kept"
                  f"  {'ok (expected)' if good else 'FAIL'}")
            ok = ok and good
            continue
        expected = hashlib.sha256(fake_server.blob_bytes(photo.size, seed * 100 + i)).hexdigest()
        path = message.resource_path
        actual = _sha256_file(path) if path and os.path.exists(path) else None
        good = message.state == FINISHED and actual == expected
        where = os.path.relpath(path, settings.state) if path else "-"
        print(f"     message {photo.id} {name:<13} {message.state:<9} {where:<24} "
              f"SHA-256 {'ok' if good else 'MISMATCH'}")
        ok = ok and good

    records = _read_lines(settings.launches_path)
    background = [r["pid"] for r in records if r["event"] == "launch" and r["background"]]
    calls = [r["pid"] for r in records if r["event"] == "completion_handler"]
    for pid in background:
        n = calls.count(pid)
        print(f"     completion handler in background launch pid {pid}: called {n} time(s)"
              f"  {'ok' if n == 1 else 'FAIL'}")
        ok = ok and n == 1
    if not background or len(calls) != len(background):
        ok = False

    requests = server.requests(slow.path)
    if settings.host == "daemon":
        whole = [r for r in requests if r.status == 200]
        print(f"     mountain.jpg: the daemon went on downloading while the app was dead "
              f"({len(requests)} request(s), {server.bytes_served(slow.path):,} bytes for {slow.size or 0:,})")
        ok = ok and len(whole) == 1
    else:
        ranges = [r.range_header for r in requests if r.status == 206 and r.range_header]
        start = int(ranges[0].split("=")[1].split("-")[0]) if ranges else 0
        print(f"     mountain.jpg: the server had sent {killed_at:,} bytes when the app died; the relaunch")
        print(f"       resumed with 'Range: bytes={start}-' ({max(0, killed_at - start):,} bytes were still in flight)")
        ok = ok and start > 0

    answers = [(r.status, r.range_header) for r in server.requests(shared.path)]
    renewed = any(status == 403 for status, _ in answers) and any(
        status == 206 and ranged for status, ranged in answers[1:])
    print(f"     shared.jpg: the link expired at {_human((shared.size or 0) // 3)} (403); renewed through "
          f"task_will_begin_delayed_request, resumed with Range  {'ok' if renewed else 'FAIL'}")
    ok = ok and renewed

    problems = bgsession.Journal(settings.session_directory).check()
    print(f"     journal check: {'clean' if not problems else problems}")
    ok = ok and not problems
    print("All checks passed." if ok else "SOME CHECKS FAILED.")
    return 0 if ok else 1


def _story_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="demo_photo_app.py",
        description="The seed's photo-message app on bgsession: launched, killed mid-download with SIGKILL, "
                    "relaunched in the background; every photo then checked by SHA-256.",
        epilog="The app itself: demo_photo_app.py app --state DIR [--identifier ID] [--host HOST] "
               "(a background launch when BGSESSION_BACKGROUND_EVENTS is set).")
    parser.add_argument("--host", choices=HOSTS, default=DEFAULT_HOST,
                        help=f"where the transfers run (default {DEFAULT_HOST})")
    parser.add_argument("--workdir", help="an empty directory for the app's files (default: a new temp dir)")
    parser.add_argument("--seed", type=int, default=1, help="photo contents and the kill offset (default 1)")
    args = parser.parse_args(argv)
    return story(args.host, args.workdir, args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["app"]:
        return app_main(argv[1:])
    return _story_main(argv)


if __name__ == "__main__":
    sys.exit(main())
