"""A power-loss simulator for bgsession's durability order (test support, standard library only).

A killed process leaves the page cache intact, so no SIGKILL test can tell a missing or misplaced fsync. This
module can. :class:`Recorder` takes bgsession's place as its file-system table (``bgsession._vfs``): it performs
every operation for real on a live directory tree and logs it -- creates, writes (with their offset), truncates,
fsyncs of files and of directories, renames, links, unlinks, mkdirs -- together with the workload's own marks ("resume()
of task 3 returned"). From the log, :func:`states` builds the states a disk may hold after a power loss at any
point, under three models:

(a) ``synced``: what was fsynced and nothing else -- a file's data as of its last fsync, a directory's entries as
    of its last fsync;
(b) ``torn``: (a) plus any prefix of each file's unsynced writes, the last one torn at a 512-byte boundary;
(c) ``entries``: (a) plus each directory operation (create, rename, link, unlink, mkdir) that no fsync of its directory
    followed, kept or lost independently of the others and of file data -- a renamed file may appear without its
    unsynced content. A rename is one operation, of its destination's directory (journaling file systems commit
    both of its entries together); it is durable once that directory is fsynced.

:func:`materialize` writes a state into a directory, where a test opens the session again (recovery), runs it to the
end against the same server and checks the contract. Identical states have identical outcomes: :class:`Explorer`
verifies each distinct state once and counts every state it generated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import os
import random
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable

#: The granularity at which a write can be torn by a power loss.
SECTOR = 512


@dataclasses.dataclass(frozen=True)
class Op:
    """One logged operation. *kind*: mkdir, create, write, truncate, sync (a file's data), dirsync, rename, link,
    unlink, mark. Paths are relative to the recorder's root; *ino* names a file's content across renames."""

    kind: str
    path: str = ""
    ino: int = -1
    offset: int = 0
    data: bytes = b""
    size: int = 0
    dst: str = ""
    label: str = ""


class Recorder:
    """bgsession's file-system table, recording: performs each operation on the real tree below *root* and logs it.
    Operations outside *root* are performed and not logged."""

    def __init__(self, root: str, real: Any, skip: tuple[str, str] | None = None,
                 owners: Iterable[str] = ()) -> None:
        self.root = os.path.realpath(root)
        self.real = real  # the production table (bgsession._FileSystem)
        #: (kind, function): a "sync" or "dirsync" made by *function* is performed but not logged, as if that fsync
        #: were missing from the code (the test that proves the simulator can fail uses it). An fsync is made by the
        #: innermost function on its stack that is *function* or one of *owners*: the journal's own fsync, reached
        #: from inside another function that syncs, is the journal's.
        self.skip = skip
        self.owners = {*owners, *(skip[1:] if skip else ())}
        #: (path, limit): a write to that file past *limit* bytes fails once with ENOSPC (a full disk, injected)
        self.enospc: tuple[str, int] | None = None
        self.log: list[Op] = []
        self._lock = threading.Lock()
        self._fds: dict[int, tuple[str, int]] = {}  # fd -> ("file", ino) or ("dir", 0) with its path
        self._fd_paths: dict[int, str] = {}
        self._inos: dict[str, int] = {}  # relative path -> ino of the file named so now
        self._next_ino = 1

    # -- helpers -------------------------------------------------------------------------------
    def _rel(self, path: str) -> str | None:
        full = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
        if full == self.root:
            return ""
        return full[len(self.root) + 1:] if full.startswith(self.root + os.sep) else None

    def _add(self, op: Op) -> None:
        if self.skip and op.kind == self.skip[0]:
            frame = sys._getframe(2)
            while frame is not None:
                if frame.f_code.co_name in self.owners:
                    if frame.f_code.co_name == self.skip[1]:
                        op = Op("mark", label=f"skipped {op.kind}")  # where the missing fsync would have been
                    break
                frame = frame.f_back  # type: ignore[assignment]
        self.log.append(op)

    def mark(self, label: str) -> None:
        """A workload event at this point of the log (e.g. ``resumed 3``)."""
        with self._lock:
            self._add(Op("mark", label=label))

    # -- the table -----------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        with self._lock:
            rel = self._rel(path)
            existed = os.path.lexists(path)
            fd = self.real.open(path, flags, mode)
            if rel is None:
                return fd
            if flags & getattr(os, "O_DIRECTORY", 0) or os.path.isdir(path):
                self._fds[fd] = ("dir", 0)
            else:
                if rel not in self._inos:
                    if existed:
                        raise AssertionError(f"{rel} existed before the recording started: start from an empty tree")
                    self._inos[rel] = self._next_ino
                    self._add(Op("create", path=rel, ino=self._next_ino))
                    self._next_ino += 1
                ino = self._inos[rel]
                if flags & os.O_TRUNC:
                    self._add(Op("truncate", ino=ino, size=0))
                self._fds[fd] = ("file", ino)
            self._fd_paths[fd] = rel
            return fd

    def write(self, fd: int, data: Any) -> int:
        with self._lock:
            entry = self._fds.get(fd)
            offset = os.lseek(fd, 0, os.SEEK_CUR) if entry else 0
            if self.enospc and self._fd_paths.get(fd) == self.enospc[0] and offset + len(data) > self.enospc[1]:
                self.enospc = None
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            n = self.real.write(fd, data)
            if entry:
                self._add(Op("write", ino=entry[1], offset=offset, data=bytes(data[:n])))
            return int(n)

    def truncate(self, fd: int, size: int) -> None:
        with self._lock:
            self.real.truncate(fd, size)
            entry = self._fds.get(fd)
            if entry:
                self._add(Op("truncate", ino=entry[1], size=size))

    def sync(self, fd: int) -> None:
        with self._lock:
            self.real.sync(fd)
            entry = self._fds.get(fd)
            if entry and entry[0] == "file":
                self._add(Op("sync", ino=entry[1]))
            elif entry:
                self._add(Op("dirsync", path=self._fd_paths[fd]))

    def sync_dir(self, fd: int) -> None:
        with self._lock:
            self.real.sync_dir(fd)
            entry = self._fds.get(fd)
            if entry and entry[0] == "dir":
                self._add(Op("dirsync", path=self._fd_paths[fd]))
            elif entry:  # fsync of a file: its data too
                self._add(Op("sync", ino=entry[1]))

    def replace(self, src: str, dst: str) -> None:
        with self._lock:
            self.real.replace(src, dst)
            rs, rd = self._rel(src), self._rel(dst)
            if rs is None or rd is None:
                return
            ino = self._inos.pop(rs, None)
            if ino is not None:
                self._inos[rd] = ino
            self._add(Op("rename", path=rs, dst=rd, ino=-1 if ino is None else ino))

    def link(self, src: str, dst: str) -> None:
        with self._lock:
            self.real.link(src, dst)
            rs, rd = self._rel(src), self._rel(dst)
            if rs is None or rd is None:
                return
            ino = self._inos.get(rs)
            if ino is not None:
                self._inos[rd] = ino
            self._add(Op("link", path=rs, dst=rd, ino=-1 if ino is None else ino))

    def unlink(self, path: str) -> None:
        with self._lock:
            self.real.unlink(path)
            rel = self._rel(path)
            if rel is not None:
                self._inos.pop(rel, None)
                self._add(Op("unlink", path=rel))

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        with self._lock:
            self.real.mkdir(path, mode)
            rel = self._rel(path)
            if rel is not None:
                self._add(Op("mkdir", path=rel))

    def close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
            self._fd_paths.pop(fd, None)
            self.real.close(fd)


# -- the states a disk may hold ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class State:
    """A disk after a power loss: directories, and files by path with their content."""

    dirs: frozenset[str]
    files: Mapping[str, bytes]

    def key(self) -> str:
        h = hashlib.sha256()
        for d in sorted(self.dirs):
            h.update(b"d\0" + d.encode() + b"\0")
        for path in sorted(self.files):
            h.update(b"f\0" + path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        return h.hexdigest()


def _apply_data(content: bytearray, op: Op, tear: int | None = None) -> None:
    """Apply a write or truncate. A write torn at *tear* bytes (a multiple of SECTOR) reached the disk in its first
    sectors only: the rest of its range keeps what was there, zeros where it extended the file (the size grew,
    its data did not arrive)."""
    if op.kind == "truncate":
        del content[op.size:]
        if len(content) < op.size:
            content.extend(bytes(op.size - len(content)))
        return
    end = op.offset + len(op.data)
    if len(content) < end:
        content.extend(bytes(end - len(content)))
    data = op.data if tear is None else op.data[:tear]
    content[op.offset:op.offset + len(data)] = data


def _parent(path: str) -> str:
    return os.path.dirname(path)


class Timeline:
    """The log, indexed for building states at any crash point (a crash point *k*: the first *k* ops happened)."""

    def __init__(self, log: Sequence[Op]) -> None:
        self.log = list(log)
        self.data_ops: dict[int, list[int]] = {}  # ino -> indices of its writes/truncates
        self.syncs: dict[int, list[int]] = {}  # ino -> indices of its syncs
        self.entry_ops: dict[str, list[int]] = {}  # directory -> indices of operations on its entries
        self.dirsyncs: dict[str, list[int]] = {}
        self.marks: list[tuple[int, str]] = []
        for i, op in enumerate(self.log):
            if op.kind in ("write", "truncate"):
                self.data_ops.setdefault(op.ino, []).append(i)
            elif op.kind == "sync":
                self.syncs.setdefault(op.ino, []).append(i)
            elif op.kind in ("create", "mkdir", "unlink"):
                self.entry_ops.setdefault(_parent(op.path), []).append(i)
            elif op.kind in ("rename", "link"):  # one metadata operation: durable once its destination's directory
                self.entry_ops.setdefault(_parent(op.dst), []).append(i)  # is synced
            elif op.kind == "dirsync":
                self.dirsyncs.setdefault(op.path, []).append(i)
            elif op.kind == "mark":
                self.marks.append((i, op.label))
        self._durable_cache: dict[tuple[int, int], bytes] = {}

    def __len__(self) -> int:
        return len(self.log)

    def labels(self, k: int) -> list[str]:
        """The workload's marks among the first *k* ops."""
        return [label for i, label in self.marks if i < k]

    @staticmethod
    def _last_before(indices: Sequence[int], k: int) -> int:
        last = -1
        for i in indices:
            if i >= k:
                break
            last = i
        return last

    def durable_content(self, ino: int, k: int) -> bytes:
        """A file's content as of its last sync before crash point *k*."""
        last = self._last_before(self.syncs.get(ino, []), k)
        key = (ino, last)
        if key not in self._durable_cache:
            content = bytearray()
            for i in self.data_ops.get(ino, []):
                if i > last:
                    break
                _apply_data(content, self.log[i])
            self._durable_cache[key] = bytes(content)
        return self._durable_cache[key]

    def unsynced_data(self, ino: int, k: int) -> list[int]:
        last = self._last_before(self.syncs.get(ino, []), k)
        return [i for i in self.data_ops.get(ino, []) if last < i < k]

    def unsynced_entries(self, k: int) -> list[int]:
        """Entry operations before *k* that no fsync of their directory (each, for a rename) followed."""
        out = set()
        for directory, indices in self.entry_ops.items():
            last = self._last_before(self.dirsyncs.get(directory, []), k)
            out.update(i for i in indices if last < i < k)
        return sorted(out)

    def _entry_durable(self, i: int, k: int) -> bool:
        op = self.log[i]
        directory = _parent(op.dst if op.kind in ("rename", "link") else op.path)
        return self._last_before(self.dirsyncs.get(directory, []), k) > i

    def state(self, k: int, keep_entries: Callable[[int], bool] = lambda i: False,
              prefix: Mapping[int, tuple[int, int | None]] | None = None) -> State:
        """The state at crash point *k*: entry operations not made durable are applied if *keep_entries(i)*; a
        file's unsynced data ops are applied up to *prefix[ino]* = (count, torn length of the last or None)."""
        names: dict[str, int] = {}  # path -> ino, or 0 for a directory
        dirs = {""}
        for i in range(k):
            op = self.log[i]
            if op.kind not in ("create", "mkdir", "unlink", "rename", "link"):
                continue
            if not self._entry_durable(i, k) and not keep_entries(i):
                continue
            if op.kind == "mkdir":
                dirs.add(op.path)
            elif op.kind == "create":
                names[op.path] = op.ino
            elif op.kind == "unlink":
                names.pop(op.path, None)
            elif op.kind in ("rename", "link") and (op.path in names or op.ino >= 0):
                # (a rename or link that reached the disk names its file there, even if the file's first name never
                # did: the file system keeps the file with the entry that points at it)
                names[op.dst] = op.ino if op.ino >= 0 else names[op.path]
                if op.kind == "rename":
                    names.pop(op.path, None)
        files = {}
        for path, ino in names.items():
            if not all(_ancestors_in(path, dirs)):
                continue
            content = bytearray(self.durable_content(ino, k))
            if prefix and ino in prefix:
                count, torn = prefix[ino]
                ops = self.unsynced_data(ino, k)[:count]
                for j, i in enumerate(ops):
                    _apply_data(content, self.log[i], torn if j == len(ops) - 1 else None)
            files[path] = bytes(content)
        live_dirs = frozenset(d for d in dirs if all(_ancestors_in(d, dirs)))
        return State(live_dirs, files)


def _ancestors_in(path: str, dirs: set[str]) -> Iterator[bool]:
    parent = _parent(path)
    while parent:
        yield parent in dirs
        parent = _parent(parent)


def states(tl: Timeline, k: int, rng: random.Random, samples: int = 2) -> Iterator[tuple[str, State]]:
    """The states at crash point *k*: (a) once, then *samples* random draws each of (b), (c) and both at once."""
    yield "synced", tl.state(k)
    inos = [ino for ino in tl.data_ops if tl.unsynced_data(ino, k)]
    entries = tl.unsynced_entries(k)
    for _ in range(samples if inos else 0):
        yield "torn", tl.state(k, prefix=_draw_prefix(tl, k, inos, rng))
    for _ in range(samples if entries else 0):
        kept = {i for i in entries if rng.random() < 0.5}
        yield "entries", tl.state(k, keep_entries=kept.__contains__)
    for _ in range(samples if entries and inos else 0):
        kept = {i for i in entries if rng.random() < 0.5}
        yield "both", tl.state(k, keep_entries=kept.__contains__, prefix=_draw_prefix(tl, k, inos, rng))


def exhaustive_states(tl: Timeline, k: int) -> Iterator[tuple[str, State]]:
    """Every state at crash point *k* that differs from (a) in one choice: each file's unsynced data cut after each
    of its ops (torn at each sector of the last one, up to 4 sectors), alone and with every unsynced entry kept;
    each unsynced entry operation kept alone; all of them kept."""
    yield "synced", tl.state(k)
    all_entries = set(tl.unsynced_entries(k))
    for ino in tl.data_ops:
        ops = tl.unsynced_data(ino, k)
        for count in range(1, len(ops) + 1):
            last = tl.log[ops[count - 1]]
            tears: list[int | None] = [None]
            if last.kind == "write":
                tears += [t for t in range(SECTOR, min(len(last.data), 4 * SECTOR + 1), SECTOR) if t < len(last.data)]
            for torn in tears:
                yield "torn", tl.state(k, prefix={ino: (count, torn)})
                if all_entries:  # the same data, its file's name (and every other entry) kept
                    yield "both", tl.state(k, keep_entries=all_entries.__contains__, prefix={ino: (count, torn)})
    entries = tl.unsynced_entries(k)
    for i in entries:
        yield "entries", tl.state(k, keep_entries=lambda j, i=i: j == i)
    if len(entries) > 1:
        yield "entries", tl.state(k, keep_entries=set(entries).__contains__)


def _draw_prefix(tl: Timeline, k: int, inos: Sequence[int], rng: random.Random) -> dict[int, tuple[int, int | None]]:
    out: dict[int, tuple[int, int | None]] = {}
    for ino in inos:
        ops = tl.unsynced_data(ino, k)
        count = rng.randint(0, len(ops))
        torn = None
        if count and tl.log[ops[count - 1]].kind == "write" and rng.random() < 0.5:
            size = len(tl.log[ops[count - 1]].data)
            torn = rng.randrange(0, size + 1, SECTOR) if size >= SECTOR else 0
        out[ino] = (count, torn)
    return out


def materialize(state: State, root: str) -> None:
    """Write *state* into the empty directory *root*: what the disk holds when the machine comes back."""
    for d in sorted(state.dirs, key=len):
        if d:
            os.makedirs(os.path.join(root, d), mode=0o700, exist_ok=True)
    for path, content in state.files.items():
        full = os.path.join(root, path)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


@dataclasses.dataclass
class Explorer:
    """Counts every state generated; verifies each distinct one once (with the union of the requirements of every
    crash point that produced it) by calling *verify(state, labels)*, which returns a list of violations."""

    verify: Callable[[State, Sequence[str]], list[str]]
    explored: int = 0
    by_model: dict[str, int] = dataclasses.field(default_factory=dict)
    pending: dict[str, tuple[State, set[str], str, int]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)

    def add(self, model: str, state: State, labels: Sequence[str], k: int) -> None:
        self.explored += 1
        self.by_model[model] = self.by_model.get(model, 0) + 1
        key = state.key()
        if key in self.pending:
            self.pending[key][1].update(labels)
        else:
            self.pending[key] = (state, set(labels), model, k)

    def run(self, workers: int = 3) -> None:
        """Verify every distinct state, *workers* at a time (each in its own directory, with its own session)."""
        def one(item: tuple[State, set[str], str, int]) -> list[str]:
            state, labels, model, k = item
            return [f"crash point {k} ({model}): {problem}" for problem in self.verify(state, sorted(labels))]
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="crash-verify") as pool:
            for problems in pool.map(one, list(self.pending.values())):
                self.failures.extend(problems)

    @property
    def distinct(self) -> int:
        return len(self.pending)
