"""One URI layer for everything t2v stores: local paths and s3:// (boto3).

S3-compatible stores are reached through the standard `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`)
environment variable, which boto3 reads itself, so the same URIs work on AWS, MinIO or a local server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import StorageError


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"not an s3 URI with a bucket: {uri!r}")
    return bucket, key.strip("/")


def s3_client():
    import boto3

    return boto3.client("s3")


@contextmanager
def failures_as_storage_errors(uri: str, action: str):
    """An S3 request that still fails after boto3's retries, or a local write the disk refuses, is a
    StorageError naming the URI (a missing object stays FileNotFoundError)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except FileNotFoundError:
        raise
    except ClientError as e:
        raise StorageError(uri, action, e.response.get("Error", {}).get("Code", "error")) from e
    except (BotoCoreError, OSError) as e:
        raise StorageError(uri, action, type(e).__name__) from e


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except client.exceptions.ClientError:
        pass
    resp = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    return resp.get("KeyCount", 0) > 0


def list_files(uri: str) -> list[str]:
    """Relative paths of all files under a folder URI, sorted."""
    if not is_s3(uri):
        root = Path(uri)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    bucket, prefix = split_s3(uri)
    prefix = prefix + "/" if prefix else ""
    out = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    client = s3_client()
    with failures_as_storage_errors(uri, "read"):
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (client.exceptions.NoSuchKey, client.exceptions.NoSuchBucket):
            raise FileNotFoundError(uri) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers never see a half-written file (an S3 put is whole or absent; a local file is
    written under a temporary name and renamed). A refused write is a StorageError."""
    with failures_as_storage_errors(uri, "write"):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; stored files are ordinary files
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create a file or object only if none exists; True if this call created it. Atomic against every other
    writer: an O_EXCL open locally, a conditional put (If-None-Match: *) on S3. (An S3-compatible store that
    ignores the condition overwrites instead: there, keep one writer.) Either way the content appears whole."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        with failures_as_storage_errors(uri, "create"):
            try:
                client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except client.exceptions.ClientError as e:
                # 412: the object exists; 409: another conditional put of it is in flight (it will win).
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        return True
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written in full under a temporary name, then hard-linked into place (link fails if the name exists): a
    # writer that dies midway leaves no half-written file holding the name.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def delete(uri: str) -> None:
    """Remove one file or object; a missing one is not an error."""
    with failures_as_storage_errors(uri, "delete"):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().delete_object(Bucket=bucket, Key=key)
        else:
            Path(uri).unlink(missing_ok=True)


def presigned_url(uri: str, expires_s: int = 3600, content_type: str | None = None) -> str | None:
    """A time-limited GET URL for an s3:// object (None for local paths: they are served by the API itself)."""
    if not is_s3(uri):
        return None
    bucket, key = split_s3(uri)
    params = {"Bucket": bucket, "Key": key}
    if content_type:
        params["ResponseContentType"] = content_type
    return s3_client().generate_presigned_url("get_object", Params=params, ExpiresIn=int(expires_s))


def download_dir(uri: str, local: str | os.PathLike) -> Path:
    """Copy every object under an s3:// folder into a local folder."""
    bucket, prefix = split_s3(uri)
    local = Path(local)
    client = s3_client()
    files = list_files(uri)
    if not files:
        raise FileNotFoundError(uri)
    for rel in files:
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, f"{prefix}/{rel}" if prefix else rel, str(dest))
    return local


def upload_dir(local: str | os.PathLike, uri: str) -> None:
    bucket, prefix = split_s3(uri)
    client = s3_client()
    root = Path(local)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        client.upload_file(str(path), bucket, f"{prefix}/{rel}" if prefix else rel)


class local_copy:
    """Context manager: a local folder holding the contents of a folder URI (a temp copy for s3://)."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        if not is_s3(self.uri):
            return Path(self.uri)
        self._tmp = tempfile.mkdtemp(prefix="t2v-s3-")
        return download_dir(self.uri, self._tmp)

    def __exit__(self, *exc):
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def arrow_filesystem(uri: str):
    """(pyarrow FileSystem, path) for a URI; S3 honours AWS_ENDPOINT_URL like boto3 does."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    bucket, key = split_s3(uri)
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
