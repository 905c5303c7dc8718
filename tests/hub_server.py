"""A small Hub-compatible HTTP server on 127.0.0.1, for testing pushes with the real huggingface_hub
client: just the routes the upload path uses (repo create, branch create, YAML validation,
preupload, LFS batch and PUT with a sha256 check, NDJSON commit).

`fail` makes a route answer with a status (e.g. {"commit": 500}); `requests` records every
request (method, path, headers, body) so tests can look for the token and the flags sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

TOKEN = "hf_fake_token_0123456789abcdefghij"


@dataclass
class HubState:
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo -> {"private": bool, "branches": {name: {path: bytes}}}
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # route name -> status to answer
    commits: int = 0


ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate"),
    ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)$"), "branch"),
    ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)$"), "preupload"),
    ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)$"), "commit"),
    ("POST", re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$"), "batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "upload"),
]


def make_handler(state: HubState, base_url: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: Any = None) -> None:
            data = json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urlparse(self.path).path
            state.requests.append({"method": method, "path": self.path, "headers": dict(self.headers), "body": body})
            for route_method, pattern, name in ROUTES:
                match = pattern.match(path)
                if route_method == method and match:
                    if name in state.fail:
                        return self._reply(state.fail[name], {"error": f"fake hub: {name} refused"})
                    if name not in ("upload",) and self.headers.get("authorization") != f"Bearer {TOKEN}":
                        return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return getattr(self, f"_{name}")(body, **{k: unquote(v) for k, v in match.groupdict().items()})
            self._reply(404, {"error": f"fake hub: no route {method} {path}"})

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def _create(self, body: bytes) -> None:
            payload = json.loads(body)
            repo = f"{payload.get('organization') or 'user'}/{payload['name']}" if "/" not in payload["name"] \
                else payload["name"]
            url = {"url": f"{base_url[0]}/{repo}"}
            if repo in state.repos:
                return self._reply(409, {"error": "You already created this model repo", **url})
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            state.repos[repo] = {"private": private, "branches": {"main": {}}}
            self._reply(200, url)

        def _validate(self, body: bytes) -> None:
            content = json.loads(body)["content"]
            if not content.startswith("---\n") or "\n---\n" not in content[4:]:
                return self._reply(400, {"error": "no YAML metadata block"})
            self._reply(200, {"warnings": []})

        def _branch(self, body: bytes, repo: str, branch: str) -> None:
            branches = state.repos[repo]["branches"]
            if branch in branches:
                return self._reply(409, {"error": "Reference already exists"})
            branches[branch] = dict(branches["main"])
            self._reply(200)

        def _preupload(self, body: bytes, repo: str, rev: str) -> None:
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                      "shouldIgnore": False} for f in files]
            self._reply(200, {"files": modes})

        def _batch(self, body: bytes, repo: str) -> None:
            objects = [{"oid": o["oid"], "size": o["size"],
                        "actions": {"upload": {"href": f"{base_url[0]}/lfs-upload/{o['oid']}"}}}
                       for o in json.loads(body)["objects"]]
            self._reply(200, {"transfer": "basic", "objects": objects})

        def _upload(self, body: bytes, oid: str) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._reply(400, {"error": "sha256 mismatch"})
            state.lfs[oid] = body
            self._reply(200)

        def _commit(self, body: bytes, repo: str, rev: str) -> None:
            branch = state.repos[repo]["branches"].setdefault(rev, {})
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    branch[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in state.lfs:
                        return self._reply(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    branch[value["path"]] = state.lfs[value["oid"]]
            state.commits += 1
            oid = hashlib.sha1(str(state.commits).encode()).hexdigest()
            pr = "create_pr=1" in self.path
            self._reply(200, {"commitUrl": f"{base_url[0]}/{repo}/commit/{oid}", "commitOid": oid,
                              "pullRequestUrl": f"{base_url[0]}/{repo}/discussions/1" if pr else None})

    return Handler


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint."""

    def __init__(self) -> None:
        self.state = HubState()
        base: list[str] = [""]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state, base))
        self.url = base[0] = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
