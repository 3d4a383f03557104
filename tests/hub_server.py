"""A local stand-in for the Hub's HTTP API that records what `huggingface_hub` uploads (point `HF_ENDPOINT` at it).

It answers the calls that `create_repo` and `upload_folder` make: repository creation, model card validation,
pre-upload (every file is declared "regular", so contents travel inline in the commit) and commits, whose files it
keeps per repository.
Anything else gets a 404 and is listed in `unhandled`, so a test sees when the client starts using another API.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER = "test-user"


class RecordingHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[tuple[str, str, list[str]]] = []
        self.authorizations: set[str] = set()
        self.unhandled: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                hub.authorizations.add(self.headers.get("Authorization", ""))
                if self.path.startswith("/api/whoami"):
                    return self._reply(200, {"name": USER, "type": "user", "orgs": [], "auth": {}})
                if self.path.startswith("/api/agent-harnesses"):  # the client's best-effort agent detection
                    return self._reply(200, [])
                hub.unhandled.append(f"GET {self.path}")
                self._reply(404, {"error": "not recorded by the test hub"})

            def do_POST(self):
                hub.authorizations.add(self.headers.get("Authorization", ""))
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "validate-yaml"]:  # model card metadata check
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or USER}/{request['name']}"
                    with hub._lock:
                        hub.repos.setdefault(repo_id, {})
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models" and parts[4] == "preupload":
                    files = json.loads(body).get("files", [])
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models" and parts[4] == "commit":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next((line["value"] for line in lines if line["key"] == "header"), {})
                    paths = []
                    with hub._lock:
                        files = hub.repos.setdefault(repo_id, {})
                        for line in lines:
                            if line["key"] == "file":
                                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                                paths.append(line["value"]["path"])
                        hub.commits.append((repo_id, header.get("summary", ""), paths))
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}",
                                             "commitOid": oid, "success": True})
                hub.unhandled.append(f"POST {self.path}")
                self._reply(404, {"error": "not recorded by the test hub"})

        return Handler
