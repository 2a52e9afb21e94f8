"""The README and docs/ stand on their own: every relative link (and its #anchor) resolves in the
repository, nothing points outside it or to issue numbers a reader cannot see, every result file,
GPU pass, module and script they name exists, and the documented `tandem bench` commands parse
with the real flag parser."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from bench.cli import add_cli_args

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
PAGE_IDS = [p.relative_to(ROOT).as_posix() for p in PAGES]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# "issue 23", "issues #4", "#123": numbers that mean something only on an issue tracker
ISSUE_REF = re.compile(r"\bissues?\s*#?\s*\d+|(?<![\w&/#])#\d+\b", re.IGNORECASE)


def prose_lines(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a `#` line in a shell block is no heading)."""
    lines, in_fence = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def fenced_blocks(path: Path) -> list[str]:
    blocks, current, in_fence = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            if in_fence:
                blocks.append("\n".join(current))
                current = []
            in_fence = not in_fence
        elif in_fence:
            current.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                links.append(target)
    return links


def test_pages_are_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "architecture.md", "reliability.md", "deploy.md", "benchmarks.md"} <= names


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    root, broken = root.resolve(), []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if root not in dest.parents and dest != root:
            broken.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links_resolve(page: Path):
    broken = broken_links(page)
    assert not broken, f"{page.name}: {broken}"


def test_link_check_finds_what_is_broken(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.md").write_text("# Notes\n")
    (repo / "docs" / "a.md").write_text("# A\n\n## Two words\n\n```\n# not a heading\n```\n")
    page = repo / "README.md"
    page.write_text(
        "[ok](docs/a.md#two-words) [self](#top) [web](https://example.com/x)\n"
        "[gone](docs/b.md) [anchor](docs/a.md#three) [code](docs/a.md#not-a-heading)\n"
        "[out](../shared/notes.md) `[in code](nowhere.md)`\n\n# Top\n"
    )
    assert broken_links(page, root=repo) == [
        "docs/b.md: no such file",
        "docs/a.md#three: no heading with anchor #three in a.md",
        "docs/a.md#not-a-heading: no heading with anchor #not-a-heading in a.md",
        "../shared/notes.md: outside the repository",
    ]


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_no_pointers_outside_the_repository(page: Path):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text, f"{page.name} points outside the repository (../shared)"
    refs = sorted({m.group(0) for m in ISSUE_REF.finditer(text)})
    assert not refs, f"{page.name} cites issue numbers a reader cannot see: {refs}"


def test_issue_pattern_catches_what_it_should():
    # the guard above is only as good as its pattern
    for bad in ["see issue 23", "Issue #4 says", "fixed in #123."]:
        assert ISSUE_REF.search(bad), bad
    for fine in ["`tandem bench`", "W1 at batch 512", "C# and F#", "a#1 anchor", "&#8212;"]:
        assert not ISSUE_REF.search(fine), fine


def test_slug_matches_github_anchors():
    assert slug("Internal plane: the cost of mutual TLS") == "internal-plane-the-cost-of-mutual-tls"
    assert slug("Sizing the pools: `tandem compose`") == "sizing-the-pools-tandem-compose"
    assert slug("W2: disaggregated vs aggregated on one GPU") == (
        "w2-disaggregated-vs-aggregated-on-one-gpu"
    )


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_named_result_files_exist(page: Path):
    text = page.read_text(encoding="utf-8")
    named = set(re.findall(r"bench/results/([\w.-]+\.(?:json|txt))", text))
    missing = sorted(n for n in named if not (ROOT / "bench" / "results" / n).is_file())
    assert not missing, f"{page.name} cites result files that are not in bench/results/: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_named_gpu_passes_modules_and_scripts_exist(page: Path):
    text = page.read_text(encoding="utf-8")
    gpu_pass = (ROOT / "bench" / "gpu_pass.sh").read_text(encoding="utf-8")
    passes = set(re.findall(r"gpu_pass\.sh\s+([A-Z][A-Z0-9]*)\b", text))
    unknown = sorted(p for p in passes if not re.search(rf"^{p}\)", gpu_pass, re.MULTILINE))
    assert not unknown, f"{page.name} names passes bench/gpu_pass.sh does not have: {unknown}"

    missing = []
    for module in set(re.findall(r"python3? -m ([\w.]+)", text)):
        parts = module.rstrip(".").split(".")
        if not (ROOT / parts[0]).is_dir():
            continue  # an installed tool (pip, pytest), not this repository's code
        base = ROOT.joinpath(*parts)
        candidates = [base.with_suffix(".py"), base / "__init__.py", base / "__main__.py"]
        if not any(c.is_file() for c in candidates):
            missing.append(f"python -m {module}")
    for script in set(re.findall(r"python3? ((?:bench|tandem|protos)/[\w/]+\.py)", text)):
        if not (ROOT / script).is_file():
            missing.append(script)
    assert not missing, f"{page.name} runs code that is not in the repository: {sorted(missing)}"


def bench_commands(page: Path) -> list[list[str]]:
    """Every `tandem bench ...` command line in the page's code blocks, continuations joined."""
    commands = []
    for block in fenced_blocks(page):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            m = re.search(r"tandem bench\s+(.*)$", line)
            if m:
                commands.append(shlex.split(m.group(1).replace("RATE", "4")))
    return commands


@pytest.mark.parametrize("page", [ROOT / "README.md", BENCHMARKS], ids=["README", "benchmarks"])
def test_documented_bench_commands_parse(page: Path):
    commands = bench_commands(page)
    assert commands, f"{page.name} shows no `tandem bench` command"
    for argv in commands:
        parser = add_cli_args(argparse.ArgumentParser(prog="tandem bench", exit_on_error=False))
        try:
            args = parser.parse_args(argv)
        except (argparse.ArgumentError, SystemExit) as e:
            raise AssertionError(f"{page.name}: `tandem bench {shlex.join(argv)}`: {e}") from e
        assert args.num_prompts > 0


def sections(path: Path) -> list[tuple[str, str]]:
    """(## heading, its text) in page order."""
    out: list[tuple[str, str]] = []
    for line in prose_lines(path):
        if line.startswith("## "):
            out.append((line[3:].strip(), ""))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + line + "\n")
    return out


def test_readme_structure():
    readme = sections(ROOT / "README.md")
    titles = [t for t, _ in readme]
    assert titles[0] == "The two commands", titles
    links = set(relative_links(ROOT / "README.md"))
    for doc in ["architecture", "reliability", "deploy", "benchmarks"]:
        assert f"docs/{doc}.md" in links, f"README does not link docs/{doc}.md"
    using = dict(readme)["Using it"]
    assert "tandem bench" in using and "vllm bench serve" in using
    assert "Security" in titles
    layout = dict(readme)["Layout"]
    rows = [line.split("|")[2] for line in layout.splitlines() if line.startswith("|")]
    for path in ["bench/", "docs/", "deploy/", "compose.yaml", "Dockerfile", "tests/"]:
        assert any(f"`{path}`" in row for row in rows), f"layout table lacks {path}"
        assert (ROOT / path).exists()


def test_benchmarks_is_a_results_page():
    titles = [t for t, _ in sections(BENCHMARKS)]
    for needed in [
        "Method",
        "Internal plane: the cost of mutual TLS",
        "Reproduce",
        "What changed the numbers",
    ]:
        assert needed in titles, f"docs/benchmarks.md lacks the section {needed!r}: {titles}"
    assert (
        titles.index("Method")
        < titles.index("Reproduce")
        < titles.index("What changed the numbers")
    )
