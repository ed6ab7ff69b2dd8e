"""A git server on loopback for the GitOps tests, and repositories to commit to.

Smart HTTP (what Flux's go-git and Argo CD's git speak) by dulwich, a maintained Python
git implementation, from plain repositories the tests commit to with the real ``git``
command: ``http://127.0.0.1:<VIRTFLEET_GIT_PORT, 29079>/<name>``. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import socketserver
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import make_server

import yaml
from dulwich.errors import NotGitRepository
from dulwich.protocol import CAPABILITY_OFS_DELTA, CAPABILITY_SIDE_BAND_64K
from dulwich.repo import Repo
from dulwich.server import Backend, BackendRepo, UploadPackHandler
from dulwich.web import WSGIRequestHandlerLogger, WSGIServerLogger, make_wsgi_chain

REPO = Path(__file__).resolve().parents[2]
#: The folder of VMs a user keeps in Git, as the repository ships it.
EXAMPLE_VMS = REPO / "examples" / "gitops" / "vms"
#: Where the tests' fleet repository holds it (the examples' path in this repository).
FLEET_PATH = "examples/gitops/vms"


def git_port() -> int:
    return int(os.environ.get("VIRTFLEET_GIT_PORT", "29079"))


class GitError(RuntimeError):
    """A ``git`` command failed; the message has its stderr."""


class _Repositories(Backend):
    """Serves ``<root>/<name>`` at ``/<name>``, opened afresh on each request so commits
    made meanwhile by the ``git`` command are seen."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open_repository(self, path: str | bytes) -> BackendRepo:
        # dulwich's web handler passes bytes, whatever Backend's annotation says.
        name = (path.decode() if isinstance(path, bytes) else path).strip("/")
        if not name or "/" in name or name.startswith(".") or not (self.root / name).is_dir():
            raise NotGitRepository(f"no repository {path!r}")
        repo: BackendRepo = Repo(str(self.root / name))
        return repo


class _UploadPack(UploadPackHandler):
    """dulwich insists the client takes thin packs; go-git (Flux's git client) does not
    offer it. A thin pack only matters to a client that has objects already, and Flux
    clones afresh (depth 1) each time the revision changes, so nothing is lost."""

    @classmethod
    def required_capabilities(cls) -> tuple[bytes, ...]:
        return (CAPABILITY_SIDE_BAND_64K, CAPABILITY_OFS_DELTA)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServerLogger):
    daemon_threads = True


@dataclass
class GitServer:
    """A smart-HTTP git server on ``127.0.0.1:port`` for the repositories under ``root``."""

    root: Path
    port: int
    _server: _ThreadingServer
    _thread: threading.Thread

    def url(self, repo: str) -> str:
        return f"http://127.0.0.1:{self.port}/{repo}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def serve_git(root: Path) -> GitServer:
    port = git_port()
    app = make_wsgi_chain(_Repositories(root), handlers={b"git-upload-pack": _UploadPack})
    server = make_server(
        "127.0.0.1", port, app,
        server_class=_ThreadingServer, handler_class=WSGIRequestHandlerLogger,
    )  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, name="git-http", daemon=True)
    thread.start()
    return GitServer(root, port, server, thread)


class GitRepository:
    """A repository worked on with the real ``git`` command (commits only on ``main``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not (path / ".git").is_dir():
            path.mkdir(parents=True, exist_ok=True)
            self._git("init", "--quiet", "--initial-branch=main")

    def _git(self, *args: str) -> str:
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "virtfleet e2e", "GIT_AUTHOR_EMAIL": "e2e@virtfleet.invalid",
            "GIT_COMMITTER_NAME": "virtfleet e2e", "GIT_COMMITTER_EMAIL": "e2e@virtfleet.invalid",
            "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
        }  # fmt: skip
        result = subprocess.run(
            ["git", "-C", str(self.path), *args],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise GitError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def commit(self, message: str, files: Mapping[str, str | None]) -> str:
        """Write (or, for ``None``, delete) ``files`` and commit them; return the commit id."""
        for relative, content in files.items():
            target = self.path / relative
            if content is None:
                target.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
        self._git("add", "--all")
        self._git("commit", "--quiet", "--message", message)
        return self.head()

    def head(self) -> str:
        return self._git("rev-parse", "HEAD")

    def read(self, relative: str) -> str:
        return (self.path / relative).read_text()


def fleet_repository(path: Path) -> GitRepository:
    """A repository whose first commit is ``examples/gitops/vms`` as shipped."""
    repo = GitRepository(path)
    repo.commit(
        "the fleet as examples/gitops/vms ships it",
        {f"{FLEET_PATH}/{p.name}": p.read_text() for p in sorted(EXAMPLE_VMS.glob("*.yaml"))},
    )
    return repo


def example_vm(name: str, **spec: object) -> str:
    """A VM like the example's ``web``, renamed, with ``spec`` changes, as YAML."""
    web = yaml.safe_load((EXAMPLE_VMS / "web.yaml").read_text())
    web["metadata"]["name"] = name
    web["spec"].update(spec)
    return yaml.safe_dump(web, sort_keys=False)
