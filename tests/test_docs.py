"""Every relative link and image in README.md and docs/**/*.md resolves: the target file (or folder) exists, and an
#anchor names a heading of the target Markdown file (GitHub's slugs). Links with a scheme (https:, mailto:, ...)
are not followed. A failure names the file, the line and the link."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional <...> around the target and an optional "title"
INLINE_LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_ATTR = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
GITHUB_LINE_ANCHOR = re.compile(r"^L\d+(-L\d+)?$")


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; inline code spans blanked unless `blank_code` is false."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        if match:
            fence = match.group(1)
            continue
        out.append((number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line) if blank_code else line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, every character but letters, digits, `_`,
    `-` and spaces dropped, spaces made hyphens (not collapsed)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)  # emphasis markers (a single `_` stays: GitHub keeps it in words)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (ATX and setext), duplicates numbered -1, -2, ... as GitHub does."""
    lines = prose_lines(path.read_text(encoding="utf-8"), blank_code=False)
    seen: dict[str, int] = {}
    found: set[str] = set()
    previous = ""
    for _, line in lines:
        heading = None
        match = ATX_HEADING.match(line)
        if match:
            heading = match.group(2)
        elif re.match(r"^\s{0,3}(=+|-+)\s*$", line) and previous.strip() and not previous.lstrip().startswith(
            ("|", "-", "*", "+", ">")
        ):
            heading = previous.strip()
        if heading is not None:
            base = slug(heading)
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        previous = line
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link, image, reference definition and HTML href/src in a Markdown file."""
    out: list[tuple[int, str]] = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for pattern in (INLINE_LINK, REFERENCE_DEF, HTML_ATTR):
            for match in pattern.finditer(line):
                target = match.group(1)
                if target.startswith("<") and target.endswith(">"):
                    target = target[1:-1]
                out.append((number, target))
    return out


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """One message per relative link of `path` whose file or #anchor does not resolve."""
    problems: list[str] = []
    name = path.relative_to(root) if path.is_relative_to(root) else path
    for number, target in links(path):
        if SCHEME.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = urllib.parse.unquote(file_part)
        anchor = urllib.parse.unquote(anchor)
        if not file_part:
            resolved = path
        elif file_part.startswith("/"):
            resolved = root / file_part.lstrip("/")
        else:
            resolved = path.parent / file_part
        where = f"{name}:{number}: link {target!r}"
        if not resolved.exists():
            problems.append(f"{where}: no file {file_part!r} (looked for {resolved})")
            continue
        if not anchor:
            continue
        if resolved.is_file() and resolved.suffix.lower() == ".md":
            known = anchors(resolved)
            if anchor.lower() not in known:
                listed = ", ".join(sorted(known))
                problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.name} (anchors: {listed})")
        elif resolved.is_file() and GITHUB_LINE_ANCHOR.match(anchor):
            continue
        else:
            problems.append(f"{where}: #{anchor} on {file_part!r}, which is not a Markdown file")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_docs_exist_and_readme_links_each() -> None:
    docs = sorted((REPO / "docs").rglob("*.md"))
    assert docs, "docs/ holds no Markdown file"
    readme_targets = {
        (REPO / urllib.parse.unquote(t.partition("#")[0])).resolve()
        for _, t in links(REPO / "README.md")
        if not SCHEME.match(t) and t.partition("#")[0]
    }
    missing = [str(d.relative_to(REPO)) for d in docs if d.resolve() not in readme_targets]
    assert not missing, f"README.md's table of docs does not link {missing}"


def test_slugs_follow_github() -> None:
    assert slug("Evidence: does VKD beat image-only?") == "evidence-does-vkd-beat-image-only"
    assert slug("The paper's setting") == "the-papers-setting"
    assert slug("Scaling out: several GPUs and several nodes") == "scaling-out-several-gpus-and-several-nodes"
    assert (
        slug("Measured (2026-11-30, trained with `data.missing=mask`): why VKD trails")
        == "measured-2026-11-30-trained-with-datamissingmask-why-vkd-trails"
    )
    assert slug("How vkd_distil was chosen") == "how-vkd_distil-was-chosen"
    assert slug("A -- B") == "a----b"


def test_checker_names_file_and_link(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text(
        "# Title\n\n## Part one\n\n## Part one\n\n```\n# not a heading\n```\n\n## With `code.key=x` (2026)\n"
    )
    (tmp_path / "docs" / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "README.md").write_text(
        "# Top\n"
        "[ok](docs/b.md#part-one) [ok2](docs/b.md#part-one-1) ![img](docs/pic.png) [self](#top)\n"
        "[code](docs/b.md#with-codekeyx-2026)\n"
        "[web](https://example.com/x#y) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](docs/missing.md) [bad anchor](docs/b.md#not-a-heading) ![no image](docs/nope.png)\n"
        "[ref]: docs/also-missing.md\n"
    )
    problems = broken_links(tmp_path / "README.md", root=tmp_path)
    assert len(problems) == 4, problems
    assert problems[0].startswith("README.md:8: link 'docs/missing.md': no file")
    assert "README.md:8: link 'docs/b.md#not-a-heading': no heading with anchor #not-a-heading in b.md" in problems[1]
    assert problems[2].startswith("README.md:8: link 'docs/nope.png': no file")
    assert problems[3].startswith("README.md:9: link 'docs/also-missing.md': no file")


# The docs speak to users about the product as it is: no issue numbers, no "this VM" (a figure names its machine).
ISSUE_NUMBER = re.compile(r"\bissues?\s+#?\d+|(?<![\w/&])#\d+\b", re.IGNORECASE)
THIS_MACHINE = re.compile(r"\bthis\s+(?:[\w-]+\s+)?(?:VM|virtual machine)\b", re.IGNORECASE)


def notebook_phrases(text: str) -> list[str]:
    """'line N: phrase' for every issue number and 'this VM' in a Markdown text, code included."""
    return [f"line {number}: {match.group(0)!r}" for number, line in enumerate(text.splitlines(), start=1)
            for pattern in (ISSUE_NUMBER, THIS_MACHINE) for match in pattern.finditer(line)]


def test_notebook_phrases_are_found():
    text = "as reported in issue 19\nsee #12 and issues 3\non this 2-core VM\nthis VM\n[x](#top) &#39; `a#1`"
    assert notebook_phrases(text) == ["line 1: 'issue 19'", "line 2: '#12'", "line 2: 'issues 3'",
                                      "line 3: 'this 2-core VM'", "line 4: 'this VM'"]
    assert notebook_phrases("a 2-core AMD EPYC VM; H200 #GPU; step 19 of the issue") == []


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_issue_numbers_or_this_vm(path: Path) -> None:
    found = notebook_phrases(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(REPO)}: " + "; ".join(found)
