"""gcp-storage-emulator served by a threading HTTP server, plus the XML multipart-upload calls it lacks.

Neither gcp-storage-emulator nor fake-gcs-server implements GCS's XML multipart upload (POST ?uploads, PUT
?partNumber&uploadId, POST ?uploadId), which google-cloud-storage's transfer_manager.upload_chunks_concurrently
uses. This module adds exactly those calls, storing the finished object through the emulator's own storage, so
the SDK's real client code runs over HTTP; every other request goes to the emulator unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socketserver
import sys
import threading
import uuid
from http import server as http_server
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree

import google_crc32c
from gcp_storage_emulator.handlers import objects as emulator_objects
from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage as EmulatorStorage

_S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


class _ThreadingHttpServer(socketserver.ThreadingMixIn, http_server.HTTPServer):
    # The emulator's own HTTPServer handles one connection at a time with a backlog of 5: parallel clients stall.
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _HeldReply:
    """Stands in for the socket file while the emulator builds a reply; keeps the pieces without copying them."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.pieces.append(bytes(data))  # no copy for bytes, the only type the emulator writes
        return len(data)

    def flush(self) -> None:
        pass


class _MultipartUploads:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uploads: dict[str, dict] = {}


class _Handler(RequestHandler):
    server: "_EmulatorHttpServer"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(args[-1].emulator_storage, *args, **kwargs)

    def _query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)

    def _emulator(self, method) -> None:
        # The emulator's metadata lives in plain dicts that it serialises on every write: one request at a time.
        with self.server.emulator_lock:
            method()

    def do_GET(self) -> None:
        # The reply is built under the lock but sent after it: parallel ranged downloads then overlap on the
        # socket as they do against real GCS, instead of each waiting for the previous one's body to drain.
        socket_file, self.wfile = self.wfile, _HeldReply()
        try:
            self._emulator(super().do_GET)
            pieces = self.wfile.pieces
        finally:
            self.wfile = socket_file
        for piece in pieces:
            self.wfile.write(piece)

    def do_PATCH(self) -> None:
        self._emulator(super().do_PATCH)

    def do_POST(self) -> None:
        query = self._query()
        if "uploads" in query:
            self._initiate_multipart()
        elif "uploadId" in query:
            self._complete_multipart(query["uploadId"][0])
        else:
            self._emulator(super().do_POST)

    def do_PUT(self) -> None:
        query = self._query()
        if "uploadId" in query and "partNumber" in query:
            self._upload_part(query["uploadId"][0], int(query["partNumber"][0]))
        else:
            self._emulator(super().do_PUT)

    def do_DELETE(self) -> None:
        query = self._query()
        if "uploadId" in query:
            with self.server.multipart.lock:
                self.server.multipart.uploads.pop(query["uploadId"][0], None)
            self._reply(204)
        else:
            self._emulator(super().do_DELETE)

    def _bucket_and_object(self) -> tuple[str, str]:
        bucket, _, name = urlsplit(self.path).path.lstrip("/").partition("/")
        return bucket, unquote(name)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _initiate_multipart(self) -> None:
        self._body()
        bucket, name = self._bucket_and_object()
        if bucket not in self.server.emulator_storage.buckets:
            self._reply(404, b"<Error><Code>NoSuchBucket</Code></Error>", {"Content-Type": "application/xml"})
            return
        upload_id = uuid.uuid4().hex
        with self.server.multipart.lock:
            self.server.multipart.uploads[upload_id] = {
                "bucket": bucket, "name": name, "parts": {},
                "content_type": self.headers.get("Content-Type", "application/octet-stream")}
        body = (f'<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult xmlns="{_S3_XMLNS}">'
                f"<Bucket>{bucket}</Bucket><Key>{name}</Key><UploadId>{upload_id}</UploadId>"
                "</InitiateMultipartUploadResult>").encode()
        self._reply(200, body, {"Content-Type": "application/xml"})

    def _upload_part(self, upload_id: str, part_number: int) -> None:
        data = self._body()
        md5 = hashlib.md5(data).digest()
        with self.server.multipart.lock:
            upload = self.server.multipart.uploads.get(upload_id)
            if upload is not None:
                upload["parts"][part_number] = (md5.hex(), data)
        if upload is None:
            self._reply(404, b"<Error><Code>NoSuchUpload</Code></Error>", {"Content-Type": "application/xml"})
            return
        crc = base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
        self._reply(200, headers={"ETag": f'"{md5.hex()}"',
                                  "x-goog-hash": f"crc32c={crc},md5={base64.b64encode(md5).decode()}"})

    def _complete_multipart(self, upload_id: str) -> None:
        listed = ElementTree.fromstring(self._body())
        with self.server.multipart.lock:
            upload = self.server.multipart.uploads.pop(upload_id, None)
        if upload is None:
            self._reply(404, b"<Error><Code>NoSuchUpload</Code></Error>", {"Content-Type": "application/xml"})
            return
        pieces = []
        for part in listed.iter("Part"):
            number, etag = int(part.findtext("PartNumber")), part.findtext("ETag").strip('"')
            stored = upload["parts"].get(number)
            if stored is None or stored[0] != etag:
                self._reply(400, b"<Error><Code>InvalidPart</Code></Error>", {"Content-Type": "application/xml"})
                return
            pieces.append(stored[1])
        data = b"".join(pieces)
        with self.server.emulator_lock:
            resource = emulator_objects._make_object_resource(
                f"http://{self.headers.get('Host')}", upload["bucket"], upload["name"], upload["content_type"],
                str(len(data)))
            resource = emulator_objects._checksums(data, resource)
            self.server.emulator_storage.create_file(upload["bucket"], upload["name"], data, resource)
        body = (f'<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult xmlns="{_S3_XMLNS}">'
                f"<Bucket>{upload['bucket']}</Bucket><Key>{upload['name']}</Key></CompleteMultipartUploadResult>")
        self._reply(200, body.encode(), {"Content-Type": "application/xml"})


class _EmulatorHttpServer(_ThreadingHttpServer):
    def __init__(self, port: int = 0) -> None:
        self.emulator_storage = EmulatorStorage(use_memory_fs=True)
        self.emulator_lock = threading.Lock()
        self.multipart = _MultipartUploads()
        super().__init__(("127.0.0.1", port), _Handler)


class GcsEmulator:
    """In-process gcp-storage-emulator on a free loopback port; stop() shuts it down."""

    name = "gcp-storage-emulator"

    def __init__(self) -> None:
        # It warns on every small JSON reply ("should be handled as stream"): noise, not a problem.
        logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
        self._server = _EmulatorHttpServer()
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="gcs-emulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_forever(port: int) -> None:
    """Serves on 127.0.0.1:port until killed: benches run the emulator in its own process, as the others run."""
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    server = _EmulatorHttpServer(port)
    server.serve_forever()


if __name__ == "__main__":
    serve_forever(int(sys.argv[1]))
