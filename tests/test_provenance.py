"""The provenance block's code fields: the commit, and whether the tracked files that ran
differed from it (a report from a modified tree must say so in its header)."""

import shutil
import subprocess

import pytest

from conftest import load_script

provenance = load_script("provenance")
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo, *args):
    return subprocess.check_output(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                                    *args], text=True).strip()


def test_commit_and_dirty_follow_the_checkout(tmp_path):
    assert provenance.git_commit(tmp_path) is None
    assert provenance.git_dirty(tmp_path) is None
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text("{}\n")
    git(tmp_path, "add", "a.py", "results/r.json")
    git(tmp_path, "commit", "-q", "-m", "a")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert provenance.git_commit(tmp_path) == head
    assert provenance.git_dirty(tmp_path) is False
    (tmp_path / "new.py").write_text("untracked\n")  # untracked files do not count
    assert provenance.git_dirty(tmp_path) is False
    (tmp_path / "results" / "r.json").write_text("{\"rows\": 1}\n")  # a run's own report
    assert provenance.git_dirty(tmp_path) is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_dirty(tmp_path) is True
    git(tmp_path, "commit", "-q", "-am", "b")
    assert provenance.git_dirty(tmp_path) is False
    assert provenance.git_commit(tmp_path) != head


def test_header_says_modified():
    env = {"gpu": "G", "date": "d", "torch": "t", "git_commit": "0123456789abcdef"}
    assert provenance.describe(env).endswith("commit 0123456789)")
    assert provenance.describe({**env, "git_dirty": False}).endswith("commit 0123456789)")
    assert provenance.describe({**env, "git_dirty": True}).endswith("commit 0123456789, modified)")


def test_environment_block():
    env = provenance.environment("cpu")
    assert env["git_commit"] == provenance.git_commit()
    assert env["git_dirty"] == provenance.git_dirty()
    given = provenance.environment("cpu", commit="abc")
    assert given["git_commit"] == "abc" and given["git_dirty"] is None
