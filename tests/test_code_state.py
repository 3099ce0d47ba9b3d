"""init(save_code=True): git state, the diff against HEAD and the environment, in run.json."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import trackd
from conftest import Daemon
from test_client import delivered, read_json
from trackd.client import codestate

SECRET = "s3cr3t-token"


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with one commit, a remote URL holding credentials, as the cwd."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "train.py").write_text("lr = 0.1\n")
    git(path, "add", "train.py")
    git(path, "commit", "-q", "-m", "first")
    git(path, "remote", "add", "origin", f"https://user:{SECRET}@example.com/org/repo.git")
    monkeypatch.chdir(path)
    return path


def test_a_dirty_repo_records_commit_branch_remote_without_credentials_and_the_diff(
    daemon: Daemon, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a dirty repo, run.json has code {commit, branch, remote (credentials stripped), dirty}
    and env {argv, python, executable, host, cuda_visible_devices}; diff.patch is the diff."""
    daemon.start()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    (repo / "train.py").write_text("lr = 0.3\n")
    run = trackd.init(project="code", name="dirty")
    run.finish(timeout=30)
    directory = delivered(daemon, "code", "dirty")
    info = read_json(directory / "run.json")
    assert info["code"] == {
        "commit": git(repo, "rev-parse", "HEAD").strip(),
        "branch": "main",
        "remote": "https://example.com/org/repo.git",
        "dirty": True,
    }
    assert info["env"] == {
        "argv": sys.argv,
        "python": ".".join(map(str, sys.version_info[:3])),
        "executable": sys.executable,
        "host": socket.gethostname(),
        "cuda_visible_devices": "1,3",
    }
    patch = (directory / "artifacts" / "diff.patch").read_text()
    assert patch == git(repo, "diff", "HEAD")
    assert "+lr = 0.3" in patch
    stored = "".join(path.read_text(errors="replace") for path in directory.rglob("*.json"))
    assert SECRET not in stored


def test_a_clean_repo_is_not_dirty_and_has_no_diff(daemon: Daemon, repo: Path) -> None:
    """A clean tree: dirty is false and no diff.patch is stored."""
    daemon.start()
    run = trackd.init(project="code", name="clean")
    run.finish(timeout=30)
    directory = delivered(daemon, "code", "clean")
    assert read_json(directory / "run.json")["code"]["dirty"] is False
    assert not (directory / "artifacts" / "diff.patch").exists()


@pytest.mark.parametrize("where", ["outside-a-repo", "without-git"])
def test_init_goes_on_outside_a_repo_or_without_git(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Outside a git repository (or with no git at all) init() works; code is null, env is kept."""
    daemon.start()
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    if where == "without-git":
        monkeypatch.setenv("PATH", str(plain))
    run = trackd.init(project="code", name=where)
    run.finish(timeout=30)
    info = read_json(delivered(daemon, "code", where) / "run.json")
    assert info["code"] is None
    assert info["env"]["argv"] == sys.argv


def test_save_code_false_records_neither_code_nor_env(daemon: Daemon, repo: Path) -> None:
    """save_code=False: run.json's code and env are null and no diff is stored."""
    daemon.start()
    (repo / "train.py").write_text("changed\n")
    run = trackd.init(project="code", name="nosave", save_code=False)
    run.finish(timeout=30)
    directory = delivered(daemon, "code", "nosave")
    info = read_json(directory / "run.json")
    assert (info["code"], info["env"]) == (None, None)
    assert not (directory / "artifacts").exists()


def test_a_diff_over_the_cap_is_cut_with_a_marker(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diff.patch stops at MAX_DIFF_BYTES, and says so."""
    monkeypatch.setattr(codestate, "MAX_DIFF_BYTES", 100)
    (repo / "train.py").write_text("x = 1\n" * 1000)
    code, patch = codestate.git_state()
    assert code is not None
    assert code["dirty"]
    assert patch == git(repo, "diff", "HEAD").encode()[:100] + codestate.DIFF_CUT_MARKER % 100


def test_a_detached_head_has_no_branch_and_a_repo_without_remote_no_remote(repo: Path) -> None:
    """branch is None on a detached HEAD; remote is None when the repo has none."""
    git(repo, "checkout", "-q", "--detach")
    git(repo, "remote", "remove", "origin")
    code, _ = codestate.git_state()
    assert code is not None
    assert (code["branch"], code["remote"], code["dirty"]) == (None, None, False)
    assert code["commit"] == git(repo, "rev-parse", "HEAD").strip()


@pytest.mark.parametrize(
    ("url", "public"),
    [
        ("https://user:pw@github.com/o/r.git", "https://github.com/o/r.git"),
        ("https://ghp_TOKEN@github.com/o/r.git", "https://github.com/o/r.git"),
        ("http://u:p@host:8080/r", "http://host:8080/r"),
        ("ssh://git:pw@host/r.git", "ssh://host/r.git"),
        ("ssh://git@host/r.git", "ssh://git@host/r.git"),
        ("git@github.com:o/r.git", "git@github.com:o/r.git"),
        ("https://github.com/o/r.git", "https://github.com/o/r.git"),
        ("/srv/git/r.git", "/srv/git/r.git"),
    ],
)
def test_remote_urls_lose_their_credentials(url: str, public: str) -> None:
    """Passwords and http(s) user names (tokens) are stripped; an ssh login name is kept."""
    assert codestate.public_url(url) == public


def test_the_environment_names_the_interpreter_and_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """env without CUDA_VISIBLE_DEVICES set has it as None."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = codestate.environment()
    assert env["cuda_visible_devices"] is None
    assert env["executable"] == sys.executable
    assert env["host"] == os.uname().nodename
