"""Storage: the one place that knows URIs, so every path works the same on a local disk and on S3-compatible storage.

A URI is a local path, a ``file://`` URL or ``s3://bucket/key``; anything else (``gs://``, ``abfs://``, ``http://``)
is refused with a :class:`~taxonet.errors.StorageError`, never taken for a local directory. Every operation goes
through one filesystem layer, :mod:`pyarrow.fs` (``LocalFileSystem`` or ``S3FileSystem`` with any S3-compatible
endpoint; the same layer Ray Train and Ray Data use). boto3 is used for one thing pyarrow cannot do: a conditional
create (``PUT`` with ``If-None-Match: *``, :func:`create_new`), which the model registry needs to hand out version
numbers safely.

S3 settings (endpoint, region, credentials) come from the standard AWS variables or from a mounted Kubernetes Secret
directory (``TAXONET_S3_SECRET_DIR``, one file per variable name). Failures become :class:`StorageError` with a
message that names the cause (wrong credentials, missing bucket, unreachable endpoint) and never a secret.

Keys and relative paths are checked wherever they meet a root: a part given to :func:`join`, a key listed below a
prefix (:func:`relative_to`, :func:`list_relative`) or written into a local directory (:func:`download_dir`) that is
absolute, holds a ``..`` segment, a backslash or a NUL byte raises :class:`UnsafePathError`: an object named
``run/best/../../home/.bashrc`` never lands outside the directory it is downloaded into.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from pyarrow import fs

from taxonet.errors import StorageError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
#: what a URI may look like, for error messages
SUPPORTED_URIS = "a local path, file:///path or s3://bucket/key"
#: a scheme prefix (two letters or more, so that nothing like a drive letter is taken for one)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")
#: bytes per read/write when streaming a file between filesystems
CHUNK_BYTES = 8 << 20
#: directory of a mounted Secret with files named like the variables below (Kubernetes ``secret`` volume)
SECRET_DIR_VARIABLE = "TAXONET_S3_SECRET_DIR"
#: number of attempts per S3 request (botocore "standard" retry mode: exponential backoff with jitter)
MAX_ATTEMPTS_VARIABLE = "TAXONET_S3_MAX_ATTEMPTS"
_ACCESS_KEY_NAMES = ("AWS_ACCESS_KEY_ID",)
_SECRET_KEY_NAMES = ("AWS_SECRET_ACCESS_KEY",)
_TOKEN_NAMES = ("AWS_SESSION_TOKEN",)
_REGION_NAMES = ("AWS_REGION", "AWS_DEFAULT_REGION")
_ENDPOINT_NAMES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                               "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed",
                               "UnrecognizedClientException"})
_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})


@dataclass(frozen=True)
class S3Settings:
    """Endpoint, region and credentials for S3-compatible storage. Secrets are excluded from ``repr``.

    ``None`` credentials let boto3 / pyarrow fall back to their own chain (instance profile, IRSA web identity).
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    #: where the credentials came from ("environment", "secret dir PATH" or "default chain"), for messages
    credentials_source: str = "default chain"

    def __repr__(self) -> str:
        return (f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"credentials={'set' if self.access_key else 'unset'} ({self.credentials_source}), "
                f"max_attempts={self.max_attempts})")

    __str__ = __repr__

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "S3Settings":
        """Read the AWS variables; files in ``TAXONET_S3_SECRET_DIR`` (a mounted Secret) take precedence."""
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {k: v for k, v in environ.items() if k.startswith("AWS_") and v}
        source = "environment"
        secret_dir = environ.get(SECRET_DIR_VARIABLE)
        if secret_dir:
            directory = Path(secret_dir)
            if not directory.is_dir():
                raise StorageError(f"{SECRET_DIR_VARIABLE}={secret_dir} is not a directory")
            names = (*_ACCESS_KEY_NAMES, *_SECRET_KEY_NAMES, *_TOKEN_NAMES, *_REGION_NAMES, *_ENDPOINT_NAMES)
            for name in names:
                path = directory / name
                if path.is_file():
                    values[name] = path.read_text(encoding="utf-8").strip()
            source = f"secret dir {secret_dir}"

        def first(names: tuple[str, ...]) -> str | None:
            return next((values[n] for n in names if values.get(n)), None)

        access_key, secret_key = first(_ACCESS_KEY_NAMES), first(_SECRET_KEY_NAMES)
        if bool(access_key) != bool(secret_key):
            missing = "AWS_SECRET_ACCESS_KEY" if access_key else "AWS_ACCESS_KEY_ID"
            raise StorageError(f"incomplete S3 credentials from the {source}: {missing} is missing")
        try:
            max_attempts = int(environ.get(MAX_ATTEMPTS_VARIABLE, "5"))
        except ValueError:
            raise StorageError(f"{MAX_ATTEMPTS_VARIABLE} must be an integer") from None
        return cls(
            endpoint_url=first(_ENDPOINT_NAMES),
            region=first(_REGION_NAMES),
            access_key=access_key,
            secret_key=secret_key,
            session_token=first(_TOKEN_NAMES),
            max_attempts=max(1, max_attempts),
            credentials_source=source if access_key else "default chain",
        )

    def describe_endpoint(self) -> str:
        return self.endpoint_url or "AWS S3"

    def scrub(self, text: str) -> str:
        """Remove every secret value from a message (defence in depth: library errors may quote requests)."""
        for secret in (self.secret_key, self.session_token, self.access_key):
            if secret and len(secret) >= 6:  # a too-short value would mangle ordinary words
                text = text.replace(secret, "***")
        return text


class UnsafePathError(StorageError):
    """A key or relative path that would escape its root (``..``, absolute, backslash, NUL)."""


# ---------------------------------------------------------------------------------------------------- URIs
def check_uri(uri: str | os.PathLike) -> str:
    """The URI as text if taxonet can use it; :class:`StorageError` for an unsupported scheme or a NUL byte."""
    text = os.fspath(uri)
    if not isinstance(text, str):
        raise StorageError(f"a storage URI must be text, got {text!r}")
    if "\x00" in text:
        raise UnsafePathError(f"storage URI {text!r} contains a NUL byte")
    if not text:
        raise StorageError(f"empty storage URI: expected {SUPPORTED_URIS}")
    match = _SCHEME.match(text)
    if match and not text.startswith((S3_SCHEME, FILE_SCHEME)):
        raise StorageError(f"unsupported storage URI {text!r}: scheme {match.group(1)!r} is not supported; "
                           f"use {SUPPORTED_URIS}")
    if text.startswith(S3_SCHEME):
        split_s3(text)
        if ".." in text[len(S3_SCHEME):].split("/"):
            raise UnsafePathError(f"S3 URI {text!r} has a '..' segment (S3 keys are literal: it would not go up)")
    elif text.startswith(FILE_SCHEME):
        host = urlparse(text).netloc
        if host not in ("", "localhost"):
            raise StorageError(f"unsupported file URI {text!r}: only local files (file:///path), not host {host!r}")
    return text


def is_s3(uri: str | os.PathLike) -> bool:
    return check_uri(uri).startswith(S3_SCHEME)


def is_local(uri: str | os.PathLike) -> bool:
    """A local path or ``file://`` URL (the URI is checked: an unsupported scheme raises)."""
    return not is_s3(uri)


def local_path(uri: str | os.PathLike) -> Path:
    """A local URI (path or ``file://``) → Path."""
    text = check_uri(uri)
    if text.startswith(S3_SCHEME):
        raise ValueError(f"{text} is not a local path")
    if text.startswith(FILE_SCHEME):
        return Path(urlparse(text).path)
    return Path(text)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``("bucket", "key")`` (key without leading slash, may be empty)."""
    rest = uri[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"invalid S3 URI {uri!r}: no bucket name")
    return bucket, key.lstrip("/")


def safe_relative(path: str) -> str:
    """A relative path or key suffix as normalised ``a/b`` text; :class:`UnsafePathError` if it could escape its root.

    Refused: empty, absolute (``/x``), a ``..`` segment, a backslash (a separator on Windows) or a NUL byte. Empty and
    ``.`` segments are dropped (``a//./b`` → ``a/b``).
    """
    if not isinstance(path, str):
        raise UnsafePathError(f"relative path must be text, got {path!r}")
    problem = None
    if "\x00" in path:
        problem = "contains a NUL byte"
    elif "\\" in path:
        problem = "contains a backslash"
    elif path.startswith("/"):
        problem = "is absolute"
    elif ".." in path.split("/"):
        problem = "has a '..' segment"
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if problem is None and not parts:
        problem = "is empty"
    if problem:
        raise UnsafePathError(f"unsafe path {path!r}: it {problem} and could escape the directory it belongs to")
    return "/".join(parts)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join relative parts onto a URI, keeping its style (``s3://``, ``file://`` or a plain path).

    Each part may hold ``/`` separators; an absolute part or a ``..`` segment raises :class:`UnsafePathError`.
    """
    text = check_uri(uri)
    cleaned = [safe_relative(p.rstrip("/")) for p in parts if p and p.strip("/")]
    if not cleaned:
        return text
    if text.startswith((S3_SCHEME, FILE_SCHEME)):
        return posixpath.join(text.rstrip("/"), *cleaned)
    return os.path.join(text, *cleaned)


def relative_to(uri: str, base: str) -> str:
    """Path of ``uri`` below ``base`` with ``/`` separators (both in the same style); refuses paths that escape it."""
    text, root = check_uri(uri), check_uri(base)
    if text.startswith(S3_SCHEME):
        if not root.startswith(S3_SCHEME):
            raise StorageError(f"{uri} and {base} are not on the same storage")
        key, prefix = text[len(S3_SCHEME):], root[len(S3_SCHEME):].rstrip("/") + "/"
        if not key.startswith(prefix):
            raise UnsafePathError(f"{uri} is not below {base}")
        return safe_relative(key[len(prefix):])
    try:
        relative = local_path(text).relative_to(local_path(root)).as_posix()
    except ValueError:
        relative = os.path.relpath(local_path(text).resolve(), local_path(root).resolve()).replace(os.sep, "/")
    return safe_relative(relative)


def parent(uri: str | os.PathLike) -> str:
    """The URI of the directory holding ``uri``, in its style (``s3://b/runs/x/best`` → ``s3://b/runs/x``)."""
    text = check_uri(uri).rstrip("/")
    if text.startswith((S3_SCHEME, FILE_SCHEME)):
        head = posixpath.dirname(text)
        return head if len(head) > len(S3_SCHEME if text.startswith(S3_SCHEME) else FILE_SCHEME) else text
    return os.path.dirname(os.path.abspath(text))


def basename(uri: str | os.PathLike) -> str:
    """The last segment of a URI (``s3://b/runs/x/best`` → ``best``)."""
    return posixpath.basename(check_uri(uri).rstrip("/"))


def is_absolute(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` and ``file://`` URIs and absolute local paths (a relative path needs a base)."""
    text = check_uri(uri)
    return text.startswith((S3_SCHEME, FILE_SCHEME)) or os.path.isabs(text)


def from_filesystem_path(path: str, like: str | os.PathLike) -> str:
    """A path on the filesystem :func:`pyarrow_filesystem` gave for ``like`` (``bucket/key`` for S3, absolute
    locally) back as a URI in ``like``'s style: what Ray Train reports as a checkpoint path, made usable here."""
    text = check_uri(like)
    if text.startswith(S3_SCHEME):
        return path if path.startswith(S3_SCHEME) else S3_SCHEME + path.lstrip("/")
    return FILE_SCHEME + path if text.startswith(FILE_SCHEME) else path


def ray_storage(uri: str | os.PathLike) -> tuple[str, fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig: S3 gets an explicit pyarrow filesystem
    (custom endpoints, credentials from a Secret); a local directory is created and given as an absolute path."""
    text = check_uri(uri)
    filesystem, path = pyarrow_filesystem(text)
    if text.startswith(S3_SCHEME):
        return path, filesystem
    os.makedirs(path, exist_ok=True)
    return path, None


# ---------------------------------------------------------------------------------------------------- clients
_client_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _cached_client(settings: S3Settings) -> Any:
    # boto3 is imported here, not at module level: only create_new (a conditional PUT pyarrow cannot send) needs it
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # S3-compatible servers (MinIO, Ceph, moto) behind an IP or a plain host name need path-style addressing
        s3={"addressing_style": "path"} if settings.endpoint_url else {},
        # newer boto3 sends CRC checksums by default, which several S3-compatible servers reject
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=32,
    )
    session = boto3.session.Session(
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        region_name=settings.region or "us-east-1",
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


def s3_client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client for ``settings`` (default: from the environment); cached, thread-safe to use.

    Kept for the one request pyarrow cannot make (a conditional PUT, :func:`create_new`) and for callers that manage
    buckets; everything else goes through :func:`pyarrow_filesystem`.
    """
    settings = settings or S3Settings.from_env()
    with _client_lock:  # boto3 session/client creation is not thread-safe
        return _cached_client(settings)


@functools.lru_cache(maxsize=8)
def _cached_s3_filesystem(settings: S3Settings) -> fs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": settings.region or "us-east-1",
        "connect_timeout": settings.connect_timeout,
        "request_timeout": settings.read_timeout,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
    }
    if settings.access_key:
        kwargs.update(access_key=settings.access_key, secret_key=settings.secret_key)
        if settings.session_token:
            kwargs["session_token"] = settings.session_token
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        if not parsed.netloc:
            raise StorageError(f"invalid S3 endpoint URL {settings.endpoint_url!r}: expected http(s)://host[:port]")
        kwargs.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme or "https",
                      force_virtual_addressing=False)
    return fs.S3FileSystem(**kwargs)


def pyarrow_filesystem(uri: str | os.PathLike, settings: S3Settings | None = None) -> tuple[fs.FileSystem, str]:
    """``(pyarrow.fs.FileSystem, path)`` for a URI. For S3 the path is ``bucket/key`` (no scheme: pyarrow and Ray
    refuse ``s3://`` paths together with an explicit filesystem); a local path is made absolute."""
    uri = check_uri(uri)
    if uri.startswith(S3_SCHEME):
        settings = settings or S3Settings.from_env()
        with _client_lock:
            filesystem = _cached_s3_filesystem(settings)
        bucket, key = split_s3(uri)
        return filesystem, f"{bucket}/{key}".rstrip("/")
    return fs.LocalFileSystem(), str(local_path(uri).resolve())


def _reset_after_fork() -> None:
    # a forked worker must not reuse the parent's connection pools or a lock held by another parent thread
    global _client_lock
    _client_lock = threading.Lock()
    _cached_client.cache_clear()
    _cached_s3_filesystem.cache_clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


# ---------------------------------------------------------------------------------------------------- errors
def storage_error(exc: BaseException, action: str, uri: str, settings: S3Settings | None = None) -> Exception:
    """Translate a boto3/botocore/pyarrow exception into a clear :class:`StorageError` (or FileNotFoundError)."""
    settings = settings or _safe_settings()
    endpoint = settings.describe_endpoint() if settings else "S3"
    bucket = split_s3(uri)[0] if is_s3(uri) else ""
    code, detail = _error_code(exc)
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        message = (f"cannot {action} {uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                   f"or mount a Secret and set {SECRET_DIR_VARIABLE}")
    elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError") \
            or "connect" in detail.lower() and code is None:
        message = f"cannot {action} {uri}: S3 endpoint {endpoint} is unreachable ({text})"
    elif code in _CREDENTIAL_CODES:
        source = settings.credentials_source if settings else "environment"
        message = (f"cannot {action} {uri}: {endpoint} rejected the S3 credentials ({code}); check the access key "
                   f"and secret key from the {source}")
    elif code in _MISSING_BUCKET_CODES or (code in _MISSING_KEY_CODES and action == "access bucket"):
        message = f"cannot {action} {uri}: bucket {bucket!r} does not exist at {endpoint}"
    elif code in _MISSING_KEY_CODES:
        return FileNotFoundError(f"{uri} does not exist")
    elif code in _DENIED_CODES:
        message = (f"cannot {action} {uri}: access denied by {endpoint} ({code}); wrong credentials or no permission "
                   f"on bucket {bucket!r}")
    else:
        message = f"cannot {action} {uri} at {endpoint}: {text}"
    return StorageError(settings.scrub(message) if settings else message)


def _safe_settings() -> S3Settings | None:
    try:
        return S3Settings.from_env()
    except StorageError:
        return None


def _error_code(exc: BaseException) -> tuple[str | None, str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code = error.get("Code") or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")) or None
        return code, str(error.get("Message") or "")
    text = str(exc)
    # pyarrow's S3 errors are OSErrors whose text carries the AWS error name
    lowered = text.lower()
    if "invalidaccesskeyid" in lowered or "signaturedoesnotmatch" in lowered or "invalid_access_key" in lowered:
        return "InvalidAccessKeyId", text
    if "nosuchbucket" in lowered or "no_such_bucket" in lowered or \
            ("bucket" in lowered and "does not exist" in lowered):
        return "NoSuchBucket", text
    if "access_denied" in lowered or "accessdenied" in lowered or "forbidden" in lowered:
        return "AccessDenied", text
    if "connect" in lowered or "curl" in lowered or "network" in lowered:
        return None, f"connection failed: {text}"
    return None, text


def _is_boto_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("botocore", "boto3", "urllib3"))


# ---------------------------------------------------------------------------------------------------- operations
def _translate(exc: BaseException, action: str, uri: str) -> BaseException:
    """A pyarrow/boto3 failure on ``uri`` → FileNotFoundError (missing file, bucket exists) or StorageError.

    pyarrow answers a missing *bucket* like a missing key (``FileNotFoundError``) or with ``NoSuchBucket``; both
    become "bucket does not exist" so a typo in a bucket name is never reported as a missing file.
    """
    if isinstance(exc, FileNotFoundError) or (isinstance(exc, OSError) and exc.errno == 2):
        if uri.startswith(S3_SCHEME):
            check_bucket(uri)
        return FileNotFoundError(f"{uri} does not exist")
    if uri.startswith(S3_SCHEME) and (isinstance(exc, OSError) or _is_boto_error(exc)):
        return storage_error(exc, action, uri)
    return exc


@contextmanager
def open_input(uri: str | os.PathLike) -> Iterator[BinaryIO]:
    """A readable binary stream of a file/object (streamed: large files are never held in memory whole)."""
    text = check_uri(uri)
    filesystem, path = pyarrow_filesystem(text)
    try:
        stream = filesystem.open_input_stream(path)
    except Exception as exc:
        raise _translate(exc, "read", text) from None
    with stream:
        yield stream


#: reads of an S3 object that was replaced meanwhile, before read_bytes gives up
TORN_READ_ATTEMPTS = 10


def read_bytes(uri: str | os.PathLike, *, replaced_in_place: bool = False) -> bytes:
    """The whole object/file. A missing one raises FileNotFoundError; storage failures raise StorageError.

    ``replaced_in_place``: for objects that are overwritten while others read them (registry aliases). On S3 an
    object is read as its size was when the read began (pyarrow asks for the size, then for that byte range): one
    replaced in between comes back cut to the old length. Then the size is asked again after the read (one more
    request), and the read repeated while the two disagree. Write-once objects (images, shards) skip that."""
    text = check_uri(uri)
    filesystem, path = pyarrow_filesystem(text)
    check_size = replaced_in_place and text.startswith(S3_SCHEME)
    for attempt in range(TORN_READ_ATTEMPTS):
        try:
            with filesystem.open_input_stream(path) as stream:
                data = stream.read()
            if not check_size or filesystem.get_file_info(path).size == len(data):
                return data
            time.sleep(0.01 * (attempt + 1))  # a write is in progress: let it land
        except Exception as exc:
            raise _translate(exc, "read", text) from None
    raise StorageError(f"could not read {text}: it was replaced during each of {TORN_READ_ATTEMPTS} reads")


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write an object/file atomically: an S3 object appears whole when its upload completes; locally a temporary
    file beside the target is renamed into place."""
    text = check_uri(uri)
    filesystem, path = pyarrow_filesystem(text)
    if text.startswith(S3_SCHEME):
        try:
            with filesystem.open_output_stream(path) as stream:
                stream.write(data)  # one write, then close: the upload completes only with all the bytes
        except Exception as exc:
            raise _translate(exc, "write", text) from None
        return
    with _local_temporary(path) as temporary:
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        filesystem.move(temporary, path)  # rename(2): readers see the old file or the new one, never a part


@contextmanager
def _local_temporary(path: str) -> Iterator[str]:
    """A temporary path beside local ``path`` (parents created), removed unless it was moved into place."""
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temporary
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


#: endpoints seen refusing a conditional PUT on an existing key (probed once per process)
_honours_if_none_match: set[str | None] = set()


def create_new(uri: str | os.PathLike, data: bytes) -> bool:
    """Create a file/object only if nothing exists at ``uri``; True if this call created it, False if it existed.

    Of any number of concurrent callers (threads, processes, machines) exactly one gets True. Locally the complete
    file is hard-linked into place (``link(2)`` fails if the name exists). On S3 it is a ``PUT`` with
    ``If-None-Match: *`` (AWS S3 since 2024, MinIO, Ceph RGW, moto) sent with boto3 because pyarrow cannot send
    conditional requests; an endpoint that ignores the header would let two writers both win, so the first create
    on an endpoint is followed by a probe that must be refused, and an endpoint that accepts it is an error.
    """
    text = check_uri(uri)
    filesystem, path = pyarrow_filesystem(text)
    if not text.startswith(S3_SCHEME):
        with _local_temporary(path) as temporary:
            with filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
        return True
    if not _conditional_put(text, data):
        return False
    settings = S3Settings.from_env()
    if settings.endpoint_url not in _honours_if_none_match:
        if _conditional_put(text, data):  # the object exists now: a server that honours the header must refuse
            raise StorageError(f"cannot create {text} exclusively: the S3 endpoint {settings.describe_endpoint()} "
                               "ignores 'If-None-Match: *' (conditional writes); taxonet needs them to number "
                               "model versions safely; upgrade the server or use one that supports them")
        _honours_if_none_match.add(settings.endpoint_url)
    return True


def _conditional_put(uri: str, data: bytes) -> bool:
    bucket, key = split_s3(uri)
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except Exception as exc:
        if not _is_boto_error(exc):
            raise
        code, _ = _error_code(exc)
        # 412: the key exists. 409: another conditional write on the key is in flight (AWS); it may win, so ours lost
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        if code in ("NotImplemented", "501"):
            raise StorageError(f"cannot create {uri} exclusively: the S3 endpoint does not implement conditional "
                               "writes ('If-None-Match: *'), which taxonet needs to number model versions") from None
        raise storage_error(exc, "write", uri) from None


def exists(uri: str | os.PathLike) -> bool:
    """True if a file/object (or a directory/prefix) exists at ``uri`` (a missing bucket is a StorageError)."""
    text = check_uri(uri)
    filesystem, path = pyarrow_filesystem(text)
    try:
        found = filesystem.get_file_info(path).type != fs.FileType.NotFound
    except Exception as exc:
        raise _translate(exc, "read", text) from None
    if not found and text.startswith(S3_SCHEME):
        check_bucket(text)  # "not found" may also mean "no such bucket": say so instead of False
    return found


def check_bucket(uri: str | os.PathLike) -> None:
    """Raise StorageError unless the bucket of an S3 URI exists and the credentials are accepted."""
    text = check_uri(uri)
    if not text.startswith(S3_SCHEME):
        return
    bucket, _ = split_s3(text)
    filesystem, _ = pyarrow_filesystem(text)
    try:
        info = filesystem.get_file_info(bucket)
    except Exception as exc:
        raise storage_error(exc, "access bucket", text) from None
    if info.type == fs.FileType.NotFound:
        settings = _safe_settings()
        endpoint = settings.describe_endpoint() if settings else "S3"
        raise StorageError(f"cannot access bucket {text}: bucket {bucket!r} does not exist at {endpoint}")


def check_writable(uri: str | os.PathLike) -> None:
    """Fail early (before any work) if ``uri`` cannot be written: missing bucket, bad credentials, read-only dir."""
    text = check_uri(uri)
    if text.startswith(S3_SCHEME):
        check_bucket(text)
        return
    path = local_path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise StorageError(f"output directory {path} is not writable")


def _file_infos(uri_prefix: str) -> list[fs.FileInfo]:
    filesystem, path = pyarrow_filesystem(uri_prefix)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    except NotADirectoryError:
        return []
    except Exception as exc:
        raise _translate(exc, "list", uri_prefix) from None
    files = [info for info in infos if info.type == fs.FileType.File]
    if not files and uri_prefix.startswith(S3_SCHEME):
        check_bucket(uri_prefix)  # an empty listing of a missing bucket is an error, not "no files"
    return files


def _relative_key(info_path: str, root: str) -> str:
    """The part of a listed pyarrow path below ``root``, checked (a listed key may hold anything, ``..`` included)."""
    prefix = root.rstrip("/") + "/"
    if not info_path.startswith(prefix):
        raise UnsafePathError(f"listed path {info_path!r} is not below {root!r}")
    return safe_relative(info_path[len(prefix):])


def list_relative(uri_prefix: str | os.PathLike) -> dict[str, int]:
    """Every file below a directory prefix (recursive) as ``{relative path: size in bytes}``, sorted.

    A key that would escape the prefix (``a/../../x``) raises :class:`UnsafePathError` naming it.
    """
    text = check_uri(uri_prefix)
    _, root = pyarrow_filesystem(text)
    entries = {_relative_key(info.path, root): int(info.size or 0) for info in _file_infos(text)}
    return dict(sorted(entries.items()))


def list_children(uri_prefix: str | os.PathLike) -> dict[str, bool]:
    """The entries directly below a directory/prefix as ``{name: is_directory}`` (not recursive), sorted.

    On S3 a "directory" is a common key prefix. Names that could not be a path segment (``..``) are refused.
    """
    text = check_uri(uri_prefix)
    filesystem, root = pyarrow_filesystem(text)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(root, recursive=False, allow_not_found=True))
    except NotADirectoryError:
        return {}
    except Exception as exc:
        raise _translate(exc, "list", text) from None
    children = {}
    for info in infos:
        name = _relative_key(info.path, root)
        if "/" not in name and info.type in (fs.FileType.File, fs.FileType.Directory):
            children[name] = info.type == fs.FileType.Directory
    return dict(sorted(children.items()))


def list_files(uri_prefix: str | os.PathLike) -> list[str]:
    """All files below a directory prefix (recursive), as URIs in the prefix's style, sorted.

    Keys below the prefix are not checked here (a listing only names them); whatever joins one onto a local
    directory goes through :func:`relative_to` or :func:`download_dir`, which refuse keys that escape.
    """
    text = check_uri(uri_prefix)
    _, root = pyarrow_filesystem(text)
    prefix = root.rstrip("/") + "/"
    found = []
    for info in _file_infos(text):
        relative = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
        if text.startswith(S3_SCHEME):
            found.append(posixpath.join(text.rstrip("/"), relative))
        elif text.startswith(FILE_SCHEME):
            found.append(posixpath.join(text.rstrip("/"), relative))
        else:
            found.append(os.path.join(text, *relative.split("/")))
    return sorted(found)


def _delete_missing_ok(uri: str, delete: Callable[[fs.FileSystem, str], None]) -> None:
    """Run ``delete(filesystem, path)`` for ``uri``; a missing file/prefix is fine, other failures are translated."""
    filesystem, path = pyarrow_filesystem(uri)
    try:
        delete(filesystem, path)
    except FileNotFoundError:
        return
    except Exception as exc:
        translated = _translate(exc, "delete", uri)
        if not isinstance(translated, FileNotFoundError):
            raise translated from None


def delete_files(uris: Iterable[str]) -> int:
    """Delete files/objects (missing ones are ignored); returns how many were requested."""
    uris = [check_uri(u) for u in uris]
    for uri in uris:
        _delete_missing_ok(uri, lambda filesystem, path: filesystem.delete_file(path))
    return len(uris)


def delete_tree(uri_prefix: str | os.PathLike) -> None:
    """Delete a directory/prefix and everything below it (missing is fine)."""
    _delete_missing_ok(check_uri(uri_prefix), lambda filesystem, path: filesystem.delete_dir(path))


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy one file/object: server-side within one S3 endpoint, streamed otherwise; the target appears whole."""
    source_uri, target_uri = check_uri(source), check_uri(target)
    source_fs, source_path = pyarrow_filesystem(source_uri)
    target_fs, target_path = pyarrow_filesystem(target_uri)
    if source_uri.startswith(S3_SCHEME) and target_uri.startswith(S3_SCHEME):
        try:
            source_fs.copy_file(source_path, target_path)  # CopyObject: no bytes through this process
        except Exception as exc:
            raise _translate(exc, "copy", source_uri) from None
        return
    with open_input(source_uri) as stream:
        _write_stream(stream, target_fs, target_path, target_uri)


def _write_stream(stream: BinaryIO, filesystem: fs.FileSystem, path: str, uri: str) -> None:
    if uri.startswith(S3_SCHEME):
        try:
            # a failure while reading the source leaves a partial object only under a name no manifest lists yet
            with filesystem.open_output_stream(path) as out:
                for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
                    out.write(block)
        except Exception as exc:
            raise _translate(exc, "write", uri) from None
        return
    with _local_temporary(path) as temporary:
        with filesystem.open_output_stream(temporary) as out:
            for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
                out.write(block)
        filesystem.move(temporary, path)


def upload_dir(local: str | os.PathLike, uri: str) -> list[str]:
    """Copy a local directory tree to a URI prefix; returns the written URIs."""
    root = Path(local)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    written = []
    for relative in list_relative(str(root.resolve())):
        target = join(uri, relative)
        copy_file(str(root / relative), target)
        written.append(target)
    return written


def download_dir(uri: str, local: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Copy every file below a URI prefix (or only ``names``, relative paths) into a local directory; returns the
    local paths. Every key is checked before anything is written: one that would escape ``local`` (``..``,
    absolute, NUL) raises :class:`UnsafePathError` and nothing is downloaded."""
    root = Path(local)
    relatives = [safe_relative(n) for n in names] if names is not None else list(list_relative(uri))
    out = []
    for relative in relatives:
        destination = root.joinpath(*relative.split("/"))
        copy_file(join(uri, relative), str(destination))
        out.append(destination)
    return out
