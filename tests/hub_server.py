"""A small Hub-compatible endpoint on 127.0.0.1 for the push tests (not a test module): the part of the Hub API that
`HfApi.whoami`, `create_repo` and `upload_folder` use, with regular (non-LFS) uploads, so that the real pushing code
runs against it with `HF_ENDPOINT` pointing here. It keeps every repository's files in memory and stops with its
context manager.

Endpoints: GET /api/whoami-v2; POST /api/repos/create (409 when the repository exists); POST /api/validate-yaml
(the README's front matter must parse as a mapping); POST /api/{type}s/{namespace}/{name}/preupload/{revision}
(every file "regular"); POST /api/{type}s/{namespace}/{name}/commit/{revision} (ndjson: header, file, deletedFile).
Anything else is answered 404 and recorded in `unknown_requests`.
"""

import base64
import hashlib
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

TOKEN = "hf_local_test_token"
USER = "tester"
_REPO_PATH = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)")


@dataclass
class Repository:
    repo_type: str
    sdk: str = None
    files: dict = field(default_factory=dict)  # path -> bytes
    commits: list = field(default_factory=list)  # commit messages


@dataclass
class HubState:
    endpoint: str = ""
    repos: dict = field(default_factory=dict)  # (type, repo_id) -> Repository
    unknown_requests: list = field(default_factory=list)


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _reply(self, status: int, payload) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._reply(401, {"error": "Invalid credentials"})
                return False
            return True

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self):
            if self.path.startswith("/api/whoami-v2"):
                if self._authorised():
                    self._reply(200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})
                return
            state.unknown_requests.append(("GET", self.path))
            self._reply(404, {"error": f"not served here: GET {self.path}"})

        def do_POST(self):
            body = self._body()
            if not self._authorised():
                return
            if self.path.startswith("/api/repos/create"):
                payload = json.loads(body)
                repo_type = payload.get("type") or "model"
                repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
                key = (repo_type, repo_id)
                if key in state.repos:
                    return self._reply(409, {"error": "You already created this repo", "url": repo_id})
                state.repos[key] = Repository(repo_type=repo_type, sdk=payload.get("sdk"))
                prefix = "" if repo_type == "model" else f"{repo_type}s/"
                return self._reply(200, {"url": f"{state.endpoint}/{prefix}{repo_id}"})
            if self.path.startswith("/api/validate-yaml"):
                content = json.loads(body)["content"]
                match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
                try:
                    valid = match is None or isinstance(yaml.safe_load(match.group(1)), dict)
                except yaml.YAMLError:
                    valid = False
                if not valid:
                    return self._reply(400, {"errors": [{"message": "front matter is not a YAML mapping"}]})
                return self._reply(200, {"errors": [], "warnings": []})
            match = _REPO_PATH.match(self.path)
            if match:
                repo_type, repo_id, action, _ = match.groups()
                repository = state.repos.get((repo_type[:-1], repo_id))
                if repository is None:
                    return self._reply(404, {"error": "Repository not found"})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]})  # fmt: skip
                message = None
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        message = item["value"]["summary"]
                    elif item["key"] == "file":
                        value = item["value"]
                        repository.files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        repository.files.pop(item["value"]["path"], None)
                    else:
                        return self._reply(400, {"error": f"unsupported commit operation {item['key']}"})
                repository.commits.append(message)
                oid = hashlib.sha1(f"{repo_id}{len(repository.commits)}".encode()).hexdigest()
                prefix = "" if repo_type == "models" else f"{repo_type}/"
                return self._reply(200, {"commitUrl": f"{state.endpoint}/{prefix}{repo_id}/commit/{oid}",
                                         "commitOid": oid, "pullRequestUrl": None})  # fmt: skip
            state.unknown_requests.append(("POST", self.path))
            self._reply(404, {"error": f"not served here: POST {self.path}"})

    return Handler


@contextmanager
def local_hub():
    """Serve a `HubState` on 127.0.0.1 (a free port) for the duration of the block; yields the state (its
    `endpoint` is the URL to give as HF_ENDPOINT, with HF_TOKEN = `TOKEN`)."""
    state = HubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def hub_environment(state: HubState, base: dict) -> dict:
    """`base` (an environment) pointed at the local endpoint, online, with its token, without Xet."""
    env = {key: value for key, value in base.items() if key not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    return {**env, "HF_ENDPOINT": state.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
