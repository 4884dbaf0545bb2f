"""storage: settings from the environment or a mounted Secret, URIs, local and S3 operations, clear errors."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from taxonet import storage
from taxonet.errors import StorageError
from taxonet.storage import S3Settings

pytestmark = pytest.mark.data

SECRET = "s3cr3t-value-that-must-not-leak"


# ---------------------------------------------------------------------------------------------------- settings
def test_settings_from_environment_hide_secrets() -> None:
    settings = S3Settings.from_env({
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY1",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": "token-value-also-secret",
        "AWS_DEFAULT_REGION": "eu-north-1",
        "AWS_ENDPOINT_URL": "http://minio:9000",
    })
    assert settings.endpoint_url == "http://minio:9000"
    assert settings.region == "eu-north-1"
    assert settings.secret_key == SECRET and settings.session_token == "token-value-also-secret"
    text = repr(settings) + str(settings)
    assert SECRET not in text and "token-value-also-secret" not in text and "AKIAEXAMPLEKEY1" not in text
    assert "credentials=set" in text and "http://minio:9000" in text
    assert settings.scrub(f"failed with {SECRET}") == "failed with ***"


def test_settings_prefer_s3_specific_endpoint_and_aws_region() -> None:
    settings = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://general", "AWS_ENDPOINT_URL_S3": "http://s3only",
                                    "AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert settings.endpoint_url == "http://s3only" and settings.region == "us-west-2"
    assert settings.access_key is None and settings.credentials_source == "default chain"


def test_settings_from_mounted_secret_dir_take_precedence(tmp_path: Path) -> None:
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "AWS_ACCESS_KEY_ID").write_text("from-secret-key\n")
    (secret_dir / "AWS_SECRET_ACCESS_KEY").write_text(SECRET + "\n")
    (secret_dir / "AWS_ENDPOINT_URL_S3").write_text("http://ceph:7480")
    settings = S3Settings.from_env({"TAXONET_S3_SECRET_DIR": str(secret_dir), "AWS_ACCESS_KEY_ID": "env-key",
                                    "AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_REGION": "us-east-2"})
    assert settings.access_key == "from-secret-key"
    assert settings.secret_key == SECRET  # stripped of the trailing newline a Secret file often has
    assert settings.endpoint_url == "http://ceph:7480" and settings.region == "us-east-2"
    assert str(secret_dir) in settings.credentials_source
    assert SECRET not in repr(settings)


def test_settings_refuse_half_credentials_and_missing_secret_dir(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY is missing"):
        S3Settings.from_env({"AWS_ACCESS_KEY_ID": "only-the-key"})
    with pytest.raises(StorageError, match="not a directory"):
        S3Settings.from_env({"TAXONET_S3_SECRET_DIR": str(tmp_path / "absent")})


# ---------------------------------------------------------------------------------------------------- URIs, local
def test_uri_helpers() -> None:
    assert storage.is_s3("s3://bucket/key") and not storage.is_s3("/tmp/x") and not storage.is_s3("file:///tmp/x")
    assert storage.split_s3("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.join("s3://bucket/ds/", "shards", "part-0.parquet") == "s3://bucket/ds/shards/part-0.parquet"
    assert storage.join("file:///data/ds", "dataset.json") == "file:///data/ds/dataset.json"
    assert storage.join("/data/ds", "a", "b") == "/data/ds/a/b"
    assert storage.relative_to("s3://bucket/ds/shards/x.parquet", "s3://bucket/ds") == "shards/x.parquet"
    with pytest.raises(StorageError, match="no bucket"):
        storage.split_s3("s3:///key")


@pytest.mark.parametrize("style", ["path", "file-url"])
def test_local_operations(tmp_path: Path, style: str) -> None:
    base = str(tmp_path / "store") if style == "path" else "file://" + str(tmp_path / "store")
    target = storage.join(base, "a", "b.bin")
    assert not storage.exists(target)
    storage.write_bytes(target, b"payload")
    assert storage.exists(target) and storage.read_bytes(target) == b"payload"
    storage.write_bytes(storage.join(base, "c.bin"), b"x")
    assert [storage.relative_to(u, base) for u in storage.list_files(base)] == ["a/b.bin", "c.bin"]
    assert not [p for p in (tmp_path / "store").rglob("*.tmp")]  # the atomic write left no temporary file
    filesystem, path = storage.pyarrow_filesystem(target)
    assert type(filesystem).__name__ == "LocalFileSystem" and path == str(tmp_path / "store" / "a" / "b.bin")
    storage.delete_files([target])
    assert not storage.exists(target)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(target)


def test_unreachable_endpoint_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "some-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("TAXONET_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("s3://bucket/ds/dataset.json")
    assert f"127.0.0.1:{port} is unreachable" in str(caught.value)
    assert SECRET not in str(caught.value)


# ---------------------------------------------------------------------------------------------------- S3 (moto server)
@pytest.mark.integration
def test_s3_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    base = f"s3://{s3_bucket}/prefix"
    storage.write_bytes(f"{base}/a/one.txt", b"1")
    storage.write_bytes(f"{base}/two.txt", b"22")
    assert storage.read_bytes(f"{base}/two.txt") == b"22"
    assert storage.exists(f"{base}/a/one.txt") and not storage.exists(f"{base}/nope.txt")
    assert storage.list_files(base) == [f"{base}/a/one.txt", f"{base}/two.txt"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/nope.txt")

    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "x.bin").write_bytes(b"xx")
    (local / "y.bin").write_bytes(b"y")
    written = storage.upload_dir(local, f"s3://{s3_bucket}/copy")
    assert sorted(written) == [f"s3://{s3_bucket}/copy/sub/x.bin", f"s3://{s3_bucket}/copy/y.bin"]
    downloaded = storage.download_dir(f"s3://{s3_bucket}/copy", tmp_path / "down")
    assert sorted(p.relative_to(tmp_path / "down").as_posix() for p in downloaded) == ["sub/x.bin", "y.bin"]
    assert (tmp_path / "down" / "sub" / "x.bin").read_bytes() == b"xx"

    filesystem, path = storage.pyarrow_filesystem(f"{base}/two.txt")
    assert path == f"{s3_bucket}/prefix/two.txt"  # pyarrow wants bucket/key, not s3://
    with filesystem.open_input_stream(path) as handle:
        assert handle.read() == b"22"

    storage.delete_files(storage.list_files(base))
    assert storage.list_files(base) == []


@pytest.mark.integration
def test_s3_missing_bucket_is_a_clear_error(s3_server: str) -> None:
    uri = "s3://taxonet-no-such-bucket/ds/dataset.json"
    for action in (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"x"),
                   lambda: storage.exists(uri), lambda: storage.check_writable("s3://taxonet-no-such-bucket/ds")):
        with pytest.raises(StorageError, match="bucket 'taxonet-no-such-bucket' does not exist"):
            action()


def _set_moto_auth(endpoint: str, allowed_unauthenticated: str) -> None:
    """moto's server checks credentials (as AWS does) once its free-request allowance is 0; 'inf' turns it off."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=allowed_unauthenticated.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture()
def s3_checks_credentials(s3_server: str):
    _set_moto_auth(s3_server, "0")
    try:
        yield s3_server
    finally:
        _set_moto_auth(s3_server, "inf")


@pytest.mark.integration
def test_s3_wrong_credentials_are_a_clear_error(s3_bucket: str, s3_checks_credentials: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uri = f"s3://{s3_bucket}/ds/dataset.json"
    with pytest.raises(StorageError) as caught:
        storage.write_bytes(uri, b"x")
    message = str(caught.value)
    assert "rejected the S3 credentials" in message and "InvalidAccessKeyId" in message
    assert SECRET not in message
    with pytest.raises(StorageError, match="wrong credentials or no permission"):
        storage.check_writable(f"s3://{s3_bucket}/ds")
