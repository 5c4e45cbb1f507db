"""A stand-in for the W&B server on 127.0.0.1 (an online run, its artifact uploads and reads), and a reader for W&B's
offline transaction log.

W&B has no local server. This small threaded HTTP server answers exactly the requests wandb 0.31 sends (found by
running the SDK against it and logging each one: :attr:`WandBStandIn.requests`) for

- an online run of ``WandBLogger(log_artifacts=True)``: ``RunResumeStatus``, ``UpsertBucket``,
  ``OrganizationCoreWeaveOrganizationID``, the file stream (``POST /files/<entity>/<project>/<run>/file_stream``:
  history rows, summary, console), ``CreateRunFiles`` and the PUTs of the run's own files; and per checkpoint
  ``Viewer``, ``ArtifactType``, ``ServerFeaturesQuery``, ``CreateArtifact``, ``CreateArtifactManifest`` (twice),
  ``CreateArtifactFiles``, the PUTs of the file and of the manifest, ``CommitArtifact`` (which checks each
  manifest entry against the bytes PUT for it and moves the aliases) and ``ArtifactByID`` (``Artifact.wait()``);
- ``wandb.Api().artifact(...)`` and a file's download: ``Viewer``/``GetDefaultEntity``, ``ServerFeaturesQuery``,
  ``ArtifactMembershipByName``, ``FetchArtifactManifest``, ``GET /manifests/<id>``, ``GET /artifactsV2/...``.

Uploads land in :attr:`WandBStandIn.uploads` (``PUT /uploads/<key>``); a test can also put artifacts in directly
with :meth:`WandBStandIn.add_artifact`. Any operation it does not know is recorded in :attr:`WandBStandIn.unknown`
and answered with an error, and one it refuses (a commit without its files) in :attr:`WandBStandIn.refused`, so
that a test sees it. Not spoken: multipart uploads (files over W&B's multipart threshold), resuming a run online
with history (``RunResumeStatus`` returns what the stand-in holds, untested), linking to a registry.

:func:`transaction_log` reads the records of a run's ``.wandb`` file (what offline mode writes): wandb 0.31 no
longer ships a reader, and the format is LevelDB's log (a 7-byte header ``:W&B`` + magic + version, then 32 KiB
blocks of records, each with a 7-byte header: CRC32C, length, type FULL/FIRST/MIDDLE/LAST) of ``Record`` protos.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from store_servers.local_http import LocalHTTPStandIn

__all__ = ["WandBStandIn", "finished_log", "history_steps", "transaction_log"]

_BLOCK = 32768
_HEADER = 7


def transaction_log(path: str) -> Iterator[Any]:
    """The ``Record`` protos of a W&B run's ``.wandb`` file, in order (a record cut off at the end is left out)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as file:
        data = file.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        position += _HEADER
        if position + length > len(data):
            return
        pending += data[position : position + length]
        position += length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_log(path: str, timeout: float = 60.0) -> list[Any]:
    """The records of a finished run's ``.wandb`` file, once its ``exit`` record is on disk: wandb 0.31's
    ``run.finish()`` can return before W&B's service has written the file (seen about one time in five)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(transaction_log(path)) if os.path.exists(path) else []
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"W&B never wrote the end of its run to {path}")
        time.sleep(0.05)  # polls the file itself: its exit record is the signal


def history_steps(path: str | list[Any], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of each history row that holds ``key``, in a run's ``.wandb`` file or its records."""
    rows = []
    for record in transaction_log(path) if isinstance(path, str) else path:
        if record.WhichOneof("record_type") != "history":
            continue
        items = {"/".join(item.nested_key) or item.key: item.value_json for item in record.history.item}
        if key in items:
            rows.append((int(json.loads(items["_step"])), float(json.loads(items[key]))))
    return rows


class StandInError(Exception):
    """A request the stand-in refuses: answered as a GraphQL error with this message."""


@dataclass
class Version:
    """One version of an artifact: its files (path -> bytes), aliases and metadata."""

    id: str
    index: int
    files: dict[str, bytes]
    aliases: list[str]
    metadata: dict[str, Any]
    digests: dict[str, str] = field(default_factory=dict)  # path -> base64 MD5, as W&B's manifest records
    state: str = "COMMITTED"  # PENDING from CreateArtifact until CommitArtifact
    type: str = "model"
    run: str | None = None  # the run that logged it
    pending_aliases: list[str] = field(default_factory=list)  # aliases given at creation, taken at commit
    digest: str | None = None  # the manifest's digest the SDK computed (CreateArtifact)
    manifest: dict[str, Any] | None = None  # the manifest the SDK uploaded


@dataclass
class Run:
    """One run as the SDK sent it: its config, the history rows of its file stream, and its other files' lines."""

    id: str
    project: str
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)  # file stream's other files (output.log...) -> lines
    finished: bool = False

    def bucket(self) -> dict[str, Any]:
        """The run as ``RunResumeStatus`` and ``UpsertBucket`` return it (W&B's GraphQL type for a run is Bucket)."""
        return {
            "id": f"run-{self.project}-{self.id}",
            "name": self.id,
            "displayName": self.id,
            "summaryMetrics": json.dumps(self.summary),
            "logLineCount": len(self.files.get("output.log", [])),
            "historyLineCount": len(self.history),
            "eventsLineCount": len(self.files.get("wandb-events.jsonl", [])),
            "historyTail": json.dumps([json.dumps(row) for row in self.history[-10:]]),
            "eventsTail": "[]",
            "config": json.dumps(self.config),
            "tags": [],
            "notes": None,
            "wandbConfig": json.dumps({"t": self.config.get("_wandb", {}).get("value", {}).get("t", {})}),
            "sweepName": None,
        }


class WandBStandIn(LocalHTTPStandIn):
    """The server's state and lifetime. ``operations`` lists each GraphQL operation's name in the order it came."""

    entity = "cairn-team"

    def __init__(self) -> None:
        self.artifacts: dict[tuple[str, str, str], list[Version]] = {}  # (entity, project, name) -> versions
        self.operations: list[str] = []
        self.unknown: list[str] = []
        self.keys: set[str] = set()  # the API keys requests came with (HTTP basic auth), to check one was sent
        self.refused: list[str] = []  # requests understood but refused (StandInError), with why
        self.served: list[str] = []  # the files downloaded, by path in their artifact
        self.uploads: dict[str, bytes] = {}  # what was PUT to an upload URL, by its key
        self.runs: dict[tuple[str, str, str], Run] = {}  # (entity, project, run id) -> what the SDK sent of it
        self.requests: list[str] = []  # "METHOD path" of every request, and each GraphQL operation's name
        self.queries: dict[str, tuple[str, dict[str, Any]]] = {}  # operation -> its last query text and variables
        self.lock = threading.Lock()
        super().__init__(_Handler, "wandb-stand-in")

    def add_artifact(
        self, project: str, name: str, files: dict[str, bytes], aliases: list[str], metadata: dict[str, Any]
    ) -> Version:
        """A new version of ``entity/project/name``; its aliases move to it from older versions, as W&B's do."""
        with self.lock:
            versions = self.artifacts.setdefault((self.entity, project, name), [])
            for older in versions:
                older.aliases = [alias for alias in older.aliases if alias not in aliases]
            index = len(versions)
            version = Version(f"art-{project}-{name}-{index}", index, dict(files), [*aliases, f"v{index}"], metadata)
            version.digests = {
                path: base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
                for path, data in files.items()
            }
            versions.append(version)
            return version

    def upload_url(self, key: str) -> str:
        """A URL the SDK PUTs a file's bytes to; they are kept in :attr:`uploads` under ``key``."""
        return f"{self.endpoint}/uploads/{key}"

    def find(self, entity: str, project: str, name_and_alias: str) -> Version | None:
        name, _, alias = name_and_alias.partition(":")
        for version in self.artifacts.get((entity, project, name), []):
            if alias in version.aliases:
                return version
        return None

    def version_by_id(self, artifact_id: str) -> tuple[tuple[str, str, str], Version] | None:
        for key, versions in self.artifacts.items():
            for version in versions:
                if version.id == artifact_id:
                    return key, version
        return None

    # -- answers --------------------------------------------------------------------------------------------------

    def _op_RunResumeStatus(self, variables: dict[str, Any]) -> dict[str, Any]:
        entity, project = variables.get("entity") or self.entity, variables.get("project") or "uncategorized"
        with self.lock:
            run = self.runs.get((entity, project, variables["name"]))
            bucket = None if run is None else run.bucket()
        return {"model": {**self._project(entity, project), "bucket": bucket}}

    def answer(self, operation: str, variables: dict[str, Any]) -> dict[str, Any] | None:
        handler = getattr(self, f"_op_{operation}", None)
        return None if handler is None else handler(variables)

    def _op_UpsertBucket(self, variables: dict[str, Any]) -> dict[str, Any]:
        """Create or update a run: its config (W&B's ``{"key": {"value": ...}}`` form), summary and state."""
        entity, project = variables.get("entity") or self.entity, variables.get("project") or "uncategorized"
        with self.lock:
            key = (entity, project, variables["name"])
            inserted = key not in self.runs
            run = self.runs.setdefault(key, Run(variables["name"], project))
            if variables.get("config"):
                run.config.update(json.loads(variables["config"]))
            if variables.get("summaryMetrics"):
                run.summary.update(json.loads(variables["summaryMetrics"]))
            bucket = {**run.bucket(), "description": None, "project": self._project(entity, project)}
        return {"upsertBucket": {"bucket": bucket, "inserted": inserted}}

    def _op_OrganizationCoreWeaveOrganizationID(self, variables: dict[str, Any]) -> dict[str, Any]:
        return {"entity": {"organization": None}}

    def _op_CreateRunFiles(self, variables: dict[str, Any]) -> dict[str, Any]:
        """Where the run's own files (config.yaml, output.log...) go: URLs here, kept in :attr:`uploads`."""
        entity, project, run = variables["entity"], variables["project"], variables["run"]
        files = [
            {"name": name, "uploadUrl": self.upload_url(f"runs/{entity}/{project}/{run}/{name}")}
            for name in variables["files"]
        ]
        return {"createRunFiles": {"runID": f"run-{project}-{run}", "uploadHeaders": [], "files": files}}

    def _op_ArtifactType(self, variables: dict[str, Any]) -> dict[str, Any]:
        entity, project = variables.get("entity") or self.entity, variables["project"]
        with self.lock:
            version = self.find(entity, project, variables["name"])
        artifact = None if version is None else {"artifactType": {"name": version.type}}
        return {"project": {"artifact": artifact}}

    def _op_CreateArtifact(self, variables: dict[str, Any]) -> dict[str, Any]:
        """A new version, PENDING until its manifest and files are uploaded and it is committed."""
        given = variables["input"]
        key = (given["entityName"], given["projectName"], given["artifactCollectionName"])
        with self.lock:
            versions = self.artifacts.setdefault(key, [])
            latest = next((v for v in reversed(versions) if v.state == "COMMITTED"), None)
            index = len(versions)
            version = Version(
                f"art-{key[1]}-{key[2]}-{index}", index, {}, [], json.loads(given.get("metadata") or "{}")
            )
            version.state, version.type, version.run = "PENDING", given["artifactTypeName"], given.get("runName")
            version.pending_aliases = [alias["alias"] for alias in given.get("aliases") or []]
            version.digest = given.get("digest")
            versions.append(version)
        sequence = {"latestArtifact": None if latest is None else {"id": latest.id}}
        return {"createArtifact": {"artifact": {"id": version.id, "state": "PENDING", "artifactSequence": sequence}}}

    def _op_CreateArtifactManifest(self, variables: dict[str, Any]) -> dict[str, Any]:
        """The manifest of a new version (sent twice: first without, then with ``includeUpload`` for its URL)."""
        return {
            "createArtifactManifest": {"artifactManifest": self._manifest_entry(variables["artifactID"], variables)}
        }

    def _manifest_entry(self, artifact_id: str, variables: dict[str, Any]) -> dict[str, Any]:
        file: dict[str, Any] = {"id": f"manifest-file-{artifact_id}"}
        if variables.get("includeUpload"):
            file.update(uploadUrl=self.upload_url(f"manifests/{artifact_id}"), uploadHeaders=[])
        return {"id": f"manifest-{artifact_id}", "file": file}

    def _op_CreateArtifactFiles(self, variables: dict[str, Any]) -> dict[str, Any]:
        """Where each file of a new version goes (one PUT each: no multipart for files this small)."""
        edges = []
        for given in variables["input"]["artifactFiles"]:
            md5_hex = base64.b64decode(given["md5"]).hex()
            key = f"artifacts/{given['artifactID']}/{md5_hex}/{given['name']}"
            node = {
                "storagePath": key,
                "uploadUrl": self.upload_url(key),
                "uploadHeaders": [],
                "uploadMultipartUrls": None,
                "artifact": {"id": given["artifactID"]},
            }
            edges.append({"node": node})
        return {"createArtifactFiles": {"files": {"edges": edges}}}

    def _op_CommitArtifact(self, variables: dict[str, Any]) -> dict[str, Any]:
        """The version's files are the uploaded manifest's entries, each checked against the bytes PUT for it; its
        aliases move to it from older versions (``latest`` included, as the SDK sends it), and it gets ``v<index>``."""
        artifact_id = variables["artifactID"]
        with self.lock:
            (entity, project, name), version = self.version_by_id(artifact_id) or (("", "", ""), None)
            if version is None or f"manifests/{artifact_id}" not in self.uploads:
                raise StandInError(f"commit of {artifact_id}: no such version or no manifest uploaded")
            version.manifest = json.loads(self.uploads[f"manifests/{artifact_id}"])
            for path, entry in version.manifest["contents"].items():
                md5_hex = base64.b64decode(entry["digest"]).hex()
                data = self.uploads.get(f"artifacts/{entry.get('birthArtifactID') or artifact_id}/{md5_hex}/{path}")
                if data is None or hashlib.md5(data, usedforsecurity=False).hexdigest() != md5_hex:
                    raise StandInError(f"commit of {artifact_id}: {path} was not uploaded, or not with its digest")
                version.files[path], version.digests[path] = data, entry["digest"]
            for older in self.artifacts[(entity, project, name)]:
                older.aliases = [alias for alias in older.aliases if alias not in version.pending_aliases]
            version.aliases = [*version.pending_aliases, f"v{version.index}"]
            version.state = "COMMITTED"
        return {"commitArtifact": {"artifact": {"id": artifact_id, "digest": version.digest}}}

    def _op_ArtifactByID(self, variables: dict[str, Any]) -> dict[str, Any]:
        """A version by id, with its aliases: what ``Artifact.wait()`` reads once the version is committed."""
        with self.lock:
            found = self.version_by_id(variables["id"])
        if found is None:
            return {"artifact": None}
        (entity, project, name), version = found
        artifact = self._artifact(entity, project, name, version)
        collection = artifact["artifactSequence"]
        aliases = [
            {"__typename": "ArtifactAlias", "id": f"alias-{alias}", "alias": alias, "artifactCollection": collection}
            for alias in version.aliases
        ]
        return {"artifact": {**artifact, "aliases": aliases}}

    def _op_Viewer(self, variables: dict[str, Any]) -> dict[str, Any]:
        viewer = {"id": "VXNlcjox", "entity": self.entity, "username": "cairn-test", "email": "test@example.invalid"}
        return {"viewer": {**viewer, "flags": "{}", "teams": {"edges": []}}}

    _op_GetDefaultEntity = _op_Viewer

    def _op_ServerFeaturesQuery(self, variables: dict[str, Any]) -> dict[str, Any]:
        return {"serverInfo": {"features": []}}

    def _op_ArtifactMembershipByName(self, variables: dict[str, Any]) -> dict[str, Any]:
        entity, project = variables["entity"], variables["project"]
        with self.lock:
            version = self.find(entity, project, variables["name"])
        if version is None:
            return {"project": {"artifactCollectionMembership": None}}
        name = variables["name"].partition(":")[0]
        return {"project": {"artifactCollectionMembership": self._membership(entity, project, name, version)}}

    def _project(self, entity: str, project: str) -> dict[str, Any]:
        return {"id": f"UHJvamVjdDo{project}", "internalId": "1", "name": project, "entity": {"name": entity}}

    def _membership(self, entity: str, project: str, name: str, version: Version) -> dict[str, Any]:
        collection = {"__typename": "ArtifactSequence", "name": name, "project": self._project(entity, project)}
        aliases = [{"__typename": "ArtifactAlias", "id": f"alias-{a}", "alias": a} for a in version.aliases]
        return {
            "__typename": "ArtifactCollectionMembership",
            "id": f"membership-{version.id}",
            "versionIndex": version.index,
            "createdAt": "2026-01-01T00:00:00Z",
            "aliases": aliases,
            "artifactCollection": collection,
            "artifact": self._artifact(entity, project, name, version),
        }

    def _artifact(self, entity: str, project: str, name: str, version: Version) -> dict[str, Any]:
        collection = {"__typename": "ArtifactSequence", "name": name, "project": self._project(entity, project)}
        return {
            "__typename": "Artifact",
            "id": version.id,
            "artifactSequence": collection,
            "versionIndex": version.index,
            "artifactType": {"name": version.type},
            "description": None,
            "metadata": json.dumps(version.metadata),
            "ttlDurationSeconds": -1,
            "ttlIsInherited": True,
            "tags": [],
            "historyStep": None,
            "state": version.state,
            "size": sum(len(data) for data in version.files.values()),
            "digest": version.digest or hashlib.md5(repr(sorted(version.digests.items())).encode()).hexdigest(),
            "commitHash": None,
            "fileCount": len(version.files),
            "createdAt": "2026-01-01T00:00:00Z",
            "updatedAt": None,
        }

    def _op_FetchArtifactManifest(self, variables: dict[str, Any]) -> dict[str, Any]:
        return {
            "artifact": {"currentManifest": {"file": {"directUrl": f"{self.endpoint}/manifests/{variables['id']}"}}}
        }

    def file_stream(self, where: list[str], sent: dict[str, Any]) -> dict[str, Any]:
        """A post of the run's file stream: lines of history (one JSON row each), summary and console output."""
        entity, project, run_id = where
        with self.lock:
            run = self.runs.setdefault((entity, project, run_id), Run(run_id, project))
            for name, chunk in (sent.get("files") or {}).items():
                lines = [json.loads(line) if name.endswith(".jsonl") else line for line in chunk["content"]]
                if name == "wandb-history.jsonl":
                    run.history[chunk["offset"] :] = lines
                elif name == "wandb-summary.json":
                    run.summary = json.loads(chunk["content"][-1]) if chunk["content"] else run.summary
                else:
                    run.files.setdefault(name, [])[chunk["offset"] :] = lines
            run.finished = run.finished or bool(sent.get("complete"))
        return {"exitcode": None, "limits": {}}

    def manifest(self, artifact_id: str) -> dict[str, Any] | None:
        """W&B's manifest (version 1) of the version ``artifact_id``: each file's MD5 and size."""
        with self.lock:
            found = self.version_by_id(artifact_id)
        if found is None:
            return None
        _, version = found
        contents = {
            path: {"digest": version.digests[path], "size": len(data), "birthArtifactID": version.id}
            for path, data in version.files.items()
        }
        storage = {"storagePolicy": "wandb-storage-policy-v1", "storagePolicyConfig": {"storageLayout": "V2"}}
        return {"version": 1, **storage, "contents": contents}

    def file(self, artifact_id: str, md5_hex: str, path: str) -> bytes | None:
        """The bytes of ``path`` in the version ``artifact_id``, where its MD5 is ``md5_hex``."""
        with self.lock:
            found = self.version_by_id(artifact_id)
        data = None if found is None else found[1].files.get(path)
        if data is None or hashlib.md5(data, usedforsecurity=False).hexdigest() != md5_hex:
            return None
        self.served.append(path)
        return data


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        del format, args

    @property
    def stand_in(self) -> WandBStandIn:
        return self.server.stand_in  # type: ignore[attr-defined]

    def _body(self) -> bytes:
        self._note_key()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        return gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body

    def _note_key(self) -> None:
        scheme, _, credentials = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "basic":
            self.stand_in.keys.add(base64.b64decode(credentials).decode().partition(":")[2])

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self._body()
        self.stand_in.requests.append(f"POST {self.path}")
        if self.path.startswith("/sdk/otel"):  # the SDK's own telemetry
            self._send(200, b"")
            return
        if re.fullmatch(r"/files/[^/]+/[^/]+/[^/]+/file_stream", self.path):
            self._send(200, json.dumps(self.stand_in.file_stream(self.path.split("/")[2:5], json.loads(body))).encode())
            return
        if self.path != "/graphql":
            self.stand_in.unknown.append(f"POST {self.path}")
            self._send(404, b"{}")
            return
        request = json.loads(body)
        match = re.search(r"\b(?:query|mutation)\s+(\w+)", request.get("query", ""))
        operation = match.group(1) if match else request.get("operationName") or "?"
        self.stand_in.operations.append(operation)
        self.stand_in.requests.append(f"  {operation}")
        self.stand_in.queries[operation] = (request.get("query", ""), request.get("variables") or {})
        try:
            data = self.stand_in.answer(operation, request.get("variables") or {})
        except StandInError as err:
            self.stand_in.refused.append(str(err))
            self._send(200, json.dumps({"errors": [{"message": f"stand-in: {err}"}]}).encode())
            return
        if data is None:
            self.stand_in.unknown.append(operation)
            self._send(200, json.dumps({"errors": [{"message": f"stand-in: {operation} unknown"}]}).encode())
            return
        self._send(200, json.dumps({"data": data}).encode())

    def do_GET(self) -> None:
        self._note_key()
        self.stand_in.requests.append(f"GET {self.path}")
        if self.path.startswith("/manifests/"):
            manifest = self.stand_in.manifest(self.path.removeprefix("/manifests/"))
            if manifest is not None:
                self._send(200, json.dumps(manifest).encode())
                return
        if self.path.startswith("/artifactsV2/"):  # .../<birth artifact id>/<md5 hex>/<file path>
            data = self.stand_in.file(*self.path.split("/")[-3:])
            if data is not None:
                self._send(200, data, "application/octet-stream")
                return
        self.stand_in.unknown.append(f"GET {self.path}")
        self._send(404, b"")

    def do_PUT(self) -> None:
        body = self._body()
        self.stand_in.requests.append(f"PUT {self.path} {len(body)}")
        if self.path.startswith("/uploads/"):
            with self.stand_in.lock:
                self.stand_in.uploads[self.path.removeprefix("/uploads/")] = body
            self._send(200, b"")
            return
        self.stand_in.unknown.append(f"PUT {self.path}")
        self._send(404, b"")
