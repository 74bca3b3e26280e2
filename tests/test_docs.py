"""The README and the guides in docs/: every relative link and #anchor leads somewhere."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Files outside the guides that name a guide, e.g. "docs/operations.md#4-config-and-secrets".
POINTERS = [ROOT / "config.example.toml", *sorted((ROOT / "systemd").iterdir()), *sorted((ROOT / "esmail").rglob("*.py")),
            ROOT / ".ci" / "run"]

FENCE = re.compile(r"^(```|~~~)")
INLINE_LINK = re.compile(r"\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")


def prose_lines(text):
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            yield line


def github_slug(heading):
    """GitHub's anchor for a heading (github-slugger): the rendered text lower-cased, every character but
    letters, marks, digits, `_`, `-` and spaces dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").lower()
    kept = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return kept.replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a Markdown file, with GitHub's -1, -2 … for repeated headings."""
    seen, result = {}, set()
    for line in prose_lines(path.read_text()):
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = github_slug(m[1])
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def links(path):
    """The relative link targets of a Markdown file's prose (not in code blocks or code spans)."""
    for line in prose_lines(path.read_text()):
        for target in INLINE_LINK.findall(CODE_SPAN.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                yield target


def broken(source, target):
    """Why target, written in source, leads nowhere; None when it resolves."""
    name, _, anchor = target.partition("#")
    dest = (source.parent / name).resolve() if name else source
    if not dest.exists():
        return f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
    if anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
        return f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(guide):
    """Each relative link in the README and docs/*.md names an existing file, and its #anchor a heading there."""
    problems = [p for t in links(guide) if (p := broken(guide, t))]
    assert problems == []


def test_files_outside_the_guides_point_at_existing_guides():
    """config.example.toml, the systemd files, CI and the code name guides (docs/x.md#anchor) that exist, never README sections."""
    problems = []
    for path in POINTERS:
        text = path.read_text()
        problems += [f"{path.relative_to(ROOT)}: {p}" for t in re.findall(r"\bdocs/[\w.-]+\.md(?:#[\w-]+)?", text)
                     if (p := broken(ROOT / "README.md", t))]
        problems += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"README[^\n]*?\"[^\"\n]+\"", text)]
    assert problems == []


def test_the_readme_is_a_first_read():
    """The README stays under 25 KB and lists every guide in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 25_000
    listed = {(ROOT / t).resolve() for t in links(ROOT / "README.md")}
    assert {p for p in GUIDES[1:] if p.name != "README.md"} <= listed


def test_the_slugs_follow_github():
    """A few headings and the anchors GitHub gives them."""
    assert github_slug("More than one core: `[smtp] processes`") == "more-than-one-core-smtp-processes"
    assert github_slug("2. Prefix ✱") == "2-prefix-"
    assert github_slug("Who can read the stored files (local backend)") == "who-can-read-the-stored-files-local-backend"
    assert github_slug("`../shared/seed-samples`: the old pipeline's real files") == "sharedseed-samples-the-old-pipelines-real-files"
