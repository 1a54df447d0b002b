"""A small local stand-in for the Hugging Face Hub: the routes huggingface_hub's upload path calls, nothing more.

Read from huggingface_hub 2.4's ``HfApi.create_repo``, ``create_commit`` → ``_commit_api`` and ``lfs``:

- ``POST /api/repos/create``                     create_repo: ``{name, organization, type, visibility}``;
                                                  409 + ``url`` when it exists (``exist_ok`` swallows it)
- ``GET  /api/datasets/{ns}/{name}[/revision/{rev}]``  repo_info: create_repo calls it after a 401/403
- ``POST /api/validate-yaml``                     create_commit checks README.md's front matter first
- ``POST /api/datasets/{ns}/{name}/preupload/{rev}``  per file: ``regular`` (inline base64) or ``lfs``
- ``POST /datasets/{ns}/{name}.git/info/lfs/objects/batch``  git-lfs batch API: an upload + verify href per object
- ``PUT  /lfs-objects/{oid}``                     the upload href (a presigned URL on the Hub: no bearer token)
- ``POST /datasets/{ns}/{name}.git/info/lfs/objects/verify``
- ``POST /api/datasets/{ns}/{name}/commit/{rev}`` NDJSON: a ``header`` line, then ``file`` / ``lfsFile`` lines

With hf_xet installed huggingface_hub 2.x uploads large files through Xet (a separate CAS protocol) whatever
the server says, so tests set ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` and the LFS path above is used.

It records what arrives (repos with their private flag, files and bytes, commits, Authorization headers, any
route it does not know), answers 401 to a missing or wrong bearer token, 403 outside the token's namespace,
and can fail the next N commit calls with 429 / 412 (optionally with ``Retry-After``). It never imports our code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections import deque
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from aiohttp import web
from app_server import AppServer

LFS_SUFFIXES = {".parquet", ".arrow", ".png", ".jpg", ".gz", ".zip", ".bin", ".safetensors"}  # cf. .gitattributes


@dataclass
class Commit:
    message: str
    description: str
    files: dict[str, bytes]  # what this commit added: path -> bytes
    lfs_paths: list[str]  # which of them arrived as lfsFile lines
    oid: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)


class HubServer(AppServer):
    """``with HubServer(token="hf_x") as hub: hub.url``; inspect ``hub.repos``, ``hub.requests``, ``hub.unknown``."""

    def __init__(self, token: str, user: str = "tester"):
        self.token = token
        self.user = user  # the token's namespace: the only one it may create repos and commit in
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # oid (sha256) -> bytes that passed the PUT check
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header), in order
        self.unknown: list[tuple[str, str]] = []  # routes this stand-in does not implement
        self.commit_calls = 0
        self._commit_faults: deque[tuple[int, str | None, str | None]] = deque()
        self._upload_secret = secrets.token_hex(8)

    def fail_next_commits(
        self, status: int, times: int = 1, retry_after: str | None = None, message: str | None = None
    ) -> None:
        """Answer the next ``times`` commit calls with ``status`` (429 rate limit, 412 concurrent commit).

        ``message`` may hold ``{authorization}``: a careless server echoing the request's header back."""
        self._commit_faults.extend([(status, retry_after, message)] * times)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    @staticmethod
    def _error(status: int, message: str, code: str | None = None, **headers: str) -> web.Response:
        if code:
            headers["X-Error-Code"] = code
        return web.json_response({"error": message}, status=status, headers=headers)

    def _repo_or_error(self, request: web.Request, write: bool) -> Repo | web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid credentials in Authorization header")
        repo_id = f"{request.match_info['ns']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(404, "Repository not found", "RepoNotFound")
        if write and request.match_info["ns"] != self.user:
            return self._error(403, f"You don't have the rights to write to datasets/{repo_id}")
        return repo

    # -- routes -----------------------------------------------------------------------------------------------
    @web.middleware
    async def _record(self, request: web.Request, handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        return await handler(request)

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid credentials in Authorization header")
        body = await request.json()
        if body.get("type") != "dataset":
            return self._error(400, "this stand-in only hosts dataset repos")
        namespace = body.get("organization") or self.user
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.url}/datasets/{repo_id}"
        if namespace != self.user:
            return self._error(403, f"You don't have the rights to create a dataset under the namespace {namespace}")
        if repo_id in self.repos:
            return web.json_response({"error": "You already created this dataset repo", "url": url}, status=409)
        private = body.get("visibility") == "private" or body.get("private") is True
        self.repos[repo_id] = Repo(repo_id=repo_id, private=private)
        return web.json_response({"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    async def _info(self, request: web.Request) -> web.Response:
        repo = self._repo_or_error(request, write=False)
        if isinstance(repo, web.Response):
            return repo
        head = repo.commits[-1].oid if repo.commits else "0" * 40
        siblings = [{"rfilename": path} for path in sorted(repo.files)]
        return web.json_response({"id": repo.repo_id, "sha": head, "private": repo.private, "siblings": siblings})

    async def _validate_yaml(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid credentials in Authorization header")
        body = await request.json()
        if not body.get("content", "").startswith("---\n"):
            return web.json_response({"errors": [{"message": "README.md has no YAML front matter"}]}, status=400)
        return web.json_response({"errors": [], "warnings": []})

    async def _preupload(self, request: web.Request) -> web.Response:
        repo = self._repo_or_error(request, write=True)
        if isinstance(repo, web.Response):
            return repo
        files = []
        for item in (await request.json())["files"]:
            sample = base64.b64decode(item["sample"])
            binary = b"\0" in sample or PurePosixPath(item["path"]).suffix in LFS_SUFFIXES
            lfs = binary or item["size"] >= 10 * 1024 * 1024
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return web.json_response({"files": files, "commitOid": "0" * 40})

    async def _lfs_batch(self, request: web.Request) -> web.Response:
        repo = self._repo_or_error(request, write=True)
        if isinstance(repo, web.Response):
            return repo
        body = await request.json()
        prefix = f"{self.url}/datasets/{repo.repo_id}.git/info/lfs/objects"
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-objects/{obj['oid']}?sig={self._upload_secret}"},
                    "verify": {"href": f"{prefix}/verify"},
                }
            objects.append(entry)
        return web.json_response({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    async def _lfs_put(self, request: web.Request) -> web.Response:
        if request.query.get("sig") != self._upload_secret:
            return web.Response(status=403, text="bad signature")
        data = await request.read()
        oid = request.match_info["oid"]
        if hashlib.sha256(data).hexdigest() != oid:
            return web.Response(status=400, text="content does not match oid")
        self.lfs[oid] = data
        return web.Response(status=200)

    async def _lfs_verify(self, request: web.Request) -> web.Response:
        repo = self._repo_or_error(request, write=True)
        if isinstance(repo, web.Response):
            return repo
        body = await request.json()
        if len(self.lfs.get(body["oid"], b"")) != body["size"] or body["oid"] not in self.lfs:
            return self._error(404, "object not uploaded")
        return web.json_response({})

    async def _commit(self, request: web.Request) -> web.Response:
        repo = self._repo_or_error(request, write=True)
        if isinstance(repo, web.Response):
            return repo
        self.commit_calls += 1
        if self._commit_faults:
            status, retry_after, message = self._commit_faults.popleft()
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            default = {429: "Too Many Requests", 412: "A commit has happened since. Please refresh and try again."}
            text = (message or default.get(status, "injected fault")).format(
                authorization=request.headers.get("Authorization", "")
            )
            return self._error(status, text, **headers)
        lines = [json.loads(line) for line in (await request.read()).splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._error(400, "first line must be the commit header")
        header = lines[0]["value"]
        added: dict[str, bytes] = {}
        lfs_paths = []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return self._error(422, f"LFS object {value['oid']} was never uploaded")
                added[value["path"]] = self.lfs[value["oid"]]
                lfs_paths.append(value["path"])
            else:
                return self._error(400, f"unsupported commit line {line['key']}")
        parent = repo.commits[-1].oid if repo.commits else ""
        oid = hashlib.sha1(f"{parent}{header['summary']}{sorted(added)}".encode()).hexdigest()
        repo.commits.append(Commit(header["summary"], header.get("description", ""), added, lfs_paths, oid))
        repo.files.update(added)
        return web.json_response(
            {"commitUrl": f"{self.url}/datasets/{repo.repo_id}/commit/{oid}", "commitOid": oid, "success": True}
        )

    async def _unknown(self, request: web.Request) -> web.Response:
        self.unknown.append((request.method, request.path))
        return self._error(404, f"{request.method} {request.path} is not implemented by the test Hub")

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=256 * 1024 * 1024)
        repo = "/datasets/{ns}/{name}"
        app.router.add_post("/api/repos/create", self._create)
        app.router.add_get(f"/api{repo}", self._info)
        app.router.add_get(f"/api{repo}/revision/{{rev}}", self._info)
        app.router.add_post("/api/validate-yaml", self._validate_yaml)
        app.router.add_post(f"/api{repo}/preupload/{{rev}}", self._preupload)
        app.router.add_post(f"/api{repo}/commit/{{rev}}", self._commit)
        app.router.add_post(f"{repo}.git/info/lfs/objects/batch", self._lfs_batch)
        app.router.add_post(f"{repo}.git/info/lfs/objects/verify", self._lfs_verify)
        app.router.add_put("/lfs-objects/{oid}", self._lfs_put)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app
