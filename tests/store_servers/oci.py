"""A stand-in for OCI Object Storage on 127.0.0.1, started once per test session; each test gets a fresh bucket.

OCI has no emulator (nothing like moto or gcp-storage-emulator exists for it), so this small threaded HTTP server
speaks the paths the ``oci`` SDK's ``ObjectStorageClient`` and ``UploadManager`` call, and answers with the headers
and JSON bodies the SDK reads: the namespace (``GET /n/``), objects (``PUT/GET/HEAD/DELETE /n/{ns}/b/{bucket}/o/
{name}``), listing with ``prefix``/``start``/``limit`` and ``nextStartWith``, and multipart uploads under ``/u``.
It keeps everything in memory, refuses unsigned requests (the SDK signs every one with the RSA key the fixture
writes), and can be told to fail the next few requests, so that retries can be tested. Pages are kept small on
purpose, so that a store which ignores ``nextStartWith`` loses objects in the tests.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import itertools
import json
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest

from store_servers.local_http import LocalHTTPStandIn

__all__ = ["OCIStandIn", "oci_bucket", "oci_config", "oci_server", "oci_store"]

_buckets = itertools.count()


@dataclass
class StoredObject:
    data: bytes
    etag: str
    modified: str
    md5: str | None = None  # base64 MD5 of the content, for simple puts
    multipart_md5: str | None = None  # base64 MD5 of the parts' MD5s, then "-<parts>"


@dataclass
class Bucket:
    objects: dict[str, StoredObject] = field(default_factory=dict)
    uploads: dict[str, dict[int, tuple[str, bytes]]] = field(default_factory=dict)  # upload id -> part -> etag, data
    upload_names: dict[str, str] = field(default_factory=dict)  # upload id -> object name


class OCIStandIn(LocalHTTPStandIn):
    """The server's state, and its lifetime. ``requests`` records each request line the SDK sent."""

    namespace = "cairntest"

    def __init__(self, page_size: int = 2) -> None:
        self.page_size = page_size
        self.buckets: dict[str, Bucket] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self._failures: list[tuple[int, str | None]] = []  # (status, method or None for any)
        super().__init__(_Handler, "oci-stand-in")

    def create_bucket(self, name: str) -> None:
        with self.lock:
            self.buckets.setdefault(name, Bucket())

    def fail_next(self, count: int, status: int = 503, method: str | None = None) -> None:
        """Answer the next ``count`` requests (of ``method``, or any) with ``status``, as a troubled service would."""
        with self.lock:
            self._failures.extend([(status, method)] * count)

    def clear_failures(self) -> None:
        with self.lock:
            self._failures.clear()

    def take_failure(self, method: str) -> int | None:
        with self.lock:
            for index, (status, only) in enumerate(self._failures):
                if only in (None, method):
                    del self._failures[index]
                    return status
            return None


def _now() -> str:
    return email.utils.formatdate(usegmt=True)


def _b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class _Error(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_INJECTED_CODES = {400: "InvalidParameter", 401: "NotAuthenticated", 429: "TooManyRequests", 503: "ServiceUnavailable"}

_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/n/?$"), "namespace"),
    ("HEAD", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/?$"), "get_bucket"),
    ("GET", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/?$"), "get_bucket"),
    ("GET", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/o/?$"), "list_objects"),
    ("PUT", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/o/(?P<name>.+)$"), "put_object"),
    ("GET", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/o/(?P<name>.+)$"), "get_object"),
    ("HEAD", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/o/(?P<name>.+)$"), "head_object"),
    ("DELETE", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/o/(?P<name>.+)$"), "delete_object"),
    ("POST", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/u/?$"), "create_upload"),
    ("PUT", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/u/(?P<name>.+)$"), "upload_part"),
    ("POST", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/u/(?P<name>.+)$"), "commit_upload"),
    ("DELETE", re.compile(r"^/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/u/(?P<name>.+)$"), "abort_upload"),
]


class _Handler(BaseHTTPRequestHandler):
    """One request: route it, run it under the state's lock, answer with OCI's headers (or its JSON error)."""

    protocol_version = "HTTP/1.1"
    server_version = "cairn-oci-stand-in"

    @property
    def state(self) -> OCIStandIn:
        return self.server.stand_in  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: the request lines are kept in ``state.requests`` instead."""

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        raw_path, _, query = self.path.partition("?")
        self.query = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        self.method = method
        self.state.requests.append(f"{method} {self.path}")
        body = self._read_body()
        try:
            if not self.headers.get("authorization", "").startswith("Signature "):
                raise _Error(
                    401, "NotAuthenticated", "The required information to complete authentication was not provided."
                )
            if (status := self.state.take_failure(method)) is not None:
                raise _Error(status, _INJECTED_CODES.get(status, "InternalError"), "A failure injected by the test.")
            for route_method, pattern, action in _ROUTES:
                match = pattern.match(raw_path)
                if route_method == method and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items()}
                    if "ns" in params and params["ns"] != self.state.namespace:
                        raise _Error(404, "NamespaceNotFound", f"Namespace {params['ns']!r} not found.")
                    with self.state.lock:
                        getattr(self, f"_{action}")(body=body, **params)
                    return
            raise _Error(404, "NotFound", f"No route for {method} {raw_path}.")
        except _Error as error:
            payload = json.dumps({"code": error.code, "message": error.message}).encode()
            self._answer(error.status, payload, {"content-type": "application/json"})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers, then the blank line
            pass
        return b"".join(chunks)

    def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"opc-request-id": secrets.token_hex(8), "content-length": str(len(body)), **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.method != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any, headers: dict[str, str] | None = None) -> None:
        self._answer(200, json.dumps(value).encode(), {"content-type": "application/json", **(headers or {})})

    def _bucket(self, bucket: str) -> Bucket:
        if bucket not in self.state.buckets:
            raise _Error(
                404,
                "BucketNotFound",
                f"Either the bucket named '{bucket}' does not exist in the namespace '{self.state.namespace}' or you "
                "are not authorized to access it",
            )
        return self.state.buckets[bucket]

    def _object(self, bucket: str, name: str) -> StoredObject:
        stored = self._bucket(bucket).objects.get(name)
        if stored is None:
            raise _Error(404, "ObjectNotFound", f"The object '{name}' was not found in the bucket '{bucket}'")
        return stored

    @staticmethod
    def _object_headers(stored: StoredObject) -> dict[str, str]:
        headers = {"etag": stored.etag, "last-modified": stored.modified, "content-type": "application/octet-stream"}
        if stored.md5:
            headers["content-md5"] = headers["opc-content-md5"] = stored.md5
        if stored.multipart_md5:
            headers["opc-multipart-md5"] = stored.multipart_md5
        return headers

    # -- the service ----------------------------------------------------------------------------------------------

    def _namespace(self, body: bytes) -> None:
        self._json(self.state.namespace)

    def _get_bucket(self, body: bytes, ns: str, bucket: str) -> None:
        self._bucket(bucket)
        self._json({"namespace": ns, "name": bucket, "compartmentId": "ocid1.compartment.oc1..cairn"}, {"etag": "b1"})

    def _list_objects(self, body: bytes, ns: str, bucket: str) -> None:
        prefix, start = self.query.get("prefix", ""), self.query.get("start", "")
        limit = min(int(self.query.get("limit") or self.state.page_size), self.state.page_size)
        names = sorted(n for n in self._bucket(bucket).objects if n.startswith(prefix) and n >= start)
        page, rest = names[:limit], names[limit:]
        objects = [self._summary(name, self._bucket(bucket).objects[name]) for name in page]
        self._json({"objects": objects, "prefixes": [], **({"nextStartWith": rest[0]} if rest else {})})

    @staticmethod
    def _summary(name: str, stored: StoredObject) -> dict[str, Any]:
        return {"name": name, "size": len(stored.data), "md5": stored.md5 or stored.multipart_md5, "etag": stored.etag}

    def _put_object(self, body: bytes, ns: str, bucket: str, name: str) -> None:
        self._bucket(bucket)
        md5 = _b64md5(body)
        claimed = self.headers.get("content-md5")
        if claimed and claimed != md5:
            raise _Error(400, "InvalidContentMD5", "The computed MD5 of the request body does not match content-md5")
        stored = StoredObject(body, etag=secrets.token_hex(16), modified=_now(), md5=md5)
        self.state.buckets[bucket].objects[name] = stored
        self._answer(200, headers={"etag": stored.etag, "last-modified": stored.modified, "opc-content-md5": md5})

    def _get_object(self, body: bytes, ns: str, bucket: str, name: str) -> None:
        stored = self._object(bucket, name)
        self._answer(200, stored.data, self._object_headers(stored))

    def _head_object(self, body: bytes, ns: str, bucket: str, name: str) -> None:
        stored = self._object(bucket, name)
        self._answer(200, stored.data, self._object_headers(stored))  # HEAD: headers only, body skipped

    def _delete_object(self, body: bytes, ns: str, bucket: str, name: str) -> None:
        self._object(bucket, name)
        del self.state.buckets[bucket].objects[name]
        self._answer(204)

    def _create_upload(self, body: bytes, ns: str, bucket: str) -> None:
        details = json.loads(body or b"{}")
        upload_id = secrets.token_hex(12)
        self._bucket(bucket).uploads[upload_id] = {}
        self.state.buckets[bucket].upload_names[upload_id] = details["object"]
        upload = {"namespace": ns, "bucket": bucket, "object": details["object"], "uploadId": upload_id}
        self._json({**upload, "timeCreated": "2024-01-01T00:00:00.000Z", "storageTier": "Standard"})

    def _upload(self, bucket: str, name: str) -> tuple[str, dict[int, tuple[str, bytes]]]:
        upload_id = self.query.get("uploadId", "")
        parts = self._bucket(bucket).uploads.get(upload_id)
        if parts is None or self.state.buckets[bucket].upload_names.get(upload_id) != name:
            raise _Error(404, "NoSuchUpload", f"No multipart upload {upload_id!r} for '{name}'")
        return upload_id, parts

    def _upload_part(self, body: bytes, ns: str, bucket: str, name: str) -> None:
        _, parts = self._upload(bucket, name)
        number = int(self.query.get("uploadPartNum", "0"))
        if not 1 <= number <= 10000:
            raise _Error(400, "InvalidParameter", "uploadPartNum must be between 1 and 10000")
        etag = secrets.token_hex(16)
        parts[number] = (etag, body)
        self._answer(200, headers={"etag": etag, "opc-content-md5": _b64md5(body), "last-modified": _now()})

    def _commit_upload(self, body: bytes, ns: str, bucket: str, name: str) -> None:
        upload_id, parts = self._upload(bucket, name)
        chosen = sorted(json.loads(body)["partsToCommit"], key=lambda part: part["partNum"])
        for part in chosen:
            if parts.get(part["partNum"], ("", b""))[0] != part["etag"]:
                raise _Error(400, "InvalidPart", f"Part {part['partNum']} is missing or its etag does not match")
        datas = [parts[part["partNum"]][1] for part in chosen]
        digests = b"".join(hashlib.md5(data, usedforsecurity=False).digest() for data in datas)
        multipart_md5 = f"{_b64md5(digests)}-{len(datas)}"
        stored = StoredObject(b"".join(datas), secrets.token_hex(16), _now(), multipart_md5=multipart_md5)
        self._bucket(bucket).objects[name] = stored
        self._drop_upload(bucket, upload_id)
        self._answer(
            200, headers={"etag": stored.etag, "last-modified": stored.modified, "opc-multipart-md5": multipart_md5}
        )

    def _abort_upload(self, body: bytes, ns: str, bucket: str, name: str) -> None:
        upload_id, _ = self._upload(bucket, name)
        self._drop_upload(bucket, upload_id)
        self._answer(204)

    def _drop_upload(self, bucket: str, upload_id: str) -> None:
        self.state.buckets[bucket].uploads.pop(upload_id, None)
        self.state.buckets[bucket].upload_names.pop(upload_id, None)


# -- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def oci_server() -> Iterator[OCIStandIn]:
    server = OCIStandIn()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def oci_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An SDK config dict with a freshly made RSA key: the SDK refuses to send a request it cannot sign."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = Path(tmp_path_factory.mktemp("oci")) / "key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.md5(public_der, usedforsecurity=False).hexdigest()
    return {
        "user": "ocid1.user.oc1..cairntest",
        "tenancy": "ocid1.tenancy.oc1..cairntest",
        "fingerprint": ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
        "key_file": str(key_file),
        "region": "us-ashburn-1",
    }


@pytest.fixture
def oci_bucket(oci_server: OCIStandIn) -> str:
    oci_server.clear_failures()
    name = f"cairn-test-{next(_buckets)}"
    oci_server.create_bucket(name)
    return name


@pytest.fixture
def oci_store(oci_server: OCIStandIn, oci_config: dict[str, str], oci_bucket: str):
    from cairn.storage.oci import OCIObjectStore

    store = OCIObjectStore(
        oci_bucket, prefix="conformance", config=oci_config, endpoint=oci_server.endpoint, part_size=5 << 20
    )
    yield store
    store.close()
