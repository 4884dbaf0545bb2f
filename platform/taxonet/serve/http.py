"""The HTTP side of the API apart from the deployments: request bodies, multipart, auth, admission, decode budget.

Everything here works on a Starlette ``Request`` (or plain values) and raises :class:`ApiError`, so the ingress
deployment (:mod:`taxonet.serve.app`) only wires it together, and each piece is testable without a Serve cluster.

* Bodies are streamed once into memory with the byte limits enforced as they arrive (Content-Length first), within
  ``body_timeout_s``; multipart bodies are parsed while they stream (python-multipart), so each file is held once.
* Tokens come only from ``TAXONET_API_TOKEN`` or the file named by ``TAXONET_API_TOKEN_FILE``, stripped, several
  (comma- or newline-separated) accepted at once for rotation.
* :class:`Admission` answers 503 with ``Retry-After`` beyond ``max_concurrent_requests``; :class:`PixelBudget` bounds
  the pixels being decoded at once in a replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from taxonet.data.transforms import ImageDecodeError
from taxonet.serve.config import IngressSettings
from taxonet.serve.errors import ApiError
from taxonet.serve.metrics import IngressMetrics
from taxonet.serve.predictor import Preprocessor

#: raw-body content types → the format their bytes must sniff as
RAW_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
#: content types accepted on a multipart file part; octet-stream/absent leave the decision to the image's bytes
PART_TYPES = frozenset(RAW_TYPES) | {"application/octet-stream", ""}
#: routes with their own label in the request metrics; anything else counts as "other"
ROUTES = ("/v1/classify", "/v1/taxonomy", "/v1/model", "/healthz", "/readyz", "/docs", "/openapi.json",
          "/docs/oauth2-redirect", "/redoc")
#: multipart parts other than ``files`` (ignored, but bounded): how many, and how large each
EXTRA_FIELDS = 16
EXTRA_FIELD_BYTES = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class Upload:
    """One image of a request: its multipart file name (None for a raw body) and its bytes."""

    filename: str | None
    data: bytes


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# ---------------------------------------------------------------------------------------------------- bodies
def _declared_length(request: Request, limit: int, what: str) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError:
        raise ApiError(400, "bad_request", f"invalid Content-Length {declared!r}") from None
    if size < 0:
        raise ApiError(400, "bad_request", f"invalid Content-Length {declared!r}")
    if size > limit:
        raise ApiError(413, "payload_too_large", f"{what} of {size} bytes is over the limit of {limit} bytes")
    return size


async def _chunks(request: Request, limit: int, what: str, timeout_s: float) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; 413 as soon as more than ``limit`` bytes came, 408 after ``timeout_s``."""
    _declared_length(request, limit, what)
    received = 0
    deadline = time.monotonic() + timeout_s
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(408, "request_timeout", f"the request body did not arrive within {timeout_s:g} s") from None
        received += len(chunk)
        if received > limit:
            raise ApiError(413, "payload_too_large", f"{what} is over the limit of {limit} bytes")
        if chunk:
            yield chunk


async def read_body(request: Request, limit: int, timeout_s: float, what: str = "image") -> bytes:
    """The whole body (one image), refused with 413 as soon as it is known to exceed ``limit``."""
    buffer = bytearray()
    async for chunk in _chunks(request, limit, what, timeout_s):
        buffer += chunk
    return bytes(buffer)


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)


class _MultipartReader:
    """python-multipart callbacks collecting the ``files`` parts, checking every limit as the bytes arrive."""

    def __init__(self, settings: IngressSettings) -> None:
        self.settings = settings
        self.uploads: list[Upload] = []
        self.other_fields: list[str] = []
        self.ended = False
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end, "on_end": self._finish}

    def _begin(self) -> None:
        self._part = _Part()

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._part.headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field.clear()
        self._header_value.clear()

    def _headers_done(self) -> None:
        part, settings = self._part, self.settings
        _, options = parse_options_header(part.headers.get("content-disposition", ""))
        name, filename = options.get(b"name"), options.get(b"filename")
        part.name = name.decode("utf-8", "replace") if name is not None else None
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        index = len(self.uploads)
        if part.name != "files":
            self.other_fields.append(part.name or "?")
            if len(self.other_fields) > EXTRA_FIELDS:
                raise ApiError(400, "bad_multipart", f"more than {EXTRA_FIELDS} form fields besides 'files'")
            return
        if part.filename is None:
            raise ApiError(400, "bad_multipart", f"files[{index}] is a text field, not a file upload")
        if index >= settings.max_files:
            raise ApiError(400, "too_many_files", f"too many files: at most {settings.max_files} per request")
        part_type = part.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if part_type not in PART_TYPES:
            raise ApiError(415, "unsupported_media_type", f"files[{index}] ({part.filename}) has content type "
                                                          f"{part_type}: send image/jpeg, image/png or image/webp")
        part.is_file = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.data += data[start:end]
        limit = self.settings.max_image_bytes if part.is_file else EXTRA_FIELD_BYTES
        if len(part.data) > limit:
            what = f"files[{len(self.uploads)}] ({part.filename})" if part.is_file else f"form field {part.name}"
            raise ApiError(413, "payload_too_large", f"{what} is over the limit of {limit} bytes")

    def _end(self) -> None:
        part = self._part
        if not part.is_file:
            return
        if not part.data:
            raise ApiError(400, "empty_body", f"files[{len(self.uploads)}] ({part.filename}) is empty")
        self.uploads.append(Upload(part.filename, bytes(part.data)))
        part.data = bytearray()

    def _finish(self) -> None:
        self.ended = True


async def read_multipart(request: Request, settings: IngressSettings) -> list[Upload]:
    """The ``files`` parts of a multipart/form-data body, parsed as it streams (each file held once)."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "malformed multipart body: the content type names no boundary")
    reader = _MultipartReader(settings)
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        async for chunk in _chunks(request, settings.max_request_bytes, "request body", settings.body_timeout_s):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
    if not reader.ended:
        raise ApiError(400, "bad_multipart", "malformed multipart body: it ends before its closing boundary")
    if not reader.uploads:
        found = sorted(set(reader.other_fields))
        raise ApiError(400, "no_files", "the multipart body has no 'files' part"
                       + (f" (found {', '.join(found)})" if found else ""))
    return reader.uploads


async def read_uploads(request: Request, settings: IngressSettings) -> list[Upload]:
    """The images of a classify request: one raw body (image/jpeg, png, webp) or multipart ``files``."""
    kind = media_type(request)
    if kind in RAW_TYPES:
        body = await read_body(request, settings.max_image_bytes, settings.body_timeout_s)
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty: send the image bytes")
        return [Upload(None, body)]
    if kind == "multipart/form-data":
        return await read_multipart(request, settings)
    raise ApiError(415, "unsupported_media_type", f"content type {kind or 'none'} is not accepted: send one image "
                   "as image/jpeg, image/png or image/webp, or several as multipart/form-data 'files'")


# ---------------------------------------------------------------------------------------------------- images
def where(index: int, upload: Upload, count: int) -> str:
    """The prefix naming a file in an error message (none for a lone raw body)."""
    return f"files[{index}] ({upload.filename}): " if count > 1 or upload.filename else ""


def check_images(preprocessor: Preprocessor, uploads: list[Upload], max_request_pixels: int) -> list[int]:
    """Every image's pixel count, from its header only: format allowed, within the per-image limit, and all of them
    together within ``max_request_pixels`` (else :class:`ApiError`). Nothing is decoded, and nothing is kept: the
    images are closed again (a WebP opener holds a copy of its bytes), to be opened once more when decoded."""
    pixels: list[int] = []
    for index, upload in enumerate(uploads):
        try:
            with preprocessor.open(upload.data) as image:
                pixels.append(image.width * image.height)
        except ImageDecodeError as exc:
            raise ApiError.from_decode(exc, where(index, upload, len(uploads))) from None
        if sum(pixels) > max_request_pixels:
            raise ApiError(413, "request_too_large", f"the request's images have more than {max_request_pixels} "
                                                     "pixels together (the limit per request); send fewer or smaller "
                                                     "images")
    return pixels


# ---------------------------------------------------------------------------------------------------- auth
class BearerAuth:
    """Checks ``Authorization: Bearer TOKEN`` against the accepted tokens; with none configured, everything passes."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = tuple(token.encode() for token in tokens)

    @property
    def open(self) -> bool:
        return not self._tokens

    def check(self, header: str | None) -> None:
        if not self._tokens:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer TOKEN'",
                           headers={"WWW-Authenticate": "Bearer"})
        given = token.strip().encode()
        # compare with every token (no early exit), so the time taken does not tell which one nearly matched
        matches = [hmac.compare_digest(given, accepted) for accepted in self._tokens]
        if not any(matches):
            raise ApiError(401, "unauthorized", "wrong token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


# ---------------------------------------------------------------------------------------------------- load limits
class Admission:
    """At most ``limit`` requests inside at once; the next is answered 503 with ``Retry-After`` (never queued)."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.active = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.active >= self.limit:
            raise ApiError(503, "overloaded", f"this replica is busy with {self.active} requests; retry shortly",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class PixelBudget:
    """A weighted semaphore over pixels: the images being decoded at once in a replica sum to at most ``capacity``
    (an image is refused before this if it alone is over ``max_image_pixels`` ≤ ``capacity``).

    First come, first served: an image waits behind every image that asked before it, even when it would fit now,
    so a stream of small images cannot starve a large one (the large one's wait is bounded by the pixels ahead of
    it, not by luck)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        pixels = min(max(1, pixels), self.capacity)
        if self._waiting or self.free < pixels:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (pixels, granted)
            self._waiting.append(entry)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release(pixels)  # granted just as the waiter was cancelled: give the pixels back
                else:
                    self._waiting.remove(entry)
                    self._grant()  # those behind it may fit now
                raise
        else:
            self.free -= pixels
        try:
            yield
        finally:
            self._release(pixels)

    def _release(self, pixels: int) -> None:
        self.free += pixels
        self._grant()

    def _grant(self) -> None:
        """Wake waiters from the front for as long as the first one fits."""
        while self._waiting and self._waiting[0][0] <= self.free:
            pixels, granted = self._waiting.popleft()
            if granted.done():
                continue
            self.free -= pixels
            granted.set_result(None)


# ---------------------------------------------------------------------------------------------------- metrics
class RequestMetrics:
    """Pure ASGI middleware: counts every answer by route and status, times classify requests end to end."""

    def __init__(self, app: ASGIApp, metrics: IngressMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = path if path in ROUTES else "other"  # bounded label values, whatever URLs clients invent
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(route, status)
            if route == "/v1/classify":
                self.metrics.stage("total", time.perf_counter() - start)
