"""A local stand-in for the Hugging Face Hub: just enough of its HTTP API for huggingface_hub.

Serves `GET/HEAD /{org}/{name}/resolve/{revision}/{filename}` from directories registered with
`add_repo`, with HTTP Range support and the Hub's headers (X-Repo-Commit, ETag, X-Error-Code for
gated / missing repos and files). It fails the way a real server can, when asked to: a body cut
short (`truncate_after`), a connection dropped before any answer (`drop_connections`); a complete
answer keeps the connection alive, as the Hub does. Every request is logged with the byte range it
sent, so tests can prove how much of a file a client read.
"""
import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    root: Path
    commit: str
    gated: bool = False
    truncate_after: int | None = None   # send at most this many bytes of any response body
    # {filename: n}: close the connection of the next n GETs of that file without answering
    drop_connections: dict[str, int] = field(default_factory=dict)


@dataclass
class Sent:
    repo: str
    filename: str
    start: int
    end: int        # exclusive
    status: int


@dataclass
class HubStandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[Sent] = field(default_factory=list)

    def start(self) -> "HubStandIn":
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, root: Path, **options) -> Repo:
        commit = hashlib.sha1(f"{repo_id}:{root}".encode()).hexdigest()
        self.repos[repo_id] = Repo(Path(root), commit, **options)
        return self.repos[repo_id]

    def sent(self, repo_id: str, filename: str | None = None) -> list[Sent]:
        return [s for s in self.log if s.repo == repo_id and filename in (None, s.filename)]


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _error(self, status: int, code: str, message: str):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool):
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        if not match:
            return self._error(404, "EntryNotFound", "unknown route")
        repo_id, revision, filename = match.groups()
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
            return self._error(401, "GatedRepo", "Access to this model is restricted")
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        path = repo.root / filename
        if not path.is_file():
            return self._error(404, "EntryNotFound", "Entry not found")

        if body and repo.drop_connections.get(filename, 0) > 0:
            repo.drop_connections[filename] -= 1
            self.close_connection = True
            return

        size = path.stat().st_size
        start, end, status = 0, size, 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2)) + 1, size) if ranged.group(2) else size
            status = 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{hashlib.sha1(f"{repo.commit}/{filename}".encode()).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return
        promised = end
        if repo.truncate_after is not None:
            end = min(end, start + repo.truncate_after)
        with open(path, "rb") as f:
            f.seek(start)
            self.wfile.write(f.read(end - start))
        self.hub.log.append(Sent(repo_id, filename, start, end, status))
        # Only a body cut short ends the connection: closing after a complete answer would race
        # with the client reusing the kept-alive connection for its next request.
        self.close_connection = end < promised
