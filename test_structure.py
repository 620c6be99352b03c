"""The shape of bgsession.py and ARCHITECTURE.md: sections in dependency order, small classes and
functions, and the design document's lists (record types, transitions, operations, events, threads)
equal to the code's, so that neither can drift from the other."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re

import pytest

import bgsession as bg

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


SOURCE = _read("bgsession.py")
TREE = ast.parse(SOURCE)
ARCHITECTURE = _read("ARCHITECTURE.md")

#: Limits the structure issue set: one job per class, functions a reader can hold.
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_ENGINE_LINES = 500


def _table(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after *heading* in ARCHITECTURE.md (header row dropped)."""
    start = ARCHITECTURE.index(heading)
    rows = []
    for line in ARCHITECTURE[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _forward_references() -> list[tuple[int, str]]:
    """(line, name) of every module-level name used above its definition (annotations excluded)."""
    defined: dict[str, int] = {}
    for i, node in enumerate(TREE.body):
        for sub in ast.walk(node) if isinstance(node, ast.Try) else [node]:
            if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(sub.name, i)
            elif isinstance(sub, (ast.Assign, ast.AnnAssign)):
                for target in sub.targets if isinstance(sub, ast.Assign) else [sub.target]:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            defined.setdefault(name.id, i)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                for alias in sub.names:
                    defined.setdefault((alias.asname or alias.name).split(".")[0], i)
    found: list[tuple[int, str]] = []

    class Uses(ast.NodeVisitor):
        def __init__(self, index: int) -> None:
            self.index = index

        def visit_arg(self, node: ast.arg) -> None:  # a parameter's annotation is not run
            pass

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # the return annotation neither
            for expr in node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]:
                self.visit(expr)
            for stmt in node.body:
                self.visit(stmt)

        def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
            if node.value is not None:
                self.visit(node.value)

        def visit_Name(self, node: ast.Name) -> None:
            if isinstance(node.ctx, ast.Load) and defined.get(node.id, -1) > self.index:
                found.append((node.lineno, node.id))

    for i, node in enumerate(TREE.body):
        for part in (node.bases + node.body) if isinstance(node, ast.ClassDef) else [node]:
            Uses(i).visit(part)
    return found


def test_no_name_is_used_above_its_definition():
    """The file reads top to bottom: code never uses a module-level name defined further below."""
    assert _forward_references() == []


def test_module_docstring_lists_the_sections_as_they_are():
    """The module docstring's numbered sections are the banners of the file, in order."""
    listed = re.findall(r"^\s*(\d+)\. (\S[^-]*?)\s+--", bg.__doc__ or "", re.M)
    banners = re.findall(r"^# (\d+)\. ([^:\n(]+)", SOURCE, re.M)
    assert [(n, name.strip()) for n, name in listed] == [(n, name.strip()) for n, name in banners]
    assert len(banners) == 13


def test_classes_and_functions_are_small():
    """No class over 400 lines, no function over 80, and the engine under 500."""
    too_big = []
    for node in ast.walk(TREE):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES):
                too_big.append((node.name, size))
    assert too_big == []
    engine = inspect.getsource(bg._Engine).count("\n")
    assert engine < MAX_ENGINE_LINES


def test_architecture_lists_every_record_type():
    """ARCHITECTURE.md's record types are exactly the ones the journal's reducer handles."""
    documented = {_ticked(row[0])[0] for row in _table("### Record types")}
    assert documented == set(bg._RECORD_TYPES)
    state = bg._SessionState()
    for kind in bg._RECORD_TYPES:  # each is handled: any error is about its content, not its type
        try:
            state.apply({"v": 1, "t": kind, "id": 1})
        except bg.JournalError as err:
            assert "unknown record type" not in str(err)
        except (bg.IllegalTransition, KeyError, TypeError, ValueError):
            pass


def test_architecture_transition_table_is_the_code_table():
    """ARCHITECTURE.md's transition table is _TRANSITIONS, row by row."""
    documented = {}
    for phase_cell, moves in _table("### Transitions"):
        phase = bg.Phase(_ticked(phase_cell)[0])
        pairs = re.findall(r"`(\w+)` → `(\w+)`", moves)
        documented[phase] = {event: bg.Phase(target) for event, target in pairs}
    assert documented == bg._TRANSITIONS


def test_architecture_lists_every_operation_with_its_arguments():
    """ARCHITECTURE.md's operations are _OPERATIONS: names, arguments in order, and which are resent."""
    documented = {}
    for name, args, _result, resend in _table("### Operations of the app↔engine interface"):
        documented[_ticked(name)[0]] = (tuple(_ticked(args)), resend.startswith("yes"))
    in_code = {op.name: (tuple(a for a, _ in op.args), op.resend) for op in bg._OPERATIONS.values()}
    assert documented == in_code


def test_one_declared_interface():
    """The _Backend Protocol, the operations table, the engine and the daemon client agree: every
    operation is a Protocol method with the table's arguments, implemented by both hosts."""
    protocol = {name for name, _ in inspect.getmembers(bg._Backend, inspect.isfunction) if not name.startswith("_")}
    assert protocol == set(bg._OPERATIONS) | {"close"}
    for op in bg._OPERATIONS.values():
        params = [p for p in inspect.signature(getattr(bg._Backend, op.name)).parameters if p not in ("self", "sink")]
        assert params == [name for name, _ in op.args], op.name
        engine_params = [p for p in inspect.signature(getattr(bg._Engine, op.name)).parameters
                         if p not in ("self", "sink")]
        assert engine_params == params, op.name
        assert callable(getattr(bg._DaemonClient, op.name)), op.name


def test_operations_round_trip_their_wire_form():
    """Every argument and result codec of the table decodes what it encodes."""
    request = bg.Request("https://example.com/a", headers={"Authorization": "Bearer x", "X-A": "1"})
    info = bg.TaskInfo(id=3, kind="download", description="d", phase=bg.Phase.QUEUED,
                       request=request._to_record(), current_url="https://example.com/a", events=("complete",))
    samples = {bg._REQUEST: request, bg._INFO: info, bg._INFOS: [info], bg._BYTES: b"\x00resume",
               bg._IDS: [1, 2], bg._PLAIN: {"a": 1}}
    for codec, value in samples.items():
        if codec is not bg._REQUEST:
            assert codec.decode(codec.encode(value)) == value
    sent = bg._REQUEST.decode(bg._REQUEST.encode(request))
    assert (sent.url, sent.method, dict(sent.headers)) == (request.url, request.method, dict(request.headers))
    assert "Bearer" not in str(request._to_record())  # the journal form keeps no secret


def test_architecture_lists_every_event_and_socket_request():
    """ARCHITECTURE.md's events and the socket's own requests are the ones the code sends and serves."""
    events = [bg.ProgressEvent(1, 1, 1, 1), bg.FinishedEvent(1, "x"), bg.CompletedEvent(1, None), bg.BacklogEnd(True),
              bg.WaitingEvent(1)]
    in_code = {bg._event_to_wire(e)["ev"] for e in events} | set(re.findall(r'"ev": "(\w+)", "cid"', SOURCE))
    assert {_ticked(row[0])[0] for row in _table("### Events")} == in_code
    served = set(re.findall(r'(?:op|msg.get\("op"\)) == "(\w+)"', inspect.getsource(bg._DaemonServer)))
    assert {_ticked(row[0])[0] for row in _table("### The socket's own requests")} == served - set(bg._OPERATIONS)


def test_architecture_lists_every_thread_with_its_owner():
    """Every thread bgsession starts is in ARCHITECTURE.md's table, and every one there exists."""
    names = set(re.findall(r'name=f?"(bgsession-[a-z-]+)', SOURCE))
    names |= {f"{n}-writer" for n in re.findall(r'_Connection\(sock, "(bgsession-[a-z-]+)"\)', SOURCE)}
    documented = {re.sub(r"-<[^>]+>$", "-", _ticked(row[0])[0]) for row in _table("## Threads and who owns each")}
    assert documented == names


@pytest.mark.parametrize("path", ["README.md", "ARCHITECTURE.md", "docs/reliability.md", "bench/README.md",
                                  "bench/PROPOSALS.md", "bench/run.py"])
def test_documents_cite_nothing_outside_the_repository(path):
    """The project explains itself: its documents never point at design notes outside the repository."""
    assert not re.search(r"DESIGN(\.md| §)|shared/|STYLE\.md|§\d", _read(path))


def test_tests_use_the_public_api():
    """No test reaches into a session's engine (``_backend``): they test what users can use."""
    reach = "._" + "backend"  # (spelled so that this file does not match itself)
    offenders = [name for name in os.listdir(HERE) if name.startswith("test") and name.endswith(".py")
                 and reach in _read(name)]
    assert offenders == []


def test_task_info_is_a_frozen_value():
    """Task state crosses boundaries as a frozen TaskInfo, not a dict."""
    assert dataclasses.is_dataclass(bg.TaskInfo)
    info = bg.TaskInfo(1, "download", None, bg.Phase.SUSPENDED, {"url": "http://x/"}, "http://x/")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.id = 2  # type: ignore[misc]
    assert info.state is bg.TaskState.SUSPENDED


def _imported(nodes) -> set[str]:
    return {alias.asname or alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import)
            for alias in node.names}


def test_a_module_imported_where_it_is_needed_is_imported_everywhere_it_is_used():
    """Modules that only some paths need are imported in the functions that use them (start-up cost), and only
    named at module level for annotations (under TYPE_CHECKING). A function that uses one at run time without
    importing it fails only when that path runs -- which ruff and mypy cannot see, as the name exists for them."""
    def module_level(nodes):  # imports run at import time: the top level and its try/if blocks, not TYPE_CHECKING
        for node in nodes:
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue
            if isinstance(node, (ast.Try, ast.If)):
                yield from module_level(node.body + node.orelse + getattr(node, "handlers", []))
            elif isinstance(node, ast.ExceptHandler):
                yield from module_level(node.body)
            else:
                yield node
    top = _imported(module_level(TREE.body))
    lazy = _imported(ast.walk(TREE)) - top
    assert lazy, "no module is imported lazily: this test checks nothing"
    missing = []

    def check(node, imported: set[str], where: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = imported | _imported(ast.walk(node)) | {  # imported, or bound some other way (sys.modules)
                n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for child in node.body + node.decorator_list + node.args.defaults + node.args.kw_defaults:
                if child is not None:
                    check(child, inner, f"{where}.{node.name}".lstrip("."))
            return
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.AnnAssign):
            node = node.value
            if node is None:
                return
        if isinstance(node, ast.Name) and node.id in lazy and node.id not in imported:
            missing.append(f"{where or 'module'}:{node.lineno} uses {node.id}")
        for child in ast.iter_child_nodes(node):
            check(child, imported, where)

    for node in TREE.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                check(item, set(), node.name)
        else:
            check(node, set(), "")
    assert missing == []


def _fresh(code: str) -> str:
    """Run *code* in a fresh interpreter without site (whose .pth files may import anything) that imports this
    directory's bgsession; its stdout."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-S", "-W", "error", "-c", code], cwd=HERE, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_leaves_what_only_some_paths_need_unimported():
    """`import bgsession` does not import the modules only some paths need (start-up cost): HTTP and TLS are
    imported by the first connection, URLs' parser by the first URL, the CLI's and
    the daemon's modules by the CLI and the daemon."""
    deferred = {"ssl", "http.client", "email", "email.utils", "urllib.parse", "datetime", "shutil",
                "argparse", "subprocess", "signal", "hashlib", "mimetypes", "filecmp", "tempfile"}
    out = _fresh("import sys; before = set(sys.modules); import bgsession; "
                 "print(' '.join(sorted(set(sys.modules) - before)))")
    imported = set(out.split())
    assert "bgsession" in imported and "json" in imported  # (what it needs is imported: the test sees imports)
    assert imported & deferred == set()

