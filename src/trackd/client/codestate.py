"""The code and environment a run started from, recorded at `init(save_code=True)`.

`code`: git commit, branch, remote URL (credentials stripped) and dirty flag, plus the
diff against HEAD (tracked files, staged or not) for the `diff.patch` artifact. Three
`git` processes run at once (status, remote URLs, diff), which costs a few ms in all;
`GIT_OPTIONAL_LOCKS=0` keeps `git status` from writing the index under a user's own git
command. Outside a repository, without git, or when git takes longer than
`GIT_SECONDS`, `code` is None and init() goes on.

`env`: the command line, Python's version and executable, the host name and
CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from typing import Any

GIT_SECONDS = 2.0
MAX_DIFF_BYTES = 4 * 1024 * 1024
DIFF_CUT_MARKER = b"\n# trackd: diff.patch cut at %d bytes\n"


def environment() -> dict[str, Any]:
    return {
        "argv": list(sys.argv),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "host": os.uname().nodename,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def git_state(cwd: str | None = None) -> tuple[dict[str, Any] | None, bytes]:
    """(code, diff): code None where there is no repository (or no git); diff empty if clean."""
    import subprocess

    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    commands = (
        ["git", "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
        ["git", "config", "--get-regexp", r"^remote\..*\.url$"],
        ["git", "diff", "HEAD", "--no-color", "--no-ext-diff"],
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for command in commands:
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
            )
        status, remotes, diff = processes
        status_out, _ = status.communicate(timeout=GIT_SECONDS)
        if status.returncode != 0:
            return None, b""
        remotes_out, _ = remotes.communicate(timeout=GIT_SECONDS)
        code = _parse_status(status_out.decode(errors="replace"))
        code["remote"] = _remote(remotes_out.decode(errors="replace"))
        patch = b""
        if code["dirty"] and code["commit"] is not None:
            assert diff.stdout is not None
            patch = diff.stdout.read(MAX_DIFF_BYTES + 1)
            if len(patch) > MAX_DIFF_BYTES:
                patch = patch[:MAX_DIFF_BYTES] + DIFF_CUT_MARKER % MAX_DIFF_BYTES
        return code, patch
    except (OSError, subprocess.SubprocessError):  # no git, or git too slow: no code state
        return None, b""
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _parse_status(text: str) -> dict[str, Any]:
    commit: str | None = None
    branch: str | None = None
    dirty = False
    for line in text.splitlines():
        if line.startswith("# branch.oid "):
            oid = line[len("# branch.oid ") :]
            commit = None if oid == "(initial)" else oid
        elif line.startswith("# branch.head "):
            head = line[len("# branch.head ") :]
            branch = None if head == "(detached)" else head
        elif line and not line.startswith("#"):
            dirty = True
    return {"commit": commit, "branch": branch, "remote": None, "dirty": dirty}


def _remote(text: str) -> str | None:
    """origin's URL, else the first remote's, without credentials."""
    urls: dict[str, str] = {}
    for line in text.splitlines():
        key, _, url = line.partition(" ")
        urls[key[len("remote.") : -len(".url")]] = url
    chosen = urls.get("origin") or next(iter(urls.values()), None)
    return public_url(chosen) if chosen else None


def public_url(url: str) -> str:
    """A remote URL without its user info where that may be a credential: any password,
    and any user name of an http(s) URL (`https://TOKEN@github.com/...`). An ssh user
    (`git@github.com:...`, `ssh://git@...`) is kept: it is a login name, not a secret."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    if ":" in userinfo or scheme.lower() in ("http", "https"):
        authority = host
    return f"{scheme}://{authority}{slash}{path}"
