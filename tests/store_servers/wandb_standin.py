"""A stand-in for the W&B server's artifact reads on 127.0.0.1, and a reader for W&B's offline transaction log.

W&B has no local server. This small threaded HTTP server answers the GraphQL operations (``POST /graphql``) that
wandb 0.31's ``wandb.Api().artifact(...)`` and an artifact file's download send (found by running the SDK against
it and logging each operation's name: :attr:`WandBStandIn.operations`), and serves each file's bytes at a URL it
hands out (``GET /files/<id>``). Artifacts are put in with :meth:`WandBStandIn.add_artifact`; uploads through the
SDK (``run.log_artifact`` online) are not spoken (see the notes of issue 21). Any operation it does not know is
recorded in :attr:`WandBStandIn.unknown` and answered with an error, so that a test sees it.

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


@dataclass
class Version:
    """One version of an artifact: its files (path -> bytes), aliases and metadata."""

    id: str
    index: int
    files: dict[str, bytes]
    aliases: list[str]
    metadata: dict[str, Any]
    digests: dict[str, str] = field(default_factory=dict)  # path -> base64 MD5, as W&B's manifest records


class WandBStandIn:
    """The server's state and lifetime. ``operations`` lists each GraphQL operation's name in the order it came."""

    entity = "cairn-team"

    def __init__(self) -> None:
        self.artifacts: dict[tuple[str, str, str], list[Version]] = {}  # (entity, project, name) -> versions
        self.operations: list[str] = []
        self.unknown: list[str] = []
        self.served: list[str] = []  # the files downloaded, by path in their artifact
        self.queries: dict[str, tuple[str, dict[str, Any]]] = {}  # operation -> its last query text and variables
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.stand_in = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="wandb-stand-in", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

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

    def answer(self, operation: str, variables: dict[str, Any]) -> dict[str, Any] | None:
        handler = getattr(self, f"_op_{operation}", None)
        return None if handler is None else handler(variables)

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
            "artifactType": {"name": "model"},
            "description": None,
            "metadata": json.dumps(version.metadata),
            "ttlDurationSeconds": -1,
            "ttlIsInherited": True,
            "tags": [],
            "historyStep": None,
            "state": "COMMITTED",
            "size": sum(len(data) for data in version.files.values()),
            "digest": hashlib.md5(repr(sorted(version.digests.items())).encode(), usedforsecurity=False).hexdigest(),
            "commitHash": None,
            "fileCount": len(version.files),
            "createdAt": "2026-01-01T00:00:00Z",
            "updatedAt": None,
        }

    def _op_FetchArtifactManifest(self, variables: dict[str, Any]) -> dict[str, Any]:
        return {
            "artifact": {"currentManifest": {"file": {"directUrl": f"{self.endpoint}/manifests/{variables['id']}"}}}
        }

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
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        return gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self._body()
        if self.path.startswith("/sdk/otel"):  # the SDK's own telemetry
            self._send(200, b"")
            return
        if self.path != "/graphql":
            self.stand_in.unknown.append(f"POST {self.path}")
            self._send(404, b"{}")
            return
        request = json.loads(body)
        match = re.search(r"\b(?:query|mutation)\s+(\w+)", request.get("query", ""))
        operation = match.group(1) if match else request.get("operationName") or "?"
        self.stand_in.operations.append(operation)
        self.stand_in.queries[operation] = (request.get("query", ""), request.get("variables") or {})
        data = self.stand_in.answer(operation, request.get("variables") or {})
        if data is None:
            self.stand_in.unknown.append(operation)
            self._send(200, json.dumps({"errors": [{"message": f"stand-in: {operation} unknown"}]}).encode())
            return
        self._send(200, json.dumps({"data": data}).encode())

    def do_GET(self) -> None:
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
