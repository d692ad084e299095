"""A local stand-in for the Hugging Face Hub's HTTP API: records repos and committed files."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


class HubStandIn:
    def __init__(self):
        self.repos, self.files, self.requests = [], {}, []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                stand_in.requests.append(("GET", self.path))
                self._send(404, {"error": "not found"})

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stand_in.requests.append(("POST", self.path))
                base = f"http://127.0.0.1:{self.server.server_port}"
                if self.path.startswith("/api/repos/create"):
                    body = json.loads(data)
                    repo = f"{body['organization']}/{body['name']}"
                    private = body.get("private", body.get("visibility") == "private")
                    stand_in.repos.append((repo, private))
                    return self._send(200, {"url": f"{base}/{repo}", "name": repo})
                if self.path.startswith("/api/validate-yaml"):
                    return self._send(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(data)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                if "/commit/" in self.path:
                    for line in data.decode().splitlines():
                        op = json.loads(line)
                        if op["key"] == "file":
                            stand_in.files[op["value"]["path"]] = base64.b64decode(
                                op["value"]["content"])
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._send(200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}",
                                            "commitOid": "a" * 40, "success": True})
                self._send(404, {"error": self.path})

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
