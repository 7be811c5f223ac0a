"""Which of BENCHMARKS.md's sections may no longer describe the code:

    python -m bench.stale                      # a table, one row per section
    python -m bench.stale --output stale.json  # the same as JSON

A section's results are as old as the newest commit it names (a backticked hash git knows).
Its code is every bench module it names (`python -m bench.X`, `bench/X.py`) and the packages
every benchmark runs through (`aligner/`, `decoding/`, `kernels/`, `server/`, `models/`). A
section is **stale** when a commit since its results touched that code: the number says how
many. A section that names no commit cannot be dated, and says so. This reads git history
only: it does not rerun anything, and a stale section may still hold (a refactor that changes
no number); rerun its command to know.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

CODE_ROOTS = ("aligner", "decoding", "kernels", "server", "models")
_HEADING = re.compile(r"^(#{2,3}) (.+)$")
_HASH = re.compile(r"`([0-9a-f]{7,40})`")
_BENCH = re.compile(r"(?:python -m bench\.|bench/)([a-z_]+)(?:\.py)?\b")


@dataclass
class Section:
    title: str
    line: int  # 1-based line of the heading
    body: str = ""
    commits: list[str] = field(default_factory=list)  # named and known to git, newest first
    benches: list[str] = field(default_factory=list)  # bench/X.py files named that exist
    since: int | None = None  # commits after the newest one that touch the section's code

    @property
    def verdict(self) -> str:
        if not self.commits:
            return "no commit named"
        return "stale" if self.since else "current"


def sections(text: str) -> list[Section]:
    """Each `##` or `###` heading with the lines under it up to the next heading.

    >>> [(s.title, s.line, s.body) for s in sections("# T\\nintro\\n## A\\na\\n### B\\nb\\nb2\\n## C\\n")]
    [('A', 3, 'a'), ('B', 5, 'b\\nb2'), ('C', 8, '')]
    """
    found: list[Section] = []
    lines: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        heading = _HEADING.match(line)
        if heading:
            if found:
                found[-1].body = "\n".join(lines).strip("\n")
            found.append(Section(heading.group(2).strip(), number))
            lines = []
        else:
            lines.append(line)
    if found:
        found[-1].body = "\n".join(lines).strip("\n")
    return found


def named_benches(body: str, repo: Path) -> list[str]:
    """The bench modules a section names, as paths, those that exist in `repo`."""
    names = sorted(set(_BENCH.findall(body)))
    return [f"bench/{n}.py" for n in names if (repo / "bench" / f"{n}.py").is_file()]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def _is_ancestor(repo: Path, older: str, newer: str) -> bool:
    return subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", older, newer],
                          capture_output=True).returncode == 0


def known_commits(body: str, repo: Path) -> list[str]:
    """The hashes a section names that git knows as commits, full length, newest first: a
    commit comes before its ancestors (commit times can tie), else the later one first."""
    commits = {}
    for short in dict.fromkeys(_HASH.findall(body)):
        try:
            full = _git(repo, "rev-parse", "--verify", "--quiet", f"{short}^{{commit}}")
        except subprocess.CalledProcessError:
            continue
        commits[full] = int(_git(repo, "show", "-s", "--format=%ct", full))
    ordered = sorted(commits, key=commits.get, reverse=True)
    newest = [c for c in ordered if not any(o != c and _is_ancestor(repo, c, o) for o in ordered)]
    return newest + [c for c in ordered if c not in newest]


def commits_since(repo: Path, commit: str, paths: list[str]) -> int:
    """Commits after `commit` (reachable from HEAD, not from it) that touch any of `paths`."""
    return int(_git(repo, "rev-list", "--count", f"{commit}..HEAD", "--", *paths))


def check(repo: Path, text: str) -> list[Section]:
    _git(repo, "rev-parse", "--git-dir")  # not a repository: an error, not "no commit named" everywhere
    if _git(repo, "rev-parse", "--is-shallow-repository") == "true":
        print(f"bench.stale: {repo} is a shallow clone: a commit older than its history reads as "
              "'no commit named' (git fetch --unshallow)", file=sys.stderr)
    found = sections(text)
    for s in found:
        text = f"{s.title}\n{s.body}"
        s.commits = known_commits(text, repo)
        s.benches = named_benches(text, repo)
        if s.commits:
            s.since = commits_since(repo, s.commits[0], [*CODE_ROOTS, *s.benches])
    return found


def table(found: list[Section]) -> str:
    rows = ["| line | section | results' commit | commits since that touch its code | verdict |",
            "| ---: | --- | --- | ---: | --- |"]
    for s in found:
        commit = f"`{s.commits[0][:7]}`" if s.commits else "-"
        since = "-" if s.since is None else str(s.since)
        title = s.title.replace("|", "\\|")
        rows.append(f"| {s.line} | {title} | {commit} | {since} | {s.verdict} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the repository (default: here)")
    parser.add_argument("--file", type=Path, default=None, help="the benchmarks file (default: REPO/BENCHMARKS.md)")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    path = args.file or args.repo / "BENCHMARKS.md"
    try:
        found = check(args.repo, path.read_text())
    except subprocess.CalledProcessError as exc:
        print(f"bench.stale: git {' '.join(exc.cmd[3:])} failed: {exc.stderr.strip()}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"bench.stale: {exc}", file=sys.stderr)
        return 2
    print(table(found))
    counts = {v: sum(s.verdict == v for s in found) for v in ("current", "stale", "no commit named")}
    print(f"\n{len(found)} sections: " + ", ".join(f"{n} {v}" for v, n in counts.items()), file=sys.stderr)
    if args.output:
        rows = [{k: v for k, v in asdict(s).items() if k != "body"} | {"verdict": s.verdict} for s in found]
        args.output.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
