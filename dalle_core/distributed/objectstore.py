"""Checkpoint storage behind a URL: an fsspec file system for ``s3://`` over boto3,
and DCP storage writers / readers for any fsspec file system.

``s3://bucket/prefix`` goes through `S3FileSystem` below, a small fsspec file
system on the platform's own boto3 client settings (dalle_core.storage: the
endpoint from ``DALLE_S3_ENDPOINT_URL``, credentials and region from the
environment, 'standard' retries), so checkpoints need no extra package (s3fs
pins botocore to another range than the boto3 the platform uses) and reach any
S3-protocol server (AWS, MinIO, moto). Any other ``protocol://`` URL is
resolved by fsspec itself (``memory://``, ``gcs://`` with gcsfs, ...).

Objects are written whole: a file opened for writing is spooled (in memory up
to 64 MiB, then on local disk) and uploaded when closed (multipart above 64 MiB,
boto3's managed transfer); a file opened for reading fetches byte ranges, so a
rank loading a resharded checkpoint reads only the slices it needs.
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from typing import Any

from fsspec import AbstractFileSystem

_SPOOL = 64 << 20
_READ_BUFFER = 8 << 20


def is_url(location: Any) -> bool:
    """True for ``protocol://...`` strings other than ``file://`` (a local path)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def _s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("DALLE_S3_ENDPOINT_URL") or None,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(retries={"max_attempts": 8, "mode": "standard"}),
    )


def _not_found(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey", "NotFound")


class _WriteFile(io.RawIOBase):
    """Spools what is written; uploads it as one object on close."""

    def __init__(self, fs: "S3FileSystem", bucket: str, key: str):
        self._fs, self._bucket, self._key = fs, bucket, key
        self._buf = tempfile.SpooledTemporaryFile(max_size=_SPOOL)
        self._abandoned = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self._buf.write(b)

    def tell(self) -> int:
        return self._buf.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def fileno(self) -> int:  # DCP's fsync falls back to os.sync(); writers here pass sync_files=False
        raise io.UnsupportedOperation("an S3 object has no file descriptor")

    def discard(self) -> None:
        self._abandoned = True

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self._abandoned = True
        return super().__exit__(exc_type, *rest)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._abandoned:
                self._buf.seek(0)
                self._fs.client.upload_fileobj(self._buf, self._bucket, self._key)
        finally:
            self._buf.close()
            super().close()


class _RangeReader(io.RawIOBase):
    """A seekable read-only view of one object, fetching byte ranges on demand."""

    def __init__(self, client, bucket: str, key: str, size: int):
        self._client, self._bucket, self._key, self._size = client, bucket, key, size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        body = self._client.get_object(Bucket=self._bucket, Key=self._key,
                                       Range=f"bytes={self._pos}-{self._pos + n - 1}")["Body"].read()
        b[:len(body)] = body
        self._pos += len(body)
        return len(body)


class S3FileSystem(AbstractFileSystem):
    """The part of fsspec's interface checkpoints use (open, ls, info, rm, mv,
    cat/pipe), over boto3. Paths are ``bucket/key`` (``s3://`` stripped)."""

    protocol = ("s3",)
    root_marker = ""
    cachable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.client = _s3_client()

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        path = S3FileSystem._strip_protocol(path)
        bucket, _, key = path.partition("/")
        return bucket, key.strip("/")

    def unstrip_protocol(self, name: str) -> str:
        return "s3://" + self._strip_protocol(name)

    # --- reading the namespace ---------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs):
        bucket, key = self._split(path)
        prefix = key + "/" if key else ""
        out: list[dict[str, Any]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                            Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                out.append({"name": f"{bucket}/{cp['Prefix'].rstrip('/')}", "size": 0, "type": "directory"})
            for obj in page.get("Contents", []):
                if obj["Key"] != prefix:
                    out.append({"name": f"{bucket}/{obj['Key']}", "size": obj["Size"], "type": "file"})
        if not out and key:
            try:
                out = [self.info(path)] if self.info(path)["type"] == "file" else []
            except FileNotFoundError:
                out = []
        return out if detail else [e["name"] for e in out]

    def info(self, path: str, **kwargs) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        bucket, key = self._split(path)
        if key:
            try:
                h = self.client.head_object(Bucket=bucket, Key=key)
                return {"name": f"{bucket}/{key}", "size": h["ContentLength"], "type": "file"}
            except ClientError as e:
                if not _not_found(e):
                    raise
        r = self.client.list_objects_v2(Bucket=bucket, Prefix=key + "/" if key else "", MaxKeys=1)
        if r.get("KeyCount", 0) or not key:
            return {"name": f"{bucket}/{key}".rstrip("/"), "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def find(self, path: str, maxdepth=None, withdirs=False, detail=False, **kwargs):
        bucket, key = self._split(path)
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                            Prefix=key + "/" if key else ""):
            names.extend(f"{bucket}/{o['Key']}" for o in page.get("Contents", []))
        return {n: {"name": n, "type": "file"} for n in names} if detail else names

    # --- changing it ------------------------------------------------------------------------------
    def mkdir(self, path: str, create_parents: bool = True, **kwargs) -> None:
        pass  # S3 has no directories

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass

    def rm_file(self, path: str) -> None:
        bucket, key = self._split(path)
        self.client.delete_object(Bucket=bucket, Key=key)

    def rm(self, path, recursive: bool = False, maxdepth=None) -> None:
        for p in [path] if isinstance(path, str) else path:
            bucket, key = self._split(p)
            keys = [key] if key else []
            if recursive:
                keys += [self._split(n)[1] for n in self.find(p)]
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                                  "Quiet": True})

    def cp_file(self, path1: str, path2: str, **kwargs) -> None:
        b1, k1 = self._split(path1)
        b2, k2 = self._split(path2)
        self.client.copy({"Bucket": b1, "Key": k1}, b2, k2)

    def put_file(self, lpath: str, rpath: str, **kwargs) -> None:
        bucket, key = self._split(rpath)
        self.client.upload_file(str(lpath), bucket, key)

    def mv(self, path1: str, path2: str, recursive: bool = False, maxdepth=None, **kwargs) -> None:
        """One object (what DCP renames: its .metadata); S3 has no rename, so copy then delete."""
        self.cp_file(path1, path2)
        self.rm_file(path1)

    rename = mv

    def _open(self, path: str, mode: str = "rb", block_size=None, autocommit=True, cache_options=None,
              **kwargs):
        bucket, key = self._split(path)
        if "w" in mode:
            return _WriteFile(self, bucket, key)
        if "r" in mode:
            size = self.info(path)["size"]
            return io.BufferedReader(_RangeReader(self.client, bucket, key, size), buffer_size=_READ_BUFFER)
        raise ValueError(f"mode {mode!r} is not supported for S3 objects")


def url_filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """(fsspec file system, path within it) for a checkpoint URL."""
    if url.startswith("s3://"):
        fs = S3FileSystem()
        return fs, fs._strip_protocol(url).rstrip("/")
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    return fs, path.rstrip("/")


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def dcp_writer(fs: AbstractFileSystem, path: str):
    """A DCP StorageWriter into `path` of `fs` (torch's fsspec writer, handed this file system)."""
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    class Writer(FileSystemWriter):
        def reset(self, checkpoint_id=None) -> None:
            super().reset(None)  # the path is fixed: it is not a local Path

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return False

    w = Writer(path, sync_files=False)  # durability is the upload's: nothing to fsync
    w.fs = FileSystem()
    w.fs.fs = fs
    w.path = path
    return w


def dcp_reader(fs: AbstractFileSystem, path: str):
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class Reader(FileSystemReader):
        def reset(self, checkpoint_id=None) -> None:
            super().reset(None)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return False

    r = Reader(path)
    r.fs = FileSystem()
    r.fs.fs = fs
    r.path = path
    return r


__all__ = ["S3FileSystem", "dcp_reader", "dcp_writer", "is_url", "join", "url_filesystem"]
