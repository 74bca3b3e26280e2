"""The embedded default backend: buckets are folders, `{path}/{bucket}/{key}`.

Each object is written to a temporary file, fsync'd, then hard-linked into
place: `link` fails if the key exists, which gives the same never-overwrite
rule as S3's `If-None-Match: *`, and a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from esmail.durable import fsync_dir, write_synced
from esmail.errors import TemporaryFailure
from esmail.store.base import Store

TMP_DIR = ".esmail-tmp"


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / key

    async def _create(self, bucket: str, key: str, data: bytes, content_type: str) -> bool:
        return await asyncio.to_thread(self._create_sync, bucket, key, data)

    def _create_sync(self, bucket: str, key: str, data: bytes) -> bool:
        target = self._path(bucket, key)
        tmp_dir = self.root / TMP_DIR
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_dir / uuid.uuid4().hex
            write_synced(tmp, data)
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
            fsync_dir(target.parent)
            return True
        except OSError as exc:
            raise TemporaryFailure(f"cannot write {target}: {exc.strerror or exc}") from exc

    async def get(self, bucket: str, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(bucket, key).read_bytes)
        except FileNotFoundError:
            return None

    async def keys(self, bucket: str, prefix: str = "") -> list[str]:
        base = self.root / bucket
        if not base.is_dir():
            return []
        found = (p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in found if k.startswith(prefix))

    async def check(self, bucket: str) -> None:
        probe = f".esmail-check/{uuid.uuid4().hex}"
        await self._create(bucket, probe, b"check", "text/plain")
        path = self._path(bucket, probe)
        path.unlink()
        path.parent.rmdir()

    def describe(self, bucket: str, key: str) -> str:
        return str(self._path(bucket, key))
