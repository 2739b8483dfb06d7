"""The house of vkd_dist, measured from its source with `ast` (nothing is imported or run; standard library only).

    python -m benchmarks.house [--root vkd_dist] [--files] [--trace] [--json OUT]   # exit 1: an import circle

1. The import graph. Nodes: by default a subpackage directly under the root is ONE node (`config/`, `data/` with
   `data/sources/`, `models/`, `objectives/`), every other module one node, the root's `__init__.py` included
   (`vkd_dist`): it comes closest to issue 21's "30 files". `--files`: a node per module.
   Arrows: imports of another module of the package at ANY depth, kinds "module" (module level, class bodies),
   "function" (inside a function) and "type_checking" (inside `if TYPE_CHECKING:`; its `else:` is runtime).
   Relative imports are resolved; `from P import x` points to the module `P.x` if there is one, else to `P`;
   `import a.b.c` to `a.b.c` (not to the parents Python runs first). An arrow is a distinct (node, node) pair;
   imports inside one node are none. Arrows only under TYPE_CHECKING never run: listed apart, they take no part in
   floors, circles or the walk.
   Floors: longest-path layering of the condensation (a strongly connected component is one node): floor 0
   imports nothing of the package, floor n something on floor n-1 and nothing higher. Module-level floors: the
   same over the arrows with a module-level import (the house Python builds on import).
   Import circles: sought module by module whatever the convention, leaving out arrows from a module to a package
   holding it (Python runs that `__init__` first anyway: a package importing its own parts lazily, as the registry
   of `data/sources/` does, is no circle). Each strongly connected component of two modules or more is a circle,
   shown with a shortest cycle through each member (distinct ones once; the first is the example), each step with
   file, line and kind. Circles between subpackages (components of the node graph) are reported apart: they can
   exist without a circle of modules, and do not fail the command.
2. The walk of `cfg` from `vkd_dist.train.train`. In a visited function a value carries the config when it is a
   name, attribute path or subscript with a part called `cfg` (`cfg`, `cfg.data`, `run.cfg`, `self.cfg.model`,
   `cfg.paths[0]`; `run` alone does not), or rooted at a tainted name: a parameter that received a carrier, or a
   local assigned one (`data = cfg.data`). Calls are taken in evaluation order (by where their argument list
   closes: `f(g(cfg))` calls g first). A call is followed when an argument (positional or keyword) carries the
   config and the callee resolves to a function of the package: a name defined or imported at module level or in
   the function (re-exports followed), `module.f`, `Class.f`, `self.f`/`cls.f` (through bases in the package), or
   a class: its `__init__`, else `__post_init__`, else nothing. Calls on other objects (`run.log.info(cfg)`) and
   callables passed as values are not resolved. Arguments map to parameters by position (skipping self/cls when
   bound) and keyword. Nested functions and lambdas belong to the function holding them. Each function is visited
   once, depth first; a call to one visited already records nothing. Counted on calls from one file into another:
   - files visited: the distinct files the walk is in, train.py included;
   - climbs back up a floor: the callee's node is on a higher MODULE-LEVEL floor than the caller's: a call up
     through a function-level import (on the floors of all runtime arrows none can climb: callers import callees);
   - returns to a file already left: the callee's file is one the walk left before (by calling out of it or
     returning from it); coming back to the caller when a callee returns is not counted.

Figures (default convention), measured 2026-12-02: cde58b2 (before issue 21's work): 56 files, 28 nodes, 97 arrows,
8 floors (7 module-level), 1 import circle of 7 modules; cfg walk 25 files, 0 climbs, 16 returns. After it (see its
closing note): 62 files, 36 nodes, 132 arrows, 11 floors (8), no import circle, none between subpackages either;
walk 28 / 0 / 8. Issue 21's 12 floors, 114 arrows, 2 circles and walk of 24 / 24 / 39 come from
rules it does not give; the circle of 7 holds both its circles (config -> models.text_init or strategy -> config;
evaluate <-> prepare) and a third (models.text_init <-> prepare).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

RUNTIME = ("module", "function")
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
Arrows = dict[tuple[str, str], list["Site"]]


@dataclass(frozen=True)
class Site:  # one import of a package module by another
    src: str
    dst: str
    file: str
    line: int
    kind: str  # "module" | "function" | "type_checking"


@dataclass
class Package:
    root: Path
    name: str
    modules: dict[str, Path]  # dotted name -> file
    trees: dict[str, ast.Module]
    packages: set[str]  # the modules that are packages (an __init__.py)

    def rel(self, module: str) -> str:
        return self.modules[module].relative_to(self.root.parent).as_posix()


def load_package(root: Path) -> Package:
    root = root.resolve()
    pkg = Package(root, root.name, {}, {}, set())
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
            pkg.packages.add(".".join(parts))
        pkg.modules[".".join(parts)] = path
        pkg.trees[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return pkg


def _is_type_checking(test: ast.expr) -> bool:
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def import_targets(pkg: Package, module: str, node: ast.stmt) -> list[tuple[str, Optional[str], str]]:
    """(module imported, attribute taken from it or None, local name) for each package name the statement binds:
    `from M import x` gives (M.x, None, x) when M.x is a module, else (M, x, x)."""
    out: list[tuple[str, Optional[str], str]] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            while parts and ".".join(parts) not in pkg.modules:
                parts.pop()
            if parts:  # `import a.b as m` binds m to a.b; `import a.b` binds a, the root, found by name
                out.append((".".join(parts), None, alias.asname or f"<import {alias.name}>"))
    elif isinstance(node, ast.ImportFrom):
        target = node.module or ""
        if node.level:  # relative: from the module's package, one package up per extra dot
            base = module.split(".")[: None if module in pkg.packages else -1]
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([target] if target else []))
        if target not in pkg.modules:
            return out
        for alias in node.names:
            local = alias.asname or alias.name
            sub = f"{target}.{alias.name}"
            out.append((sub, None, local) if sub in pkg.modules else (target, alias.name, local))
    return out


def import_sites(pkg: Package) -> list[Site]:
    sites: list[Site] = []

    def visit(module: str, node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            kind = "type_checking" if type_checking else "function" if in_function else "module"
            sites.extend(Site(module, dst, pkg.rel(module), node.lineno, kind)
                         for dst, _, _ in import_targets(pkg, module, node) if dst != module)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(module, stmt, in_function, True)
            for stmt in node.orelse:
                visit(module, stmt, in_function, type_checking)
        else:
            inner = in_function or isinstance(node, (*DEFS, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(module, child, inner, type_checking)

    for module, tree in pkg.trees.items():
        visit(module, tree, False, False)
    return list(dict.fromkeys(sites))  # `from m import a, b` is one site


def node_of(pkg: Package, module: str, files: bool) -> str:
    parts = module.split(".")
    if not files and len(parts) > 2 and ".".join(parts[:2]) in pkg.packages:
        return ".".join(parts[:2])
    return module


def successors(arrows: Arrows) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a, b in sorted(arrows):
        out.setdefault(a, []).append(b)
    return out


def components(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components, each sorted, sinks first (by reachability: these graphs are small)."""
    reach: dict[str, set[str]] = {}
    for v in nodes:
        seen, todo = {v}, [v]
        while todo:
            for w in succ.get(todo.pop(), []):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        reach[v] = seen
    found = {frozenset(w for w in reach[v] if v in reach[w]) for v in nodes}
    # one component reaching another reaches strictly more nodes, so this order puts what it imports first
    return sorted((sorted(c) for c in found), key=lambda c: (len(reach[c[0]]), c))


def floors(nodes: list[str], arrows: Arrows) -> dict[str, int]:
    succ, floor = successors(arrows), dict[str, int]()
    for component in components(nodes, succ):
        below = [floor[w] for v in component for w in succ.get(v, []) if w not in component]
        floor.update({v: 1 + max(below) if below else 0 for v in component})
    return floor


@dataclass
class Graph:
    nodes: list[str]
    arrows: Arrows  # runtime arrows -> their import sites
    type_checking_only: Arrows
    upward: Arrows  # the arrows that can close a circle: all but those from a module to a package holding it
    floor: dict[str, int] = field(default_factory=dict)  # layered by every runtime arrow
    module_floor: dict[str, int] = field(default_factory=dict)  # layered by module-level arrows only
    circles: list[list[str]] = field(default_factory=list)


def build_graph(pkg: Package, sites: list[Site], files: bool = False) -> Graph:
    nodes = sorted({node_of(pkg, m, files) for m in pkg.modules})
    runtime: Arrows = {}
    typing_only: Arrows = {}
    for site in sites:
        pair = (node_of(pkg, site.src, files), node_of(pkg, site.dst, files))
        if pair[0] != pair[1]:
            (runtime if site.kind in RUNTIME else typing_only).setdefault(pair, []).append(site)
    upward = {pair: [s for s in v if not s.src.startswith(s.dst + ".")] for pair, v in runtime.items()}
    graph = Graph(nodes, runtime, {k: v for k, v in typing_only.items() if k not in runtime},
                  {pair: v for pair, v in upward.items() if v})
    graph.floor = floors(nodes, runtime)
    graph.module_floor = floors(nodes, {k: v for k, v in runtime.items() if any(s.kind == "module" for s in v)})
    graph.circles = sorted(c for c in components(nodes, successors(graph.upward)) if len(c) > 1)
    return graph


def chain(graph: Graph, circle: list[str], start: str) -> list[tuple[str, str, Site]]:
    """A shortest cycle through `start` inside the circle: (node, node, first import site) per arrow."""
    succ, members, parent = successors(graph.upward), set(circle), dict[str, str]()
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in succ.get(v, []):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                nodes = [*reversed(path), start]
                return [(a, b, graph.upward[(a, b)][0]) for a, b in zip(nodes, nodes[1:])]
            if w in members and w not in parent:
                parent[w] = v
                queue.append(w)
    return []


def chains(graph: Graph, circle: list[str]) -> list[list[tuple[str, str, Site]]]:
    """A shortest cycle through each member, each distinct cycle once: the first is the example."""
    out, seen = [], set()
    for member in circle:
        steps = chain(graph, circle, member)
        if steps and frozenset((a, b) for a, b, _ in steps) not in seen:
            seen.add(frozenset((a, b) for a, b, _ in steps))
            out.append(steps)
    return out


def describe_circle(graph: Graph, circle: list[str]) -> str:
    lines = [f"import circle of {len(circle)}: {', '.join(circle)}"]
    for i, steps in enumerate(chains(graph, circle)):
        lines.append(("  e.g. " if i == 0 else "  also ") + " -> ".join([a for a, _, _ in steps] + [steps[0][0]]))
        lines += [f"    {a} -> {b}: {x.file}:{x.line} imports {x.dst} ({x.kind} level)" for a, b, x in steps]
    return "\n".join(lines)


# --- the cfg walk ---------------------------------------------------------------------------------------------

Func = tuple[str, str]  # (module, qualified name): ("vkd_dist.run", "build_run"), ("vkd_dist.x", "C.__init__")
Ref = tuple[str, ...]  # ("module", m) | ("class", m, name) | ("func", m, qualname)


def _runtime_module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run on import, into `if`/`try` blocks (not TYPE_CHECKING's body) but not into functions."""
    out: list[ast.stmt] = []
    for stmt in body:
        if isinstance(stmt, ast.If):
            out += _runtime_module_level(stmt.orelse if _is_type_checking(stmt.test) else stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            blocks = [stmt.body, stmt.orelse, stmt.finalbody, *(h.body for h in stmt.handlers)]
            out += [x for block in blocks for x in _runtime_module_level(block)]
        else:
            out.append(stmt)
    return out


class Resolver:
    """What a name or attribute path means in a module of the package, through imports and re-exports."""

    def __init__(self, pkg: Package):
        self.pkg = pkg
        self.defs = {m: {n.name: n for n in tree.body if isinstance(n, (*DEFS, ast.ClassDef))}
                     for m, tree in pkg.trees.items()}
        self.imports = {m: self.bindings(m, _runtime_module_level(t.body)) for m, t in pkg.trees.items()}

    def bindings(self, module: str, stmts: list) -> dict[str, tuple[str, Optional[str]]]:
        return {local: (target, attr) for stmt in stmts if isinstance(stmt, (ast.Import, ast.ImportFrom))
                for target, attr, local in import_targets(self.pkg, module, stmt)}

    def name(self, module: str, name: str, local: Optional[dict] = None, depth: int = 0) -> Optional[Ref]:
        node = self.defs.get(module, {}).get(name)
        bound = (local or {}).get(name) or self.imports.get(module, {}).get(name)
        if depth > 20:
            return None
        if local and name in local or node is None and bound:
            target, attr = bound  # type: ignore[misc]
            return ("module", target) if attr is None else self.name(target, attr, depth=depth + 1)
        if node is not None:
            return ("class" if isinstance(node, ast.ClassDef) else "func", module, name)
        if f"{module}.{name}" in self.pkg.modules:
            return ("module", f"{module}.{name}")
        return ("module", name) if name == self.pkg.name else None

    def method(self, module: str, cls: str, name: str, depth: int = 0) -> Optional[Func]:
        node = self.defs[module][cls]
        assert isinstance(node, ast.ClassDef)
        if any(isinstance(s, DEFS) and s.name == name for s in node.body):
            return (module, f"{cls}.{name}")
        for base in node.bases if depth < 20 else []:
            ref = self.expr(module, base, None, {})
            found = self.method(ref[1], ref[2], name, depth + 1) if ref and ref[0] == "class" else None
            if found:
                return found
        return None

    def expr(self, module: str, node: ast.expr, cls: Optional[str], local: dict) -> Optional[Ref]:
        if isinstance(node, ast.Name):
            return ("class", module, cls) if node.id in ("self", "cls") and cls else self.name(module, node.id, local)
        owner = self.expr(module, node.value, cls, local) if isinstance(node, ast.Attribute) else None
        if owner and owner[0] == "module":
            return self.name(owner[1], node.attr)  # type: ignore[attr-defined]
        if owner and owner[0] == "class":
            found = self.method(owner[1], owner[2], node.attr)  # type: ignore[attr-defined]
            return ("func", *found) if found else None
        return None

    def function(self, func: Func) -> ast.FunctionDef | ast.AsyncFunctionDef:
        module, qual = func
        node = self.defs.get(module, {}).get(qual.split(".")[0])
        if "." in qual and isinstance(node, ast.ClassDef):
            node = next(s for s in node.body if isinstance(s, DEFS) and s.name == qual.split(".")[1])
        assert isinstance(node, DEFS), func
        return node


def carries(node: ast.expr, tainted: set[str]) -> bool:
    """A name path (`run.cfg.data[0]`) with a part called `cfg`, or rooted at a tainted name."""
    names: list[str] = []
    node = node.value if isinstance(node, ast.Starred) else node
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        names += [node.attr] if isinstance(node, ast.Attribute) else []
        node = node.value
    return isinstance(node, ast.Name) and ("cfg" in names or node.id == "cfg" or node.id in tainted)


def _tainted(node: ast.AST, tainted: set[str]) -> set[str]:
    """The names that carry the config in a function: `tainted` and the locals assigned from one, to a fixpoint."""
    tainted = set(tainted)
    assigns = [(n.targets if isinstance(n, ast.Assign) else [n.target], n.value) for n in ast.walk(node)
               if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None]
    while True:
        new = {t.id for targets, value in assigns if carries(value, tainted)
               for t in targets if isinstance(t, ast.Name)} - tainted
        if not new:
            return tainted
        tainted |= new


def walk_cfg(pkg: Package, graph: Graph, files: bool = False, start: Optional[Func] = None) -> dict:
    resolver = Resolver(pkg)
    start = start or (f"{pkg.name}.train", "train")
    found = isinstance(resolver.defs.get(start[0], {}).get(start[1]), DEFS)  # else there is nothing to walk
    walk: dict[str, Any] = {"start": ".".join(start), "files_visited": 0, "climbs": 0, "returns_to_a_file_left": 0,
                            "functions": 0, "files": [pkg.rel(start[0])] if found else [], "trace": []}
    visited: set[Func] = set()
    left: set[str] = set()
    floor = graph.module_floor  # against every runtime arrow no call climbs: a caller imports what it calls

    def callee_of(module: str, call: ast.Call, cls: Optional[str], local: dict) -> tuple[Optional[Func], bool]:
        """The function a call enters, and whether it is bound (its first parameter, self or cls, is not an
        argument of the call)."""
        ref = resolver.expr(module, call.func, cls, local)
        if ref is None or ref[0] == "module":
            return None, False
        if ref[0] == "class":
            return resolver.method(ref[1], ref[2], "__init__") or resolver.method(ref[1], ref[2], "__post_init__"), True
        owner = call.func.value if isinstance(call.func, ast.Attribute) else None
        by_class = owner is not None and getattr(owner, "id", None) not in ("self", "cls") and (
            (resolver.expr(module, owner, cls, local) or ("",))[0] == "class")
        return (ref[1], ref[2]), owner is not None and not by_class

    def visit(func: Func, tainted: set[str], depth: int) -> None:
        visited.add(func)
        walk["functions"] += 1
        module, qual = func
        cls = qual.split(".")[0] if "." in qual else None
        node = resolver.function(func)
        local = resolver.bindings(module, [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))])
        tainted = _tainted(node, tainted)
        calls = sorted((n for n in ast.walk(node) if isinstance(n, ast.Call)),
                       key=lambda n: (n.end_lineno or 0, n.end_col_offset or 0))
        for call in calls:
            keywords = {k.arg: k.value for k in call.keywords if k.arg}
            if not any(carries(a, tainted) for a in [*call.args, *keywords.values()]):
                continue
            callee, bound = callee_of(module, call, cls, local)
            if callee is None or callee in visited:
                continue
            target = resolver.function(callee)
            decorators = {getattr(d, "id", None) for d in target.decorator_list}
            params = [a.arg for a in target.args.posonlyargs + target.args.args]
            if "." in callee[1] and "staticmethod" not in decorators and (bound or "classmethod" in decorators):
                params = params[1:]
            positional = itertools.takewhile(lambda a: not isinstance(a, ast.Starred), call.args)
            received = {p for p, a in [*zip(params, positional), *keywords.items()] if carries(a, tainted)}
            here, there = pkg.rel(module), pkg.rel(callee[0])
            line = f"{'  ' * depth}{here}:{call.lineno} -> {callee[0]}.{callee[1]}"
            if here != there:
                left.add(here)
                climb = floor[node_of(pkg, callee[0], files)] > floor[node_of(pkg, module, files)]
                marks = ["return to a file left"] * (there in left) + ["climb"] * climb
                walk["returns_to_a_file_left"] += there in left
                walk["climbs"] += climb
                walk["files"] += [there] if there not in walk["files"] else []
                line += f"  [{'; '.join([there, *marks])}]"
            walk["trace"].append(line)
            visit(callee, received, depth + 1)
            if here != there:
                left.add(there)

    if found:
        visit(start, set(), 0)  # the parameter `cfg` carries it by name
    return {**walk, "files_visited": len(walk["files"])}


# --- the report -----------------------------------------------------------------------------------------------

def circle_report(graph: Graph) -> list[dict]:
    """Each circle: its members, its cycles (file and line of each import; the first is the example), as text."""
    def arrows(steps: list[tuple[str, str, Site]]) -> list[dict]:
        return [{"from": a, "to": b, "file": x.file, "line": x.line, "imports": x.dst, "kind": x.kind}
                for a, b, x in steps]

    return [{"members": c, "text": describe_circle(graph, c), "chains": [arrows(s) for s in chains(graph, c)]}
            for c in graph.circles]


def measure(root: Path, files: bool = False) -> dict:
    """Everything the command prints, as one JSON-able dict. `circles`: the import circles, module by module;
    `subpackage_circles`: the circles of the node graph, which can exist without a circle of modules."""
    pkg = load_package(root)
    sites = import_sites(pkg)
    graph = build_graph(pkg, sites, files)
    per_file = graph if files else build_graph(pkg, sites, files=True)
    walk = walk_cfg(pkg, graph, files)
    order = sorted(graph.nodes, key=lambda n: (-graph.floor[n], n))
    return {
        "root": str(pkg.root), "convention": "files" if files else "subpackages",
        "files": len(pkg.modules), "nodes": len(graph.nodes), "arrows": len(graph.arrows),
        "floors": max(graph.floor.values(), default=-1) + 1,
        "module_level_floors": max(graph.module_floor.values(), default=-1) + 1,
        "arrows_function_only": sum(all(s.kind == "function" for s in v) for v in graph.arrows.values()),
        "floor": {n: graph.floor[n] for n in order},
        "module_floor": {n: graph.module_floor[n] for n in order},
        "circles": circle_report(per_file),
        "subpackage_circles": [] if files else circle_report(graph),
        "type_checking_only": [{"from": a, "to": b, "sites": [f"{s.file}:{s.line}" for s in v]}
                               for (a, b), v in sorted(graph.type_checking_only.items())],
        "cfg_walk": walk,
    }


def import_circles(root: Path) -> list[str]:
    """Every import circle of the package, module by module, described (empty: none). For tests."""
    return [c["text"] for c in measure(root, files=True)["circles"]]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.house", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="vkd_dist", help="the package directory (default: vkd_dist)")
    parser.add_argument("--files", action="store_true", help="every module its own node (default: subpackages)")
    parser.add_argument("--trace", action="store_true", help="print the cfg walk call by call")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    report = measure(Path(args.root), args.files)
    print(f"{report['root']} ({report['convention']}): {report['files']} files as {report['nodes']} nodes on "
          f"{report['floors']} floors ({report['module_level_floors']} by module-level imports alone) with "
          f"{report['arrows']} arrows ({report['arrows_function_only']} only through function-level imports; "
          f"{len(report['type_checking_only'])} more only under TYPE_CHECKING)")
    for f in range(report["floors"] - 1, -1, -1):
        print(f"  floor {f:2d}: {' '.join(n.split('.', 1)[-1] for n, g in report['floor'].items() if g == f)}")
    print("\n".join([f"import circles: {len(report['circles'])}", *(c["text"] for c in report["circles"])]))
    if report["subpackage_circles"]:
        print(f"circles between subpackages (each one node): {len(report['subpackage_circles'])}")
        print("\n".join(c["text"].replace("import circle", "circle", 1) for c in report["subpackage_circles"]))
    for t in report["type_checking_only"]:
        print(f"TYPE_CHECKING only (not a circle): {t['from']} -> {t['to']}: {', '.join(t['sites'])}")
    walk = report["cfg_walk"]
    print(f"cfg from {walk['start']}: {walk['files_visited']} files visited ({walk['functions']} functions), "
          f"{walk['climbs']} climbs back up a floor, {walk['returns_to_a_file_left']} returns to a file already left")
    print("\n".join(walk["trace"]) if args.trace else "", end="\n" if args.trace else "")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["circles"] else 0


if __name__ == "__main__":
    sys.exit(main())
