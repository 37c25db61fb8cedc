"""A local stand-in for the Hugging Face hub: the HTTP calls `huggingface_hub.upload_folder` makes (repo create,
validate-yaml, preupload, commit), on 127.0.0.1. It records what it received, and can be told to reject. It takes
a bearer token, or the basic auth that an endpoint URL with userinfo (`http://user:pw@127.0.0.1:port`) makes."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.reject_commit: int | None = None  # HTTP status to answer commits with
        self.fail_preupload: list[int] = []  # HTTP statuses to answer the next preupload calls with, one each
        self.calls: list[str] = []
        self.prs: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.calls.append(self.path)
                if not self.headers.get("Authorization", "").startswith(("Bearer ", "Basic ")):  # Basic: URL userinfo
                    return self._reply(401, {"error": "Invalid credentials"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}"
                    hub.repos[repo] = {"private": req.get("visibility") == "private"}
                    return self._reply(200, {"url": f"{hub.url}/{repo}"})
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and parts[4:5] == ["preupload"]:
                    if hub.fail_preupload:  # e.g. a 503, which huggingface_hub retries (and logs)
                        return self._reply(hub.fail_preupload.pop(0), {"error": "try again later"})
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if parts[:2] == ["api", "models"] and parts[4:5] == ["discussions"]:  # a pull request
                    hub.prs.append(json.loads(body)["title"])
                    return self._reply(200, {"num": len(hub.prs)})
                if parts[:2] == ["api", "models"] and parts[4:5] == ["commit"]:
                    if hub.reject_commit:
                        return self._reply(hub.reject_commit, {"error": "commit rejected by the test hub"})
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    files = {v["value"]["path"]: base64.b64decode(v["value"]["content"])
                             for v in lines if v["key"] == "file"}
                    repo, revision = f"{parts[2]}/{parts[3]}", unquote("/".join(parts[5:]))
                    pr = revision.startswith("refs/pr/")
                    hub.commits.append({"repo": repo, "revision": revision, "files": files, "pr": pr,
                                        "header": lines[0]["value"]})
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc{len(hub.commits)}",
                                             "commitOid": f"{len(hub.commits):040d}",
                                             "pullRequestUrl": f"{hub.url}/{repo}/discussions/1" if pr else None})
                return self._reply(404, {"error": f"not implemented: {self.path}"})

            def do_GET(self) -> None:  # noqa: N802
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and parts[4:5] == ["discussions"]:
                    num = int(parts[5])
                    return self._reply(200, {
                        "num": num, "title": hub.prs[num - 1], "isPullRequest": True, "status": "draft",
                        "createdAt": "2026-01-01T00:00:00.000Z", "repo": {"name": f"{parts[2]}/{parts[3]}",
                                                                          "type": "model"},
                        "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []})
                return self._reply(404, {"error": f"not implemented: GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
