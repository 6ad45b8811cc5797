#!/usr/bin/env bash
# Checks that every relative link in the project's Markdown resolves: README.md, BENCHMARKS.md,
# docs/**/*.md and guest-examples/**/README.md. A link's file (or directory) must exist, and a
# `#anchor` in a Markdown target must be one of its headings (GitHub's slug) or an explicit
# `<a id="...">`. It also checks the `docs/....md#anchor` citations in code and scripts (for
# example `docs/guarantees.md#g1` in a comment), relative to the repository root. External links
# (http:, https:, mailto:) are not fetched. Prints each broken link as FILE:LINE and exits 1 if
# there is any; needs only python3.
#
#   scripts/check-links.sh            # the whole tree
#   scripts/check-links.sh FILE.md..  # only these Markdown files
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import os
import re
import sys

ROOT = os.getcwd()
SKIP_DIRS = {".git", "target", "node_modules"}
SELF = os.path.join("scripts", "check-links.sh")


def markdown_files():
    files = [f for f in ("README.md", "BENCHMARKS.md") if os.path.isfile(f)]
    for top, only_readme in (("docs", False), ("guest-examples", True)):
        for d, dirs, names in os.walk(top):
            dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
            for n in sorted(names):
                if n.endswith(".md") and (n == "README.md" or not only_readme):
                    files.append(os.path.join(d, n))
    return files


FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXPLICIT = re.compile(r"<a\s[^>]*?\b(?:id|name)\s*=\s*\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
LINE_ANCHOR = re.compile(r"^L\d+(-L\d+)?$")


def prose_lines(path):
    """(line number, text) of the lines outside fenced code blocks."""
    out, fence = [], None
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            m = FENCE.match(line)
            if m:
                if fence is None:
                    fence = m.group(1)
                elif m.group(1) == fence:
                    fence = None
                continue
            if fence is None:
                out.append((no, line.rstrip("\n")))
    return out


def slug(text):
    """GitHub's heading id: the rendered text, lower-cased, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML renders nothing
    text = text.replace("`", "").lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


_anchors = {}


def anchors(path):
    if path not in _anchors:
        seen, found = {}, set()
        for _, line in prose_lines(path):
            found.update(EXPLICIT.findall(line))
            m = HEADING.match(line)
            if m:
                s = slug(m.group(2))
                n = seen.get(s, 0)
                seen[s] = n + 1
                found.add(s if n == 0 else f"{s}-{n}")
        _anchors[path] = found
    return _anchors[path]


def check(target, base_dir, source):
    """Why `target` (a link written in `source`) does not resolve, or None."""
    if SCHEME.match(target):
        return None
    path, _, anchor = target.partition("#")
    if path.startswith("/"):
        return "absolute path: write it relative to the file"
    resolved = os.path.normpath(os.path.join(base_dir, path)) if path else source
    if not os.path.exists(resolved):
        return f"{os.path.relpath(resolved, ROOT)} does not exist"
    if not anchor:
        return None
    if resolved.endswith(".md") and os.path.isfile(resolved):
        if anchor not in anchors(resolved):
            return f"no heading or <a id> `{anchor}` in {os.path.relpath(resolved, ROOT)}"
        return None
    if LINE_ANCHOR.match(anchor):
        return None
    return f"anchor `{anchor}` on a file that is not Markdown"


def check_markdown(files):
    problems, count = [], 0
    for f in files:
        base = os.path.dirname(os.path.abspath(f))
        for no, line in prose_lines(f):
            prose = CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line)
            targets = [m.group(1) for m in LINK.finditer(prose)]
            m = REF_DEF.match(prose)
            if m:
                targets.append(m.group(1))
            for t in targets:
                count += 1
                why = check(t, base, os.path.abspath(f))
                if why:
                    problems.append(f"{f}:{no}: broken link `{t}`: {why}")
    return problems, count


CITATION = re.compile(r"\bdocs/[A-Za-z0-9_./-]*\.md(?:#[A-Za-z0-9_-]+)?")
CODE_TOPS = ("runtime", "sdk", "tests", "wit", "scripts", ".ci", "guest-examples")
CODE_EXT = (".rs", ".wit", ".sh", ".py", ".toml", ".go", ".c", ".h", ".js")


def check_citations():
    problems, count = [], 0
    for top in CODE_TOPS:
        for d, dirs, names in os.walk(top):
            dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
            for n in sorted(names):
                p = os.path.join(d, n)
                if p == SELF or not (n.endswith(CODE_EXT) or n == "run"):
                    continue
                try:
                    text = open(p, encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                for no, line in enumerate(text.split("\n"), 1):
                    for t in CITATION.findall(line):
                        count += 1
                        why = check(t, ROOT, None)
                        if why:
                            problems.append(f"{p}:{no}: broken citation `{t}`: {why}")
    return problems, count


def main(argv):
    files = argv or markdown_files()
    problems, links = check_markdown(files)
    cited = 0
    if not argv:
        more, cited = check_citations()
        problems += more
    for p in problems:
        print(p)
    summary = f"{links} links in {len(files)} Markdown files"
    if not argv:
        summary += f", {cited} docs citations in code"
    if problems:
        print(f"check-links: {len(problems)} broken ({summary})", file=sys.stderr)
        return 1
    print(f"check-links: ok ({summary})")
    return 0


sys.exit(main(sys.argv[1:]))
PY
