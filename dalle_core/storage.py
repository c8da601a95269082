"""Where every stage's files live: a local directory or an S3 prefix.

Keys are '/'-separated relative paths ("shards/shard-00000.tar"). Assets never
write to hard-coded paths; they go through a `Storage`. The S3 implementation
takes any endpoint URL (AWS, MinIO, moto's server) and retries throttling and
dropped connections through botocore's own retry modes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from dalle_core.io import atomic_copy_file, atomic_write_bytes


class StorageError(RuntimeError):
    pass


class Storage:
    """Interface shared by the local and S3 backends."""

    def uri(self, key: str) -> str:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix`, sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def put_file(self, key: str, local_path: str | Path) -> None:
        self.put_bytes(key, Path(local_path).read_bytes())

    def get_file(self, key: str, local_path: str | Path) -> Path:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        local_path.write_bytes(self.get_bytes(key))
        return local_path

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A local file with the object's bytes, for readers that need a path."""
        with tempfile.TemporaryDirectory(prefix="dalle-storage-") as tmp:
            yield self.get_file(key, Path(tmp) / Path(key).name)


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents and p != self.root:
            raise StorageError(f"key {key!r} escapes the storage root {self.root}")
        return p

    def uri(self, key: str) -> str:
        return str(self.path(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        # write then rename: a reader (or a resumed run) never sees half a file
        atomic_write_bytes(self.path(key), data)

    def put_file(self, key: str, local_path: str | Path) -> None:
        atomic_copy_file(local_path, self.path(key))

    def get_bytes(self, key: str) -> bytes:
        p = self.path(key)
        if not p.is_file():
            raise FileNotFoundError(f"no object {key!r} in {self.root}")
        return p.read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        ]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        if not self.exists(key):
            raise FileNotFoundError(f"no object {key!r} in {self.root}")
        yield self.path(key)


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        max_attempts: int = 8,
    ):
        import boto3
        from botocore.config import Config

        if len(bucket) < 3:
            raise StorageError(f"S3 bucket name {bucket!r} is too short (at least 3 characters)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # 'standard' retry mode retries throttling (SlowDown, 503) and connection
        # errors with exponential back-off; credentials come from the environment.
        config = Config(retries={"max_attempts": max_attempts, "mode": "standard"})
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or os.environ.get("DALLE_S3_ENDPOINT_URL") or None,
            region_name=region_name or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=config,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, local_path: str | Path) -> None:
        self.client.upload_file(str(local_path), self.bucket, self._key(key))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"no object {key!r} in {self.uri('')}") from None

    def get_file(self, key: str, local_path: str | Path) -> Path:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.exists(key):
            raise FileNotFoundError(f"no object {key!r} in {self.uri('')}")
        self.client.download_file(self.bucket, self._key(key), str(local_path))
        return local_path

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        ):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def open_storage(uri: str, endpoint_url: str | None = None) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else is a local directory."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        return S3Storage(bucket, prefix, endpoint_url=endpoint_url)
    return LocalStorage(uri)
