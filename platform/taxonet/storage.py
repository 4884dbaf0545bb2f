"""Storage: the one place that turns settings into clients, so every URI works local or on S3-compatible storage.

A URI is a local path, a ``file://`` URL or ``s3://bucket/key``. S3 settings (endpoint, region, credentials) come
from the standard AWS variables or from a mounted Kubernetes Secret directory (``TAXONET_S3_SECRET_DIR``, one file
per variable name); the same settings build a boto3 client (with retries and backoff) and a pyarrow
``S3FileSystem`` (for Parquet and Ray Data). Failures become :class:`taxonet.errors.StorageError` with a message
that names the cause (wrong credentials, missing bucket, unreachable endpoint) and never a secret.
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from taxonet.errors import StorageError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
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


# ---------------------------------------------------------------------------------------------------- URIs
def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def local_path(uri: str | os.PathLike) -> Path:
    """A local URI (path or ``file://``) → Path."""
    text = str(uri)
    if is_s3(text):
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


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a URI, keeping its style (``s3://``, ``file://`` or a plain path)."""
    text = str(uri)
    cleaned = [p.strip("/") for p in parts if p and p.strip("/")]
    if is_s3(text) or text.startswith(FILE_SCHEME):
        return posixpath.join(text.rstrip("/"), *cleaned) if cleaned else text
    return os.path.join(text, *cleaned)


def relative_to(uri: str, base: str) -> str:
    """Path of ``uri`` below ``base`` with ``/`` separators (both in the same style)."""
    if is_s3(uri):
        return posixpath.relpath(uri[len(S3_SCHEME):], base.rstrip("/")[len(S3_SCHEME):])
    return local_path(uri).relative_to(local_path(base)).as_posix()


# ---------------------------------------------------------------------------------------------------- clients
_client_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _cached_client(settings: S3Settings) -> Any:
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
    """A boto3 S3 client for ``settings`` (default: from the environment); cached, thread-safe to use."""
    settings = settings or S3Settings.from_env()
    with _client_lock:  # boto3 session/client creation is not thread-safe
        return _cached_client(settings)


@functools.lru_cache(maxsize=8)
def _cached_s3_filesystem(settings: S3Settings) -> Any:
    from pyarrow import fs

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


def pyarrow_filesystem(uri: str, settings: S3Settings | None = None) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for a URI. For S3 the path is ``bucket/key`` (no scheme: pyarrow and Ray
    refuse ``s3://`` paths together with an explicit filesystem)."""
    from pyarrow import fs

    if is_s3(uri):
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
def read_bytes(uri: str) -> bytes:
    """The whole object/file. A missing one raises FileNotFoundError; storage failures raise StorageError."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _is_boto_error(exc):
                raise storage_error(exc, "read", uri) from None
            raise
    return local_path(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object/file atomically: S3 PUTs are atomic; locally a temporary file is renamed into place."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            if _is_boto_error(exc):
                raise storage_error(exc, "write", uri) from None
            raise
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str) -> bool:
    """True if the file/object exists (a missing bucket is a StorageError, not False)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if not _is_boto_error(exc):
                raise
            code, _ = _error_code(exc)
            if code in _MISSING_KEY_CODES:
                check_bucket(uri)  # a 404 may also mean "no such bucket": say so instead of False
                return False
            raise storage_error(exc, "read", uri) from None
    return local_path(uri).exists()


def check_bucket(uri: str) -> None:
    """Raise StorageError unless the bucket of an S3 URI exists and the credentials are accepted."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as exc:
        if _is_boto_error(exc):
            raise storage_error(exc, "access bucket", uri) from None
        raise


def check_writable(uri: str) -> None:
    """Fail early (before any work) if ``uri`` cannot be written: missing bucket, bad credentials, read-only dir."""
    if is_s3(uri):
        check_bucket(uri)
        return
    path = local_path(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise StorageError(f"output directory {path} is not writable")


def list_files(uri_prefix: str) -> list[str]:
    """All files below a directory prefix (recursive), as URIs in the prefix's style, sorted."""
    if is_s3(uri_prefix):
        bucket, key = split_s3(uri_prefix)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        found: list[str] = []
        try:
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                found.extend(f"{S3_SCHEME}{bucket}/{item['Key']}" for item in page.get("Contents", [])
                             if not item["Key"].endswith("/"))
        except Exception as exc:
            if _is_boto_error(exc):
                raise storage_error(exc, "list", uri_prefix) from None
            raise
        return sorted(found)
    root = local_path(uri_prefix)
    if not root.is_dir():
        return []
    keep_scheme = str(uri_prefix).startswith(FILE_SCHEME)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    return [FILE_SCHEME + f if keep_scheme else f for f in files]


def delete_files(uris: Iterable[str]) -> int:
    """Delete files/objects (missing ones are ignored); returns how many were requested."""
    uris = list(uris)
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            by_bucket.setdefault(bucket, []).append(key)
        else:
            local_path(uri).unlink(missing_ok=True)
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = keys[start:start + 1000]
            try:
                s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk],
                                                                  "Quiet": True})
            except Exception as exc:
                if _is_boto_error(exc):
                    raise storage_error(exc, "delete from", f"{S3_SCHEME}{bucket}/{chunk[0]}") from None
                raise
    return len(uris)


def upload_dir(local: str | os.PathLike, uri: str) -> list[str]:
    """Copy a local directory tree to a URI prefix; returns the written URIs."""
    root = Path(local)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        target = join(uri, path.relative_to(root).as_posix())
        if is_s3(uri):
            bucket, key = split_s3(target)
            try:
                s3_client().upload_file(str(path), bucket, key)
            except Exception as exc:
                if _is_boto_error(exc) or type(exc).__name__ == "S3UploadFailedError":
                    raise storage_error(getattr(exc, "__cause__", None) or exc, "write", target) from None
                raise
        else:
            destination = local_path(target)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
        written.append(target)
    return written


def download_dir(uri: str, local: str | os.PathLike) -> list[Path]:
    """Copy every file below a URI prefix into a local directory; returns the local paths."""
    root = Path(local)
    files = list_files(uri)
    out = []
    for source in files:
        destination = root / relative_to(source, uri)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if is_s3(source):
            bucket, key = split_s3(source)
            try:
                s3_client().download_file(bucket, key, str(destination))
            except Exception as exc:
                if _is_boto_error(exc):
                    raise storage_error(exc, "read", source) from None
                raise
        else:
            shutil.copy2(local_path(source), destination)
        out.append(destination)
    return out
