"""The house of vkd_dist (benchmarks/house.py): no import circle inside the package, function-level imports
included and TYPE_CHECKING-only imports excluded; and the tool itself, on tiny packages written to tmp_path."""

import sys
import textwrap
from pathlib import Path

from conftest import REPO

if str(REPO) not in sys.path:  # the benchmarks package, as `python -m benchmarks.house` sees it
    sys.path.insert(0, str(REPO))

from benchmarks import house  # noqa: E402


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_no_import_circles_in_the_package():
    circles = house.import_circles(REPO / "vkd_dist")
    assert not circles, ("import circles in vkd_dist (function-level imports count; `python -m benchmarks.house` "
                         "draws the house):\n" + "\n".join(circles))
    between = house.measure(REPO / "vkd_dist")["subpackage_circles"]
    assert not between, f"circles between subpackages (each one node): {between}"


def test_a_function_level_import_closes_a_circle_and_a_type_checking_one_does_not(tmp_path):
    root = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": """\
            import os


            def later():
                from pkg.a import something  # lazy, but a circle all the same
                return something
            """,
        "pkg/c.py": "from .d import thing\n",
        "pkg/d.py": """\
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from pkg.c import thing
            else:
                thing = None
            """,
    })
    report = house.measure(root)
    assert [c["members"] for c in report["circles"]] == [["pkg.a", "pkg.b"]]
    chain = report["circles"][0]["chains"][0]
    assert [(s["file"], s["line"], s["kind"]) for s in chain] == [("pkg/a.py", 1, "module"),
                                                                   ("pkg/b.py", 5, "function")]
    text = "\n".join(house.import_circles(root))
    assert "pkg/a.py:1" in text and "pkg/b.py:5" in text and "function level" in text
    assert report["type_checking_only"] == [{"from": "pkg.d", "to": "pkg.c", "sites": ["pkg/d.py:4"]}]
    assert report["nodes"] == 5 and report["arrows"] == 3  # a->b, b->a, c->d (relative import resolved)
    assert report["floor"]["pkg.c"] == 1 and report["floor"]["pkg.d"] == 0 and report["floors"] == 2


def test_subpackages_are_one_node_and_a_package_importing_its_own_parts_is_no_circle(tmp_path):
    root = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/top.py": "from pkg.sub import registry\nfrom pkg import base\n",
        "pkg/base.py": "",
        "pkg/sub/__init__.py": """\
            from pkg import base


            def registry():
                from pkg.sub import part  # fills the registry: the family imports itself
                return part
            """,
        "pkg/sub/part.py": "from pkg.sub import registry\nfrom . import other\n",
        "pkg/sub/other.py": "def f():\n    from pkg.sub.part import registry\n",
    })
    report = house.measure(root)
    assert report["files"] == 6 and report["nodes"] == 4  # pkg, pkg.base, pkg.sub, pkg.top
    assert report["arrows"] == 3  # top->sub, top->base, sub->base; arrows inside pkg.sub are not arrows
    assert report["floors"] == 3 and report["floor"] == {"pkg.top": 2, "pkg.sub": 1, "pkg": 0, "pkg.base": 0}
    assert report["subpackage_circles"] == []
    # part <-> other inside the subpackage: hidden by the node graph, found module by module; the subpackage's
    # __init__ importing part lazily while part imports the __init__ is not a circle
    assert [c["members"] for c in report["circles"]] == [["pkg.sub.other", "pkg.sub.part"]]
    assert len(house.import_circles(root)) == 1


def test_circles_between_subpackages_are_reported_apart(tmp_path):
    root = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/one/__init__.py": "",
        "pkg/one/a.py": "from pkg.two import b\n",
        "pkg/one/c.py": "",
        "pkg/two/__init__.py": "",
        "pkg/two/b.py": "",
        "pkg/two/d.py": "def f():\n    from pkg.one import c\n",
    })
    report = house.measure(root)
    assert report["circles"] == [] and house.import_circles(root) == []
    assert [c["members"] for c in report["subpackage_circles"]] == [["pkg.one", "pkg.two"]]


def test_cfg_walk_counts_files_climbs_and_returns(tmp_path):
    root = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/train.py": """\
            from pkg import a, b


            def train(cfg, stop=None):
                a.f(cfg)
                b.g(cfg.data)
                a.h(x=cfg)
                a.unrelated(1)
                a.f(cfg)  # visited already: not followed
            """,
        "pkg/a.py": """\
            from pkg.b import g2


            def f(cfg):
                g2(cfg)


            def h(x):
                pass


            def k(section):
                pass


            def unrelated(n):
                pass
            """,
        "pkg/b.py": """\
            def g(d):
                from pkg.a import k

                k(d)  # d received cfg.data; a climb through a lazy import


            def g2(c):
                pass
            """,
    })
    walk = house.measure(root)["cfg_walk"]
    # train -> a.f (a) -> b.g2 (b) ; train -> b.g (b again) -> a.k (a again, climb) ; train -> a.h (a again)
    assert walk["files"] == ["pkg/train.py", "pkg/a.py", "pkg/b.py"]
    assert walk["functions"] == 6  # train, f, g2, g, k, h
    assert walk["returns_to_a_file_left"] == 3
    assert walk["climbs"] == 1
