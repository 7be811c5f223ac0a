"""`bench.stale`: a section of BENCHMARKS.md is stale once a commit after the newest one it
names touches its code (its bench modules, or the packages every bench runs through)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.stale import check, main


def git(repo: Path, *args: str, when: int = 0) -> str:
    stamp = f"@{when} +0000"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp, "PATH": "/usr/bin:/bin", "HOME": str(repo)}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=env).stdout.strip()


def commit(repo: Path, files: dict[str, str], message: str, when: int) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "-c", "commit.gpgsign=false", "commit", "-q", "-m", message, when=when)
    return git(repo, "rev-parse", "HEAD")


def test_stale_counts_only_later_commits_that_touch_the_sections_code(tmp_path):
    git(tmp_path, "init", "-q")
    first = commit(tmp_path, {"bench/speed.py": "a", "bench/other.py": "a", "server/app.py": "a"}, "one", 1_000_000)
    second = commit(tmp_path, {"bench/other.py": "b"}, "two", 1_000_100)
    text = (f"# Benchmarks\n## Speed (`python -m bench.speed`)\nMeasured at `{first[:7]}`.\n"
            f"## Other\nRun `python -m bench.other`, commits `{first[:7]}` then `{second[:9]}`; `deadbee` is not one.\n"
            "## Undated\nno hash here\n")
    speed, other, undated = check(tmp_path, text)
    assert (speed.commits, speed.benches, speed.since, speed.verdict) == ([first], ["bench/speed.py"], 0, "current")
    assert other.commits == [second, first] and other.since == 0  # dated by its newest commit
    assert (undated.since, undated.verdict) == (None, "no commit named")
    commit(tmp_path, {"README.md": "docs only"}, "three", 1_000_200)  # touches no section's code
    assert [s.since for s in check(tmp_path, text)] == [0, 0, None]
    commit(tmp_path, {"bench/other.py": "c"}, "four", 1_000_300)
    assert [s.verdict for s in check(tmp_path, text)] == ["current", "stale", "no commit named"]
    commit(tmp_path, {"server/app.py": "b"}, "five", 1_000_400)  # every bench runs through the server
    assert [s.since for s in check(tmp_path, text)] == [1, 2, None]
    (tmp_path / "BENCHMARKS.md").write_text(text)
    assert main(["--repo", str(tmp_path), "--output", str(tmp_path / "stale.json")]) == 0
    rows = json.loads((tmp_path / "stale.json").read_text())
    assert [(r["title"], r["since"], r["verdict"]) for r in rows] == [
        ("Speed (`python -m bench.speed`)", 1, "stale"), ("Other", 2, "stale"), ("Undated", None, "no commit named")]


def test_the_repositorys_own_benchmarks_file_is_read(capsys):
    assert main([]) == 0  # run from the repository root, as the bench commands are
    out = capsys.readouterr().out
    assert out.startswith("| line | section |") and "bench.throughput" in out


def test_a_commit_is_newer_than_its_parent_even_at_the_same_second(tmp_path):
    git(tmp_path, "init", "-q")
    parent = commit(tmp_path, {"aligner/a.py": "a"}, "one", 2_000_000)
    child = commit(tmp_path, {"aligner/a.py": "b"}, "two", 2_000_000)
    (section,) = check(tmp_path, f"## S\nfirst `{parent[:7]}`, then `{child[:7]}`\n")
    assert section.commits == [child, parent] and section.verdict == "current"


def test_a_folder_that_is_not_a_repository_is_an_error(tmp_path, capsys):
    (tmp_path / "BENCHMARKS.md").write_text("## S\n`abcdef1`\n")
    assert main(["--repo", str(tmp_path)]) == 2
    assert "bench.stale: git" in capsys.readouterr().err
