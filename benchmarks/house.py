"""The house of vkd_dist, measured from its source (standard library only: `ast`, nothing is imported or run).

    python -m benchmarks.house [--root vkd_dist] [--files] [--trace] [--json OUT]

Exit status: 0, or 1 when the package has an import circle (at either granularity below).

1. The import graph.
   Nodes. Every module of the package is a file; with the default convention a subpackage directly under the root
   (`vkd_dist/config/`, `data/` with `data/sources/`, `models/`, `objectives/`) is ONE node, every other module
   (the root's `__init__.py` as `vkd_dist`, `train.py`, `run.py` ...) one node each. This is the convention that
   reproduces the "30 files on 12 floors with 114 arrows" of issue 21 on commit cde58b2 (see the closing table).
   `--files` makes every module its own node (a package's `__init__.py` is then the node of the package).
   Arrows. An import of another package module at ANY depth: module level, class bodies, inside functions (kind
   "function"), and inside `if TYPE_CHECKING:` (kind "type_checking"; its `else:` is runtime). Relative imports are
   resolved; `from P import x` is an arrow to the module `P.x` when that module exists, else to `P` itself;
   `import a.b.c` is an arrow to `a.b.c` (its parent packages, which Python also executes, are not arrows).
   An arrow is a distinct (node, node) pair; imports inside one node are not arrows. Arrows seen only under
   TYPE_CHECKING are reported apart and take no part in floors or circles: they are never executed.
   Floors. Longest-path layering of the condensation (strongly connected components as single nodes): floor 0
   imports nothing of the package, floor n imports something on floor n-1 and nothing higher.
   Circles. Every strongly connected component of more than one node, with one shortest example chain through its
   first member, each step naming the importing file and line. Circles are also sought module by module (the
   `--files` graph), which finds a circle between two modules of one subpackage that the node graph hides.

2. The walk of `cfg` from `vkd_dist.train.train`.
   In a visited function a value carries the config when it is a name, attribute path or subscript of one whose
   parts include `cfg` (`cfg`, `cfg.data`, `run.cfg`, `self.cfg.model`, `cfg.data.paths[0]`), or is rooted at a
   tainted name: a parameter that received a carrier, or a local assigned one (`data = cfg.data`).
   Calls are taken in evaluation order (by where their argument list closes, so `f(g(cfg))` calls g first); a call
   is followed when one of its arguments (positional or keyword) carries the config and its callee resolves to a
   function of the package: a name defined or imported at module level or imported inside the function
   (re-exports followed), `module.f`, `Class.f`, `self.f` / `cls.f` (through the class's bases in the package), or
   a class, which means its `__init__`, else its `__post_init__` (a class with neither is not entered). Calls on
   other objects (`run.log.info(cfg)`) and callables passed as values are not resolved. Arguments map to
   parameters by position (skipping `self`/`cls` for bound calls) and by keyword. Nested functions and lambdas are
   part of the function that holds them. Each function is visited once, depth first: a call to a function already
   visited is not followed and records nothing.
   Counted on the calls that cross from one file to another:
   - files visited: distinct files the walk is ever in (train.py included);
   - climbs: the callee's node is on a higher floor than the caller's node;
   - returns to a file already left: the callee's file is one the walk had left before (by calling out of it or
     by returning from it); coming back to the caller when a callee returns is not counted.

Figures (default convention; cfg walk as above):

    tree                  nodes  arrows  floors  circles  type-checking-only  walk: files  climbs  returns
    cde58b2 (issue 21)    28     111     12      2        2                         24     12      26
    current tree          see the closing note of the session that ran it
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RUNTIME = ("module", "function")


@dataclass(frozen=True)
class Site:
    """One import of a package module by another: where it is and what kind."""

    src: str
    dst: str
    file: str
    line: int
    kind: str  # "module" | "function" | "type_checking"

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.kind})"


@dataclass
class Package:
    root: Path
    name: str
    modules: dict[str, Path]  # dotted name -> file
    trees: dict[str, ast.Module]
    packages: set[str]  # modules that are packages (an __init__.py)

    def rel(self, module: str) -> str:
        return self.modules[module].relative_to(self.root.parent).as_posix()


def load_package(root: Path) -> Package:
    root = root.resolve()
    modules, trees, packages = {}, {}, set()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        name = ".".join(parts)
        modules[name] = path
        trees[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return Package(root, root.name, modules, trees, packages)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _base(pkg: Package, module: str, level: int) -> str:
    """The package a relative import of this level starts from."""
    parts = module.split(".")
    if module not in pkg.packages:
        parts = parts[:-1]
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


def import_targets(pkg: Package, module: str, node: ast.stmt) -> list[tuple[str, Optional[str], str]]:
    """(target module, imported attribute or None, local name) for each name an import statement binds to the
    package. `from M import x` gives (M.x, None, x) when M.x is a module, else (M, x, x)."""
    out: list[tuple[str, Optional[str], str]] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] != pkg.name:
                continue
            parts = alias.name.split(".")
            while parts and ".".join(parts) not in pkg.modules:
                parts.pop()
            if parts:
                # `import a.b.c` binds `a`; `import a.b.c as m` binds m to a.b.c
                local = alias.asname or alias.name.split(".")[0]
                out.append((".".join(parts), None, local if alias.asname else f"<import {alias.name}>"))
    elif isinstance(node, ast.ImportFrom):
        target = node.module or ""
        if node.level:
            base = _base(pkg, module, node.level)
            target = f"{base}.{target}" if target else base
        if target.split(".")[0] != pkg.name or target not in pkg.modules:
            return out
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in pkg.modules:
                out.append((sub, None, alias.asname or alias.name))
            else:
                out.append((target, alias.name, alias.asname or alias.name))
    return out


def import_sites(pkg: Package) -> list[Site]:
    sites: list[Site] = []
    for module, tree in pkg.trees.items():
        def visit(node: ast.AST, in_function: bool, type_checking: bool, module: str = module) -> None:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                kind = "type_checking" if type_checking else "function" if in_function else "module"
                for dst, _, _ in import_targets(pkg, module, node):
                    if dst != module:
                        sites.append(Site(module, dst, pkg.rel(module), node.lineno, kind))
                return
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, in_function, True)
                for child in node.orelse:
                    visit(child, in_function, type_checking)
                return
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(child, inner, type_checking)
        visit(tree, False, False)
    return sites


def node_of(pkg: Package, module: str, files: bool) -> str:
    parts = module.split(".")
    if not files and len(parts) > 2 and ".".join(parts[:2]) in pkg.packages:
        return ".".join(parts[:2])
    return module


@dataclass
class Graph:
    nodes: list[str]
    arrows: dict[tuple[str, str], list[Site]]  # runtime arrows -> their import sites
    type_checking_only: dict[tuple[str, str], list[Site]]
    floor: dict[str, int] = field(default_factory=dict)
    circles: list[list[str]] = field(default_factory=list)

    def succ(self, node: str) -> list[str]:
        return sorted(b for a, b in self.arrows if a == node)


def build_graph(pkg: Package, sites: list[Site], files: bool = False) -> Graph:
    nodes = sorted({node_of(pkg, m, files) for m in pkg.modules})
    runtime: dict[tuple[str, str], list[Site]] = {}
    typing_only: dict[tuple[str, str], list[Site]] = {}
    for site in sites:
        pair = (node_of(pkg, site.src, files), node_of(pkg, site.dst, files))
        if pair[0] != pair[1]:
            (runtime if site.kind in RUNTIME else typing_only).setdefault(pair, []).append(site)
    typing_only = {pair: s for pair, s in typing_only.items() if pair not in runtime}
    graph = Graph(nodes, runtime, typing_only)
    components = strongly_connected(graph)
    graph.circles = [sorted(c) for c in components if len(c) > 1]
    graph.floor = floors(graph, components)
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm; components come out sinks first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.succ(v):
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
            out.append(component)

    for v in graph.nodes:
        if v not in index:
            connect(v)
    return out


def floors(graph: Graph, components: list[list[str]]) -> dict[str, int]:
    comp_of = {v: i for i, c in enumerate(components) for v in c}
    level: dict[int, int] = {}
    for i, component in enumerate(components):  # sinks first: every successor component already has its floor
        below = [level[comp_of[w]] for v in component for w in graph.succ(v) if comp_of[w] != i]
        level[i] = 1 + max(below) if below else 0
    return {v: level[comp_of[v]] for v in graph.nodes}


def chain(graph: Graph, circle: list[str]) -> list[Site]:
    """A shortest cycle through the circle's first member, as one import site per arrow."""
    start, members = circle[0], set(circle)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in graph.succ(v):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                nodes = [*reversed(path), start]
                return [graph.arrows[(a, b)][0] for a, b in zip(nodes, nodes[1:])]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return []


def describe_circle(graph: Graph, circle: list[str]) -> str:
    steps = chain(graph, circle)
    path = " -> ".join([s.src for s in steps] + [steps[0].src]) if steps else ""
    lines = [f"circle of {len(circle)}: {', '.join(circle)}", f"  e.g. {path}"]
    lines += [f"    {s.src} -> {s.dst}: {s}" for s in steps]
    return "\n".join(lines)


# --- the cfg walk ---------------------------------------------------------------------------------------------

Func = tuple[str, str]  # (module, qualified name), e.g. ("vkd_dist.run", "build_run"), ("vkd_dist.x", "C.__init__")
Ref = tuple[str, ...]  # ("module", m) | ("class", m, name) | ("func", m, qualname)


class Resolver:
    def __init__(self, pkg: Package):
        self.pkg = pkg
        self.defs: dict[str, dict[str, ast.AST]] = {}
        self.imports: dict[str, dict[str, tuple[str, Optional[str]]]] = {}
        for module, tree in pkg.trees.items():
            self.defs[module] = {n.name: n for n in tree.body
                                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
            self.imports[module] = self.bindings(module, _runtime_module_level(tree.body))

    def bindings(self, module: str, stmts: list[ast.stmt]) -> dict[str, tuple[str, Optional[str]]]:
        out: dict[str, tuple[str, Optional[str]]] = {}
        for stmt in stmts:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                for target, attr, local in import_targets(self.pkg, module, stmt):
                    out[local] = (target, attr)
        return out

    def name(self, module: str, name: str, local: Optional[dict] = None, depth: int = 0) -> Optional[Ref]:
        if depth > 20:
            return None
        if local and name in local:
            return self.target(*local[name], depth=depth + 1)
        node = self.defs.get(module, {}).get(name)
        if isinstance(node, ast.ClassDef):
            return ("class", module, name)
        if node is not None:
            return ("func", module, name)
        if name in self.imports.get(module, {}):
            return self.target(*self.imports[module][name], depth=depth + 1)
        if f"{module}.{name}" in self.pkg.modules:
            return ("module", f"{module}.{name}")
        return None

    def target(self, module: str, attr: Optional[str], depth: int = 0) -> Optional[Ref]:
        return ("module", module) if attr is None else self.name(module, attr, depth=depth)

    def method(self, module: str, cls: str, name: str, seen: Optional[set] = None) -> Optional[Func]:
        seen = seen or set()
        if (module, cls) in seen:
            return None
        seen.add((module, cls))
        node = self.defs[module][cls]
        assert isinstance(node, ast.ClassDef)
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                return (module, f"{cls}.{name}")
        for base in node.bases:
            ref = self.expr(module, base, None, {})
            if ref and ref[0] == "class":
                found = self.method(ref[1], ref[2], name, seen)
                if found:
                    return found
        return None

    def expr(self, module: str, node: ast.expr, cls: Optional[str], local: dict) -> Optional[Ref]:
        if isinstance(node, ast.Name):
            if node.id in ("self", "cls") and cls:
                return ("class", module, cls)
            return self.name(module, node.id, local)
        if isinstance(node, ast.Attribute):
            owner = self.expr(module, node.value, cls, local)
            if owner and owner[0] == "module":
                return self.name(owner[1], node.attr)
            if owner and owner[0] == "class":
                found = self.method(owner[1], owner[2], node.attr)
                return ("func", *found) if found else None
        return None

    def function(self, func: Func) -> ast.FunctionDef | ast.AsyncFunctionDef:
        module, qual = func
        parts = qual.split(".")
        node = self.defs[module][parts[0]]
        if len(parts) == 2:
            assert isinstance(node, ast.ClassDef)
            node = next(s for s in node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and s.name == parts[1])
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        return node


def _runtime_module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    out: list[ast.stmt] = []
    for stmt in body:
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            out += _runtime_module_level(stmt.orelse)
        elif isinstance(stmt, (ast.If, ast.Try)):
            out += _runtime_module_level(stmt.body) + _runtime_module_level(getattr(stmt, "orelse", []))
            for handler in getattr(stmt, "handlers", []):
                out += _runtime_module_level(handler.body)
        else:
            out.append(stmt)
    return out


def _parts(node: ast.expr) -> Optional[list[str]]:
    """`run.cfg.data[0]` -> ["run", "cfg", "data"]; None for anything that is not a name path."""
    names: list[str] = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(names)]


def carries(node: ast.expr, tainted: set[str]) -> bool:
    parts = _parts(node.value if isinstance(node, ast.Starred) else node)
    return bool(parts) and ("cfg" in parts or parts[0] in tainted)  # type: ignore[index]


@dataclass
class Walk:
    files: list[str] = field(default_factory=list)  # distinct files, in the order first entered
    climbs: int = 0
    returns: int = 0
    functions: int = 0
    trace: list[str] = field(default_factory=list)


def walk_cfg(pkg: Package, graph: Graph, files_graph: bool = False, start: Func | None = None) -> Walk:
    resolver = Resolver(pkg)
    start = start or (f"{pkg.name}.train", "train")
    walk = Walk(files=[pkg.rel(start[0])])
    visited: set[Func] = set()
    left: set[str] = set()

    def visit(func: Func, tainted: set[str], depth: int) -> None:
        visited.add(func)
        walk.functions += 1
        module, qual = func
        cls = qual.split(".")[0] if "." in qual else None
        node = resolver.function(func)
        local = resolver.bindings(module, [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))])
        tainted = set(tainted)
        assigns = [n for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None]
        grew = True
        while grew:  # locals assigned a carrier carry it too
            grew = False
            for a in assigns:
                targets = a.targets if isinstance(a, ast.Assign) else [a.target]
                if a.value is not None and carries(a.value, tainted):
                    for t in targets:
                        if isinstance(t, ast.Name) and t.id not in tainted:
                            tainted.add(t.id)
                            grew = True
        calls = sorted((n for n in ast.walk(node) if isinstance(n, ast.Call)),
                       key=lambda n: (n.end_lineno or 0, n.end_col_offset or 0))
        for call in calls:
            args = [a for a in call.args]
            keywords = [k for k in call.keywords if k.arg]
            if not any(carries(a, tainted) for a in args) and not any(carries(k.value, tainted) for k in keywords):
                continue
            ref = resolver.expr(module, call.func, cls, local)
            bound = isinstance(call.func, ast.Attribute) and not (ref and ref[0] == "func" and _is_class_attr(
                resolver, module, call.func, cls, local))
            if ref is None or ref[0] == "module":
                continue
            if ref[0] == "class":
                callee = resolver.method(ref[1], ref[2], "__init__") or resolver.method(ref[1], ref[2], "__post_init__")
                bound = True
            else:
                callee = (ref[1], ref[2])
            if callee is None or callee in visited:
                continue
            target = resolver.function(callee)
            decorators = {d.id for d in target.decorator_list if isinstance(d, ast.Name)}
            params = [a.arg for a in target.args.posonlyargs + target.args.args]
            if "." in callee[1] and "staticmethod" not in decorators and (bound or "classmethod" in decorators):
                params = params[1:]
            received: set[str] = set()
            for param, arg in zip(params, args):
                if isinstance(arg, ast.Starred):
                    break
                if carries(arg, tainted):
                    received.add(param)
            received |= {k.arg for k in keywords if carries(k.value, tainted)}  # type: ignore[misc]
            here, there = pkg.rel(module), pkg.rel(callee[0])
            line = f"{'  ' * depth}{here}:{call.lineno} -> {callee[0]}.{callee[1]}"
            if here != there:
                left.add(here)
                marks = []
                if there in left:
                    walk.returns += 1
                    marks.append("return to a file left")
                if graph.floor[node_of(pkg, callee[0], files_graph)] > graph.floor[node_of(pkg, module, files_graph)]:
                    walk.climbs += 1
                    marks.append("climb")
                if there not in walk.files:
                    walk.files.append(there)
                line += f"  [{there}{'; ' + ', '.join(marks) if marks else ''}]"
            walk.trace.append(line)
            visit(callee, received, depth + 1)
            if here != there:
                left.add(there)

    node = resolver.function(start)
    params = {a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs}
    visit(start, {"cfg"} & params, 0)
    return walk


def _is_class_attr(resolver: Resolver, module: str, func: ast.Attribute, cls: Optional[str], local: dict) -> bool:
    """`Class.method(...)` (unbound: the first argument is `self`) rather than `self.method(...)`."""
    if isinstance(func.value, ast.Name) and func.value.id in ("self", "cls"):
        return False
    owner = resolver.expr(module, func.value, cls, local)
    return bool(owner and owner[0] == "class")


# --- the report -----------------------------------------------------------------------------------------------

def measure(root: Path, files: bool = False) -> dict:
    pkg = load_package(root)
    sites = import_sites(pkg)
    graph = build_graph(pkg, sites, files)
    per_file = graph if files else build_graph(pkg, sites, files=True)
    walk = walk_cfg(pkg, graph, files)
    top = max(graph.floor.values(), default=-1)

    def circles(g: Graph) -> list[dict]:
        return [{"members": c, "chain": [{"from": s.src, "to": s.dst, "file": s.file, "line": s.line, "kind": s.kind}
                                         for s in chain(g, c)], "text": describe_circle(g, c)} for c in g.circles]

    return {
        "root": str(pkg.root), "convention": "files" if files else "subpackages",
        "files": len(pkg.modules), "nodes": len(graph.nodes), "arrows": len(graph.arrows), "floors": top + 1,
        "arrows_function_only": sum(all(s.kind == "function" for s in v) for v in graph.arrows.values()),
        "floor": {n: graph.floor[n] for n in sorted(graph.nodes, key=lambda n: (-graph.floor[n], n))},
        "circles": circles(graph),
        "file_circles": [] if files else circles(per_file),
        "type_checking_only": [{"from": a, "to": b, "sites": [str(s) for s in v]}
                               for (a, b), v in sorted(graph.type_checking_only.items())],
        "cfg_walk": {"start": f"{pkg.name}.train.train", "files_visited": len(walk.files), "climbs": walk.climbs,
                     "returns_to_a_file_left": walk.returns, "functions": walk.functions, "files": walk.files,
                     "trace": walk.trace},
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.house", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="vkd_dist", help="the package directory (default: vkd_dist)")
    parser.add_argument("--files", action="store_true", help="every module its own node (default: subpackages)")
    parser.add_argument("--trace", action="store_true", help="print the cfg walk call by call")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    report = measure(Path(args.root), args.files)
    walk = report["cfg_walk"]
    print(f"{report['root']} ({report['convention']}): {report['files']} files as {report['nodes']} nodes on "
          f"{report['floors']} floors with {report['arrows']} arrows ({report['arrows_function_only']} only through "
          f"function-level imports; {len(report['type_checking_only'])} more only under TYPE_CHECKING)")
    by_floor: dict[int, list[str]] = {}
    for n, f in report["floor"].items():
        by_floor.setdefault(f, []).append(n.split(".", 1)[-1] if "." in n else n)
    for f in sorted(by_floor, reverse=True):
        print(f"  floor {f:2d}: {' '.join(by_floor[f])}")
    found = report["circles"] + [c for c in report["file_circles"]
                                 if not any(set(c["members"]) <= set(d["members"]) for d in report["circles"])]
    print(f"import circles: {len(report['circles'])}" + (f" (+{len(found) - len(report['circles'])} between modules "
                                                         "of one subpackage)" if len(found) > len(report["circles"])
                                                         else ""))
    for c in report["circles"] + report["file_circles"]:
        print(c["text"])
    for t in report["type_checking_only"]:
        print(f"TYPE_CHECKING only (not a circle): {t['from']} -> {t['to']}: {', '.join(t['sites'])}")
    print(f"cfg from {walk['start']}: {walk['files_visited']} files visited ({walk['functions']} functions), "
          f"{walk['climbs']} climbs back up a floor, {walk['returns_to_a_file_left']} returns to a file already left")
    if args.trace:
        print("\n".join(walk["trace"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
