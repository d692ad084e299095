"""A local stand-in for the Hugging Face Hub's HTTP API, for tests: a real HTTP server on 127.0.0.1.

The real clients talk to it unmocked: give `HfApi(endpoint=stand_in.url)`, or set
HF_ENDPOINT=stand_in.url before huggingface_hub / datasets / transformers are imported (they read it
at import time), and snapshot_download, hf_hub_download, HfApi().model_info / dataset_info /
list_repo_tree / upload_folder, HfFileSystem and datasets.load_dataset("owner/name") work against it.

    stand_in = HubStandIn()
    sha = stand_in.add_model("org/tiny", "/path/to/folder", gated=True)    # or {path: bytes}
    stand_in.add_dataset("org/prefs", {"README.md": b"---...", "data/train-00000-of-00001.parquet": b"..."})
    ...
    stand_in.close()

Endpoints ({kind}: models, datasets; {rev}: "main" or a commit sha of the repo, URL-quoted):
  GET       /api/{kind}/{repo}, /api/{kind}/{repo}/revision/{rev}   repo info: id, sha, private, gated
                                                      ("manual" or false), siblings (+ size, blobId,
                                                      lfs with ?blobs=true)
  GET       /api/{kind}/{repo}/tree/{rev}[/{path}]    ?recursive=&expand=: files and folders, one page
  POST      /api/{kind}/{repo}/paths-info/{rev}       form paths=...&expand=: the entries that exist
  HEAD, GET /{repo}/resolve/{rev}/{path}, /datasets/{repo}/resolve/{rev}/{path}
            content, served directly (no CDN redirect) with ETag (git blob sha1, or sha256 for LFS-like
            files, which also get X-Linked-Etag / X-Linked-Size), X-Repo-Commit, Content-Length,
            Accept-Ranges, one byte range per request (206; 416 past the end)
  POST      /api/repos/create                         409 with the url when the repo exists
  POST      /api/validate-yaml
  POST      /api/{kind}/{repo}/preupload/{rev}        every file "regular" (never LFS / Xet), with the
                                                      remote blob oid so unchanged files are skipped
  POST      /api/{kind}/{repo}/commit/main            ndjson: header, file (base64), deletedFile,
                                                      deletedFolder; 412 on a stale parentCommit
Errors carry X-Error-Code / X-Error-Message, which huggingface_hub's hf_raise_for_status maps:
  unknown repo, or private without access: 401 without a token, 404 with one; RepoNotFound
      -> RepositoryNotFoundError (datasets: DatasetNotFoundError)
  unknown revision: 404 RevisionNotFound -> RevisionNotFoundError
  missing file or folder: 404 EntryNotFound (+ X-Repo-Commit) -> RemoteEntryNotFoundError
  a gated repo's files without access: 401 without a token, 403 with another one; GatedRepo
      -> GatedRepoError. As on the Hub, a gated repo's info, tree and paths-info are public.
Access: "Authorization: Bearer <stand_in.token>" sees private and gated repos, and so does the token
that created a repo through /api/repos/create. Uploads accept any token. Everything is in memory; a commit makes a new deterministic 40-hex sha (from the repo id and
its files) and older shas of the repo keep resolving to their files.

Attributes: failures [statuses the next requests are answered with, one each, before any is served:
[503, 502] makes the next two requests fail], url, token, requests [(method, raw request target incl. query)], repos [(repo_id, private)
per create call], files {path: bytes} of everything committed (all repos; deletions removed),
deleted [paths deleted by commits], commits [{repo, kind, sha, added, deleted}].
"""

import base64
import functools
import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                ".onnx", ".gguf", ".arrow", ".npz", ".zip", ".gz", ".tar")
DATE = "2024-01-01T00:00:00.000Z"
URL_PREFIX = {"models": "", "datasets": "datasets/", "spaces": "spaces/"}
REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
API_PATH = re.compile(r"/api/(?P<kind>models|datasets|spaces)/" + REPO + r"(?:/(?P<action>revision"
                      r"|tree|paths-info|preupload|commit)/(?P<rev>[^/]+)(?:/(?P<rest>.*))?)?")
RESOLVE_PATH = re.compile(r"/(?:(?P<kind>datasets|spaces)/)?" + REPO + r"/resolve/(?P<rev>[^/]+)/(?P<rest>.+)")


class _HubError(Exception):
    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.lru_cache(maxsize=4096)
def _blob(data: bytes) -> dict:
    """Git and LFS identities of a file's content (an LFS file's git oid is its pointer's)."""
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
    return {"oid": _git_oid(data), "sha256": sha256, "pointer_oid": _git_oid(pointer.encode()),
            "pointer_size": len(pointer)}


def _is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) > 10 * 2**20


class _Repo:
    def __init__(self, kind, repo_id, *, private=False, gated=False):
        self.kind, self.id, self.private, self.gated = kind, repo_id, private, gated
        self.owner = None  # the token that created it through the API: it may read it too
        self.snapshots = {}  # commit sha -> {path: bytes}
        self.head = self.commit({})

    def commit(self, files: dict) -> str:
        listing = sorted((p, _blob(b)["sha256"]) for p, b in files.items())
        sha = hashlib.sha1(json.dumps([self.kind, self.id, listing]).encode()).hexdigest()
        self.snapshots[sha], self.head = dict(files), sha
        return sha

    def at(self, rev: str):
        sha = self.head if rev in ("main", "refs/heads/main") else rev
        if sha not in self.snapshots:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha, self.snapshots[sha]


def _dirs(files) -> set:
    return {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}


def _entry(path, files, sha, expand):
    if path in files:
        data, blob = files[path], _blob(files[path])
        entry = {"type": "file", "oid": blob["oid"], "size": len(data), "path": path}
        if _is_lfs(path, data):
            entry["oid"] = blob["pointer_oid"]
            entry["lfs"] = {"oid": blob["sha256"], "size": len(data), "pointerSize": blob["pointer_size"]}
    else:
        entry = {"type": "directory", "oid": hashlib.sha1(f"{sha}:{path}".encode()).hexdigest(),
                 "size": 0, "path": path}
    if expand:
        entry["lastCommit"] = {"id": sha, "title": "Upload", "date": DATE}
    return entry


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    # -- plumbing ----------------------------------------------------------------------------

    def _send(self, status, body: bytes, headers: dict, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=200, headers=None):
        self._send(status, json.dumps(obj).encode(), headers or {})

    def _route(self, method):
        hub = self.server.hub
        hub.requests.append((method, self.path))
        if hub.failures:
            status = hub.failures.pop(0)
            return self._json({"error": f"stand-in failure {status}"}, status,
                              {"X-Error-Message": f"stand-in failure {status}"})
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        self.token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        try:
            if method == "POST" and url.path == "/api/repos/create":
                return self._create(hub)
            if method == "POST" and url.path == "/api/validate-yaml":
                return self._json({"errors": [], "warnings": []})
            m = API_PATH.fullmatch(url.path) or RESOLVE_PATH.fullmatch(url.path)
            if m is None:
                raise _HubError(404, None, f"Sorry, we can't find the page you are looking for: {url.path}")
            kind, action = m["kind"] or "models", m.groupdict().get("action")
            args = (hub, kind, unquote(m["repo"]), unquote(m["rev"] or "main"), unquote(m["rest"] or ""))
            if m.re is RESOLVE_PATH and method in ("GET", "HEAD"):
                return self._resolve(*args)
            handler = {("GET", None): self._info, ("GET", "revision"): self._info,
                       ("GET", "tree"): self._tree, ("POST", "paths-info"): self._paths_info,
                       ("POST", "preupload"): self._preupload, ("POST", "commit"): self._commit,
                       }.get((method, action) if m.re is API_PATH else None)
            if handler is None:
                raise _HubError(404 if method != "POST" else 405, None, f"{method} {url.path} is not served")
            handler(*args)
        except _HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._json({"error": e.message}, e.status, headers)

    def _repo(self, hub, kind, repo_id, *, read=True, files=False) -> _Repo:
        repo = hub._repos.get((kind, repo_id))
        granted = self.token is not None and self.token in (hub.token, repo and repo.owner)
        if repo is None or (read and repo.private and not granted):
            raise _HubError(404 if self.token else 401, "RepoNotFound", "Repository not found")
        if files and repo.gated and not granted:
            what = kind[:-1]
            if self.token is None:
                raise _HubError(401, "GatedRepo", f"Access to {what} {repo_id} is restricted. You must "
                                "have access to it and be authenticated to access it. Please log in.")
            raise _HubError(403, "GatedRepo", f"Access to {what} {repo_id} is restricted and you are not "
                            f"in the authorized list. Visit {hub.url}/{URL_PREFIX[kind]}{repo_id} to ask for access.")
        return repo

    # -- reads -------------------------------------------------------------------------------

    def _info(self, hub, kind, repo_id, rev, _):
        repo = self._repo(hub, kind, repo_id)
        sha, files = repo.at(rev)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, data in sorted(files.items()):
            sibling = {"rfilename": path}
            if blobs:
                entry = _entry(path, files, sha, False)
                sibling.update(size=len(data), blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": len(data),
                                      "pointerSize": entry["lfs"]["pointerSize"]}
            siblings.append(sibling)
        info = {"_id": sha[:24], "id": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "lastModified": DATE, "createdAt": DATE, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(len(b) for b in files.values())}
        if kind == "models":
            info["modelId"] = repo_id
        self._json(info)

    def _tree(self, hub, kind, repo_id, rev, path):
        sha, files = self._repo(hub, kind, repo_id).at(rev)
        path, dirs = path.strip("/"), _dirs(files)
        if path and path not in dirs:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
        prefix = path + "/" if path else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        names = [p for p in sorted(dirs) + sorted(files)
                 if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]
        self._json([_entry(p, files, sha, expand) for p in names])

    def _paths_info(self, hub, kind, repo_id, rev, _):
        sha, files = self._repo(hub, kind, repo_id).at(rev)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(self.body or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(self.body.decode())
            paths, expand = form.get("paths", []), form.get("expand", [""])[-1].lower() in ("1", "true")
        dirs = _dirs(files)
        paths = [p.strip("/") for p in ([paths] if isinstance(paths, str) else paths)]
        self._json([_entry(p, files, sha, expand) for p in paths if p in files or p in dirs])

    def _resolve(self, hub, kind, repo_id, rev, path):
        sha, files = self._repo(hub, kind, repo_id, files=True).at(rev)
        if path not in files:
            raise _HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        data, blob = files[path], _blob(files[path])
        name = path.rsplit("/", 1)[-1]
        headers = {"ETag": f'"{blob["oid"]}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"}
        if _is_lfs(path, data):
            headers.update({"ETag": f'"{blob["sha256"]}"', "X-Linked-Etag": f'"{blob["sha256"]}"',
                            "X-Linked-Size": str(len(data))})
        status, start, end = 200, 0, len(data)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if m and (m[1] or m[2]):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) + 1, len(data)) if m[2] else len(data)
            else:
                start = max(len(data) - int(m[2]), 0)
            if start >= end:
                raise _HubError(416, None, "Range Not Satisfiable",
                                {"Content-Range": f"bytes */{len(data)}", "X-Repo-Commit": sha})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{len(data)}"
        if self.command == "GET" and hub.download_delay:
            time.sleep(hub.download_delay)  # a slow link, so concurrent downloads would overlap
        self._send(status, data[start:end], headers, "application/octet-stream")

    # -- writes ------------------------------------------------------------------------------

    def _create(self, hub):
        body = json.loads(self.body)
        org, name = body.get("organization"), body["name"]
        repo_id = f"{org}/{name}" if org else name
        kind = {"dataset": "datasets", "space": "spaces"}.get(body.get("type"), "models")
        private = bool(body.get("private", body.get("visibility") == "private"))
        hub.repos.append((repo_id, private))
        url = f"{hub.url}/{URL_PREFIX[kind]}{repo_id}"
        with hub._lock:
            if (kind, repo_id) in hub._repos:
                return self._json({"error": f"You already created this {kind[:-1]} repo", "url": url}, 409,
                                  {"X-Error-Message": f"You already created this {kind[:-1]} repo"})
            repo = hub._repos[(kind, repo_id)] = _Repo(kind, repo_id, private=private)
            repo.owner = self.token
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, hub, kind, repo_id, rev, _):
        files = self._repo(hub, kind, repo_id, read=False).at(rev)[1]
        self._json({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             **({"oid": _blob(files[f["path"]])["oid"]} if f["path"] in files else {})}
            for f in json.loads(self.body)["files"]]})

    def _commit(self, hub, kind, repo_id, rev, _):
        repo = self._repo(hub, kind, repo_id, read=False)
        with hub._lock:
            parent, files = repo.at(rev)
            files, added, deleted = dict(files), [], []
            for line in self.body.decode().splitlines():
                op = json.loads(line) if line.strip() else {"key": None}
                value = op.get("value") or {}
                if op["key"] == "header" and value.get("parentCommit") not in (None, parent):
                    raise _HubError(412, None, "A commit has happened since. Please refresh and try again.")
                elif op["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    added.append(value["path"])
                elif op["key"] in ("deletedFile", "deletedFolder"):
                    path = value["path"].strip("/")
                    gone = ([path] if op["key"] == "deletedFile" else
                            [p for p in files if p.startswith(path + "/")])
                    if not gone or gone[0] not in files:
                        raise _HubError(404, "EntryNotFound", f"{path} does not exist on {rev}")
                    for p in gone:
                        del files[p]
                    deleted += gone
                elif op["key"] == "lfsFile":
                    raise _HubError(400, None, "the stand-in takes regular (base64) files only")
            sha = repo.commit(files)
            for p in deleted:
                hub.files.pop(p, None)
            hub.files.update({p: files[p] for p in added if p in files})
            hub.deleted += deleted
            hub.commits.append({"repo": repo_id, "kind": kind, "sha": sha, "added": added,
                                "deleted": deleted})
        url = f"{hub.url}/{URL_PREFIX[kind]}{repo_id}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": ""})


class HubStandIn:
    """The Hub on 127.0.0.1 (see the module docstring); `close()` it, or use it as a context manager."""

    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.download_delay = 0.0  # seconds before each file's bytes are sent
        self.failures = []  # statuses the next requests get instead of an answer
        self.repos, self.files, self.requests, self.deleted, self.commits = [], {}, [], [], []
        self._repos, self._lock = {}, threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_model(self, repo_id: str, files, *, gated=False, private=False) -> str:
        """Serves `files` ({path: bytes}, or a local folder read recursively) as a model repo; returns its sha."""
        return self._add("models", repo_id, files, gated=gated, private=private)

    def add_dataset(self, repo_id: str, files, *, gated=False, private=False) -> str:
        """Serves `files` ({path: bytes}, or a local folder read recursively) as a dataset repo; returns its sha."""
        return self._add("datasets", repo_id, files, gated=gated, private=private)

    def sha(self, repo_id: str, repo_type: str = "model") -> str:
        """The current commit sha of a repo (repo_type "model" or "dataset")."""
        return self._repos[(repo_type + "s", repo_id)].head

    def _add(self, kind, repo_id, files, *, gated, private):
        if isinstance(files, (str, os.PathLike)):
            root, files = os.fspath(files), {}
            for folder, subdirs, names in os.walk(root):
                subdirs[:] = sorted(d for d in subdirs if d not in (".git", ".cache"))
                for name in names:
                    path = os.path.join(folder, name)
                    with open(path, "rb") as f:
                        files[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
        with self._lock:
            repo = self._repos[(kind, repo_id)] = _Repo(kind, repo_id, private=private, gated=gated)
            return repo.commit({p: bytes(b) for p, b in files.items()})

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

