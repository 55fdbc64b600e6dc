"""A small in-memory Hugging Face Hub for tests: the HTTP API that huggingface_hub 2.x calls, over real HTTP.

Run as a process (`python tests/hub_server.py --port-file F`; stdlib only, so it starts in a blink) and drive it
with `HubServer` from a test: `env()` gives the variables a client process needs (HF_ENDPOINT is read when
huggingface_hub is imported, so clients run in subprocesses), `requests()` what it received, `files()` a repo's
content, `fail()` makes matching requests answer an error status, drop the connection or hang. Mind that
huggingface_hub retries 408/429/5xx and timeouts with backoff (up to ~25 s) on preupload, and on commit when hf_xet
is installed (upload_folder's pipelined upload); create_repo and resolve are not retried.

Endpoints (models, datasets and spaces alike): POST /api/repos/create, GET /api/whoami-v2, POST /api/validate-yaml,
POST /api/{type}s/{id}/preupload/{rev} (every file "regular": no LFS or Xet upload is ever started),
POST /api/{type}s/{id}/commit/{rev} (ndjson, base64 content), GET /api/{type}s/{id}[/revision/{rev}] (info with
siblings), GET /api/{type}s/{id}/tree/{rev}[/{path}], GET|HEAD /[{type}s/]{id}/resolve/{rev}/{path} (ETag,
X-Repo-Commit, Content-Length; never Xet headers). Repos are namespace/name; any Bearer token authenticates as
TEST_USER, except where the server was started with --token (then only that one does).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

TEST_USER = "test-user"
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    """The state: repos with their commits (each a full snapshot {path: bytes}), the request log, failure rules."""

    def __init__(self, token: str | None):
        self.token, self.lock = token, threading.Lock()
        self.repos: dict[tuple[str, str], dict] = {}  # (type, id) -> {private, sdk, commits: {sha: files}, main}
        self.log: list[dict] = []
        self.rules: list[dict] = []  # {"pattern", "mode": 500|drop|hang, "times": n or None}
        self.counter = 0

    def new_sha(self, key) -> str:
        self.counter += 1
        return hashlib.sha1(f"{key}:{self.counter}:{time.time_ns()}".encode()).hexdigest()

    def rule_for(self, line: str, body: bytes) -> dict | None:
        with self.lock:
            for rule in self.rules:
                in_body = rule.get("body") is None or re.search(rule["body"], body.decode(errors="replace"))
                if re.search(rule["pattern"], line) and in_body and rule["times"] != 0:
                    rule["times"] = None if rule["times"] is None else rule["times"] - 1
                    return rule
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub

    def log_message(self, *args):  # quiet
        pass

    # ---------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body=b"", headers: dict | None = None, error_code: str | None = None):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, error_code: str | None = None, headers=None):
        self._send(status, {"error": message}, {"X-Error-Message": message, **(headers or {})}, error_code)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        if not token or (self.hub.token is not None and token != self.hub.token):
            return None
        return TEST_USER

    def _handle(self):
        body = self._body() if self.command in ("POST", "PUT") else b""
        path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
        if path.startswith("/_control/"):
            return self._control(path, body)
        with self.hub.lock:
            self.hub.log.append(
                {"method": self.command, "path": path, "authorization": self.headers.get("Authorization")}
            )
        rule = self.hub.rule_for(f"{self.command} {path}", body)
        if rule and rule["mode"] == "drop":
            self.close_connection = True
            return
        if rule and rule["mode"] == "hang":
            time.sleep(rule.get("seconds", 3600))
            self.close_connection = True
            return
        if rule:
            return self._error(int(rule["mode"]), "Internal Error - injected by the test")
        try:
            self._route(path, query, body)
        except Exception as err:  # a bug here must reach the test as a 500, not as a hung client
            self._error(500, f"test server error: {type(err).__name__}: {err}")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    # ---------------------------------------------------------------- the Hub API
    def _route(self, path: str, query: dict, body: bytes):
        if path == "/api/whoami-v2":
            if not self._user():
                return self._error(401, "Invalid credentials in Authorization header")
            return self._send(200, {"name": TEST_USER, "type": "user", "orgs": [], "auth": {"type": "access_token"}})
        if path == "/api/repos/create" and self.command == "POST":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(/.*)?", path)
        if m:
            return self._api(TYPES[m[1]], m[2], m[3] or "", query, body)
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and self.command in ("GET", "HEAD"):
            return self._resolve(TYPES.get(f"{m[1]}", "model"), m[2], unquote(m[3]), unquote(m[4]))
        self._error(404, f"no route for {self.command} {path}")

    def _repo(self, repo_type: str, repo_id: str) -> dict | None:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo["private"] and not self._user()):
            return None
        return repo

    def _create(self, payload: dict):
        if not self._user():
            return self._error(401, "Invalid credentials in Authorization header")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or TEST_USER}/{payload['name']}"
        url = f"http://{self.headers['Host']}/{PREFIX[repo_type]}{repo_id}"
        with self.hub.lock:
            exists = (repo_type, repo_id) in self.hub.repos
            sha = self.hub.new_sha(repo_id)
            self.hub.repos.setdefault(
                (repo_type, repo_id),
                {
                    "private": payload.get("visibility") == "private" or bool(payload.get("private")),
                    "sdk": payload.get("sdk"),
                    "commits": {sha: {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}},
                    "main": sha,
                },
            )
        if exists:  # as the Hub: a 409 that still names the repo (create_repo(exist_ok=True) reads its url)
            message = "You already created this repo"
            return self._send(409, {"error": message, "url": url}, {"X-Error-Message": message})
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _snapshot(self, repo: dict, revision: str):
        sha = repo["main"] if revision in ("main", "HEAD") else revision
        return sha, repo["commits"].get(sha)

    def _api(self, repo_type: str, repo_id: str, rest: str, query: dict, body: bytes):
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return self._error(404, "Repository not found", "RepoNotFound")
        m = re.fullmatch(r"/(preupload|commit)/([^/]+)", rest)
        if m and self.command == "POST":
            if not self._user():
                return self._error(401, "Invalid credentials in Authorization header")
            if m[1] == "preupload":
                return self._preupload(repo, json.loads(body))
            return self._commit(repo, body, f"{PREFIX[repo_type]}{repo_id}")
        m = re.fullmatch(r"(?:/revision/([^/]+))?", rest)
        if m is not None:
            sha, files = self._snapshot(repo, unquote(m[1] or "main"))
            if files is None:
                return self._error(404, "Revision not found", "RevisionNotFound")
            info = {"id": repo_id, "sha": sha, "private": repo["private"], "siblings": [], "tags": []}
            info["siblings"] = [{"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)} for p, d in files.items()]
            if repo_type == "space":
                info.update(sdk=repo["sdk"], runtime={"stage": "BUILDING"})
            return self._send(200, info)
        m = re.fullmatch(r"/tree/([^/]+)(/.*)?", rest)
        if m:
            sha, files = self._snapshot(repo, unquote(m[1]))
            if files is None:
                return self._error(404, "Revision not found", "RevisionNotFound")
            return self._send(200, self._tree(files, unquote(m[2] or "").strip("/"), query))
        self._error(404, f"no route for {self.command} {rest}")

    def _tree(self, files: dict, base: str, query: dict) -> list[dict]:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{base}/" if base else ""
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
        if base and not entries and not folders:
            return []
        tree_oids = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "path": f} for f in folders]
        return sorted(entries + tree_oids, key=lambda e: e["path"])

    def _preupload(self, repo: dict, payload: dict):
        files = repo["commits"][repo["main"]]
        answer = []
        for entry in payload["files"]:
            existing = files.get(entry["path"])
            oid = git_blob_sha1(existing) if existing is not None else None
            answer.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": answer, "commitOid": repo["main"]})

    def _commit(self, repo: dict, body: bytes, url_path: str):
        with self.hub.lock:
            files = dict(repo["commits"][repo["main"]])
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif key != "header":
                    return self._error(400, f"this test Hub accepts regular files only, got {key!r}")
            sha = self.hub.new_sha("commit")
            repo["commits"][sha] = files
            repo["main"] = sha
        url = f"http://{self.headers['Host']}/{url_path}/commit/{sha}"
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str):
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return self._error(401, "Repository not found", "RepoNotFound")
        sha, files = self._snapshot(repo, revision)
        if files is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        if filename not in files:
            return self._error(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = files[filename]
        etag = f'"{git_blob_sha1(data)}"'
        headers = {"ETag": etag, "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}
        self._send(200, data, headers)

    # ---------------------------------------------------------------- test control
    def _control(self, path: str, body: bytes):
        hub = self.hub
        with hub.lock:
            if path == "/_control/requests":
                return self._send(200, hub.log)
            if path == "/_control/clear":
                hub.log.clear()
                hub.rules.clear()
                return self._send(200, {})
            if path == "/_control/fail":
                hub.rules.append({"times": None, **json.loads(body)})
                return self._send(200, {})
            if path == "/_control/repos":
                repos = {
                    f"{t}:{i}": {
                        "private": r["private"],
                        "sdk": r["sdk"],
                        "commits": len(r["commits"]),
                        "files": {p: base64.b64encode(d).decode() for p, d in r["commits"][r["main"]].items()},
                    }
                    for (t, i), r in hub.repos.items()
                }
                return self._send(200, repos)
        self._send(404, {"error": path})


class HubServer:
    """A test's handle on a hub_server.py process on 127.0.0.1 (a free port); `stop()` ends it."""

    def __init__(self, tmp_dir: str | Path, token: str | None = None):
        port_file = Path(tmp_dir) / "hub_server.port"
        command = [sys.executable, str(Path(__file__).resolve()), "--port-file", str(port_file)]
        self.process = subprocess.Popen(command + (["--token", token] if token else []))
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the test Hub server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"

    def env(self, tmp_dir: str | Path, token: str | None) -> dict[str, str]:
        """Environment of a client process: this endpoint, a private cache and home, no telemetry. Xet stays enabled
        (hf_xet may be installed): this server never offers it, so the client never tries it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and k != "PYTHONPATH"}
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(Path(tmp_dir) / "hf_home"),
            HF_HUB_CACHE=str(Path(tmp_dir) / "hf_cache"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            DIFFUSERS_VERBOSITY="error",
            PYTHONWARNINGS="ignore",
            OMP_NUM_THREADS="1",  # tiny models on a shared 2-core machine: one thread is ~10x faster
        )
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def _call(self, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data), timeout=30) as response:
            return json.loads(response.read())

    def requests(self) -> list[dict]:
        return self._call("/_control/requests")

    def clear(self) -> None:
        """Forget the request log and the failure rules (repos stay)."""
        self._call("/_control/clear", {})

    def fail(self, pattern: str, mode: str | int = 500, times: int | None = None, seconds: float = 3600, body=None):
        """Requests whose "METHOD /path" matches the regex `pattern` (and whose body matches `body`, if given:
        POST /api/repos/create names its repo only there) answer `mode`: an HTTP status, "drop" (close the
        connection unanswered) or "hang" (answer nothing for `seconds`); `times` requests, or all (None)."""
        rule = {"pattern": pattern, "mode": mode, "times": times, "seconds": seconds, "body": body}
        self._call("/_control/fail", rule)

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes] | None:
        repo = self._call("/_control/repos").get(f"{repo_type}:{repo_id}")
        return None if repo is None else {p: base64.b64decode(d) for p, d in repo["files"].items()}

    def repo(self, repo_id: str, repo_type: str = "model") -> dict | None:
        return self._call("/_control/repos").get(f"{repo_type}:{repo_id}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--port-file", required=True, help="written with the port once the server listens")
    parser.add_argument("--token", default=None, help="the only token accepted (default: any)")
    args = parser.parse_args()
    Handler.hub = Hub(args.token)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(args.port_file)  # atomic: the reader never sees a half-written port
    server.serve_forever()


if __name__ == "__main__":
    main()
