"""The rules that keep the layout (docs/architecture.md), read from the source with ast and
tokenize; nothing is imported. Each checker is first proven on small made-up sources, so a
rule that passes on the project passes because the project keeps it, not because the checker
sees nothing.

(a) no import cycle among the modules of tasks/;
(b) only tasks/db/ builds SQL;
(c) ampsync_emulator/ imports nothing from tasks;
(d) no comment or docstring points at the spec or the shared reference files;
(e) no `fmt: skip` / `fmt: off` marker without a reason after it.
"""

from __future__ import annotations

import ast
import io
import re
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python_files(*tops: str, root: Path = ROOT) -> list[Path]:
    found: list[Path] = []
    for top in tops:
        path = root / top
        if path.is_file():
            found.append(path)
        else:
            found += sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    return found


def where(path: Path, line: int, root: Path = ROOT) -> str:
    return f"{path.relative_to(root).as_posix()}:{line}"


# === (a) import cycles =========================================================================


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package by dotted name; a package is its __init__ module."""
    modules = {}
    for path in python_files(package, root=root):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import that runs: at module level, in functions, in try blocks; not the body of
    an `if TYPE_CHECKING:` (its else branch runs)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_edges(name: str, path: Path, modules: dict[str, Path], package: str) -> dict[str, int]:
    """The modules of `package` that importing `name` runs: target -> line of the import.

    `from P import x` runs P.x when x is a module, else P; and every package on the way runs
    its __init__ — except the importer's own ancestors, which Python has already started
    before the importer runs (an import of a *name* from an ancestor still needs it, and
    counts)."""
    is_package = path.name == "__init__.py"
    own_package = name if is_package else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 2)}
    edges: dict[str, int] = {}

    def inside(module: str) -> bool:
        return module == package or module.startswith(package + ".")

    def add(target: str, line: int) -> None:
        if target not in modules:
            return
        parts = target.split(".")
        for n in range(1, len(parts)):
            on_the_way = ".".join(parts[:n])
            if on_the_way in modules and on_the_way not in ancestors:
                edges.setdefault(on_the_way, line)
        if target != name:
            edges.setdefault(target, line)

    for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if inside(alias.name):
                    add(alias.name, node.lineno)
            continue
        if node.level:
            base_parts = own_package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if not inside(base):
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            add(submodule if submodule in modules else base, node.lineno)
    return edges


def import_graph(root: Path, package: str) -> dict[str, dict[str, str]]:
    """module -> {imported module: "file:line" of the import}."""
    modules = module_names(root, package)
    return {
        name: {
            target: where(path, line, root)
            for target, line in import_edges(name, path, modules, package).items()
        }
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan), each as the modules
    in import order, the first repeated at the end."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, {}):
            continue
        # Shortest way from start back to start inside the component.
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for v in frontier:
                for w in sorted(graph.get(v, {})):
                    if w in members and w not in previous:
                        previous[w] = v
                        following.append(w)
            frontier = following
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append(list(reversed(path)))
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return "; ".join(steps)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import x\n",
                "pkg/b.py": "from .a import y\n",
            },
            {"pkg.a", "pkg.b"},
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from . import b\n",
                "pkg/b.py": "from . import c\n",
                "pkg/c.py": "import pkg.a\n",
            },
            {"pkg.a", "pkg.b", "pkg.c"},
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import x\n",
                "pkg/b.py": """
                    from typing import TYPE_CHECKING
                    if TYPE_CHECKING:
                        from .a import y
                """,
            },
            None,
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import x\n",
                "pkg/b.py": """
                    import typing
                    if typing.TYPE_CHECKING:
                        from .a import y
                """,
            },
            None,
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import x\n",
                "pkg/b.py": """
                    from typing import TYPE_CHECKING
                    if TYPE_CHECKING:
                        pass
                    else:
                        from .a import y
                """,
            },
            {"pkg.a", "pkg.b"},
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from .b import x\n",
                "pkg/b.py": """
                    def later():
                        from .a import y
                        return y
                """,
            },
            {"pkg.a", "pkg.b"},
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from pkg.b import x\n",
                "pkg/b.py": """
                    try:
                        from pkg import a
                    except ImportError:
                        a = None
                """,
            },
            {"pkg.a", "pkg.b"},
        ),
        (
            {
                "pkg/__init__.py": "from .a import f\nVALUE = 1\n",
                "pkg/a.py": "from . import VALUE\n",
            },
            {"pkg", "pkg.a"},
        ),
        (
            {
                "pkg/__init__.py": "from .a import f\n",
                "pkg/a.py": "from . import b\nfrom .b import g\n",
                "pkg/b.py": "",
            },
            None,
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "from ..a import f\n",
                "pkg/sub/m.py": "",
                "pkg/a.py": "from .sub.m import g\n",
            },
            {"pkg.a", "pkg.sub"},
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "from .m import g\n",
                "pkg/sub/m.py": "from .. import a\n",
                "pkg/a.py": "import os\n",
            },
            None,
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "import os\nimport json\nfrom collections import abc\n",
            },
            None,
        ),
    ],
    ids=[
        "two modules import each other",
        "three in a ring, absolute and from-package forms",
        "TYPE_CHECKING import is not a cycle",
        "typing.TYPE_CHECKING import is not a cycle",
        "the else branch of TYPE_CHECKING runs",
        "a function-level import counts",
        "an import in a try block counts",
        "a name from the package __init__ is an edge to it",
        "a submodule of one's own package is not an edge to its __init__",
        "an edge to a subpackage's module runs the subpackage __init__",
        "a subpackage importing a sibling module is no cycle",
        "outside imports are ignored",
    ],
)
def test_given_a_made_up_package_when_graphed_then_the_checker_finds_exactly_its_cycle(
    tmp_path, files, cycle
):
    write_tree(tmp_path, files)
    graph = import_graph(tmp_path, "pkg")
    cycles = find_cycles(graph)
    if cycle is None:
        assert cycles == []
    else:
        assert [set(c) for c in cycles] == [cycle]
        assert cycles[0][0] == cycles[0][-1]
        assert describe(cycles[0], graph).count("pkg/") == len(cycles[0]) - 1


def test_given_the_tasks_package_when_graphed_then_the_graph_is_real():
    """Guards the cycle rule against a checker that reads nothing."""
    graph = import_graph(ROOT, "tasks")
    assert "tasks.outcomes" in graph and "tasks.delivery.send" in graph
    assert sum(len(targets) for targets in graph.values()) >= len(graph)
    assert "tasks.outcomes" in graph["tasks.amplitude.payloads"]


def test_given_the_tasks_package_when_its_imports_are_graphed_then_no_module_imports_itself_back():
    graph = import_graph(ROOT, "tasks")
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in tasks/:\n" + "\n".join(
        describe(cycle, graph) for cycle in cycles
    )


# === (b) SQL is built in tasks/db only =========================================================

SQL_BUILDERS = frozenset(
    [
        "select",
        "update",
        "insert",
        "delete",
        "text",
        "func",
        "literal_column",
        "bindparam",
        "and_",
        "or_",
        "case",
        "exists",
        "column",
        "table",
    ]
)


def _is_sqlalchemy_sql(module: str | None) -> bool:
    return module in ("sqlalchemy", "sqlalchemy.sql") or (module or "").startswith(
        "sqlalchemy.sql."
    )


def sql_builders_used(source: str) -> list[tuple[int, str]]:
    """(line, name) of every SQL builder the source imports from sqlalchemy or
    sqlalchemy.sql…, or reaches as an attribute of such a module imported whole."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    whole: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and _is_sqlalchemy_sql(node.module):
            found += [(node.lineno, a.name) for a in node.names if a.name in SQL_BUILDERS]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _is_sqlalchemy_sql(alias.name):
                    whole.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in SQL_BUILDERS
            and ast.unparse(node.value) in whole
        ):
            found.append((node.lineno, node.attr))
    return sorted(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from sqlalchemy import select, Connection\n", [(1, "select")]),
        (
            "from sqlalchemy import (\n    Engine,\n    and_,\n    text,\n)\n",
            [(1, "and_"), (1, "text")],
        ),
        ("from sqlalchemy.sql import func\n", [(1, "func")]),
        ("from sqlalchemy.sql.expression import literal_column\n", [(1, "literal_column")]),
        ("from sqlalchemy.sql.expression import ColumnElement\n", []),
        ("import sqlalchemy as sa\nq = sa.update(t)\n", [(2, "update")]),
        ("import sqlalchemy\nsqlalchemy.delete(t)\n", [(2, "delete")]),
        ("from sqlalchemy import Engine, Connection\nfrom sqlalchemy.exc import DBAPIError\n", []),
        ("from sqlalchemy.engine import make_url\n", []),
        ("def f():\n    from sqlalchemy import bindparam\n", [(2, "bindparam")]),
        ("from mylib import select\n", []),
    ],
    ids=[
        "select",
        "multi-line import",
        "func from sqlalchemy.sql",
        "from sqlalchemy.sql.expression",
        "a type is not a builder",
        "module alias attribute",
        "whole module attribute",
        "connections and errors are fine",
        "make_url is fine",
        "function-level import",
        "another library's select",
    ],
)
def test_given_a_source_when_checked_for_sql_builders_then_exactly_the_builders_are_found(
    source, expected
):
    assert sql_builders_used(source) == expected


def test_given_tasks_outside_db_when_checked_then_no_module_builds_sql():
    offenders = [
        f"{where(path, line)} imports {name}"
        for path in python_files("tasks")
        if path.relative_to(ROOT / "tasks").parts[0] != "db"
        for line, name in sql_builders_used(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "SQL built outside tasks/db/:\n" + "\n".join(offenders)


# === (c) the emulator stands apart =============================================================


def tasks_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of tasks or tasks.* anywhere in the source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name)
                for a in node.names
                if a.name == "tasks" or a.name.startswith("tasks.")
            ]
        elif (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and (node.module == "tasks" or (node.module or "").startswith("tasks."))
        ):
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import tasks\n", [(1, "tasks")]),
        ("import tasks.db.queue as q\n", [(1, "tasks.db.queue")]),
        ("from tasks import sync\n", [(1, "tasks")]),
        ("from tasks.amplitude.limits import MAX_ITEMS\n", [(1, "tasks.amplitude.limits")]),
        ("def f():\n    from tasks.outcomes import Kind\n", [(2, "tasks.outcomes")]),
        ("import tasksmith\nfrom tasks_extra import x\n", []),
        ("from .server import Emulator\n", []),
        ('"""mentions tasks.db"""\nimport os\n', []),
    ],
    ids=[
        "import tasks",
        "import a submodule",
        "from tasks",
        "from a submodule",
        "function-level",
        "similar names",
        "relative import",
        "a mention is not an import",
    ],
)
def test_given_a_source_when_checked_for_tasks_imports_then_exactly_those_are_found(
    source, expected
):
    assert tasks_imports(source) == expected


def test_given_the_emulator_when_checked_then_it_imports_nothing_from_tasks():
    files = python_files("ampsync_emulator")
    assert files, "ampsync_emulator/ has no Python files"
    offenders = [
        f"{where(path, line)} imports {module}"
        for path in files
        for line, module in tasks_imports(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "ampsync_emulator/ imports tasks:\n" + "\n".join(offenders)


# === (d) no pointers to the spec or the shared reference =======================================

FORBIDDEN_MENTIONS = ("SPEC.md", "shared/reference", "../shared")


def comments(source: str) -> Iterator[tuple[int, str]]:
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string


def docstrings(source: str) -> Iterator[tuple[int, str]]:
    """Docstrings of modules, classes and functions, and any other string standing alone as a
    statement (attribute docstrings)."""
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            yield node.lineno, node.value.value


def forbidden_mentions(source: str) -> list[tuple[int, str]]:
    found = []
    for line, text in [*comments(source), *docstrings(source)]:
        lowered = text.lower()
        found += [(line, needle) for needle in FORBIDDEN_MENTIONS if needle.lower() in lowered]
    return sorted(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("x = 1  # see SPEC.md §3\n", [(1, "SPEC.md")]),
        ('"""Module.\n\nAs in shared/reference/amplitude-api.md."""\n', [(1, "shared/reference")]),
        ("def f():\n    '''read ../shared/notes'''\n", [(2, "../shared")]),
        ('class C:\n    x: int = 1\n    """from spec.md"""\n', [(3, "SPEC.md")]),
        ('PATH = "shared/reference/x.md"\n', []),
        ("# see docs/amplitude.md\n", []),
    ],
    ids=[
        "comment",
        "module docstring",
        "function docstring",
        "attribute docstring, any case",
        "a string value is not a comment",
        "docs/ is fine",
    ],
)
def test_given_a_source_when_checked_for_spec_pointers_then_comments_and_docstrings_are_caught(
    source, expected
):
    assert forbidden_mentions(source) == expected


def test_given_product_code_when_checked_then_no_comment_or_docstring_points_at_the_spec():
    offenders = [
        f"{where(path, line)} mentions {needle}"
        for path in python_files("tasks", "ampsync_emulator", "beat_schedule.py")
        for line, needle in forbidden_mentions(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "comments or docstrings point at the spec:\n" + "\n".join(offenders)


# === (e) formatter escapes carry a reason ======================================================

BARE_FMT_MARKER = re.compile(r"#\s*fmt:\s*(?:skip|off)\s*$")


def bare_fmt_markers(source: str) -> list[int]:
    return [line for line, text in comments(source) if BARE_FMT_MARKER.search(text)]


SKIP = "# fmt: " + "skip"
OFF = "# fmt: " + "off"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (f"x = [1,2]  {SKIP}\n", [1]),
        (f"{OFF}\nx = [1,2]\n# fmt: on\n", [1]),
        (f"x = 1\ny = [1,2]  {SKIP}   \n", [2]),
        (f"x = 1  # noqa: E501  {SKIP}\n", [1]),
        (f"x = [1,2]  {SKIP}: a table, aligned by hand\n", []),
        (f"{OFF} - matrix layout\n", []),
        (f"x = [1,2]  {SKIP}  # columns line up\n", []),
        ("# fmt: on\n", []),
        (f'DOC = "{SKIP}"\n', []),
    ],
    ids=[
        "bare skip",
        "bare off",
        "trailing spaces are still bare",
        "after another pragma",
        "skip with a reason",
        "off with a reason",
        "skip with a reason comment",
        "on needs none",
        "in a string, not a comment",
    ],
)
def test_given_a_source_when_checked_for_formatter_escapes_then_bare_markers_are_caught(
    source, expected
):
    assert bare_fmt_markers(source) == expected


def test_given_the_project_sources_when_checked_then_every_formatter_escape_gives_a_reason():
    offenders = [
        where(path, line)
        for path in python_files("tasks", "ampsync_emulator", "tests", "bench")
        for line in bare_fmt_markers(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "fmt: skip/off without a reason:\n" + "\n".join(offenders)
