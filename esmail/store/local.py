"""The embedded default backend: buckets are folders, `{path}/{bucket}/{key}`.

Each object is written to a temporary file, flushed to disk, then
hard-linked into place, and the link flushed: `link` fails if the key
exists, which gives the same never-overwrite rule as S3's `If-None-Match: *`,
and a reader never sees half a file. The objects that concurrent entries
write meanwhile share those two flushes (`create_all`, a group commit).

Under a bucket's folder no symbolic link is ever followed, to read or to
write: each folder of a key is opened with O_NOFOLLOW relative to the one
before it (dir_fd), and the file itself too. A link planted there (to
/etc/shadow, or a folder link to /) is "no such object" to a reader, and a
writer refuses it, so the page serves only what esmail stored and esmail
writes only inside its folders. The folders above (`path`, a bucket's own
folder) are the operator's and may be links.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import uuid
from pathlib import Path

from esmail.durable import sync_files, write_unsynced
from esmail.errors import NeedsFixing, TemporaryFailure
from esmail.group_commit import Batches
from esmail.store.base import Store

TMP_DIR = ".esmail-tmp"
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)  # missing, a file where a folder should be, a link, a name too long


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = Path(root)
        self._batches: Batches[tuple[str, str, bytes], bool] = Batches(self.create_all)

    def _path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / key

    async def _create(self, bucket: str, key: str, data: bytes, content_type: str) -> bool:
        return await self._batches.submit((bucket, key, data))

    def create_all(self, objects: list[tuple[str, str, bytes]]) -> list[bool | Exception]:
        """Create each (bucket, key, data) whose key is free: True, or False when the key is taken, or the failure.

        Two flushes for the whole batch, not two per object: every temporary
        file is on disk before any is linked (a crash never leaves a key
        naming an empty file), and every link before this returns.
        """
        tmp_dir = self.root / TMP_DIR
        results: list[bool | Exception] = []
        written: dict[int, Path] = {}  # index → its temporary file
        for index, (bucket, key, data) in enumerate(objects):
            tmp = tmp_dir / uuid.uuid4().hex
            try:
                tmp_dir.mkdir(parents=True, exist_ok=True)
                (self.root / bucket).mkdir(parents=True, exist_ok=True)
                write_unsynced(tmp, data, mode=0o666)  # the umask decides who may read it (an importer in the group)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                results.append(self._failure(bucket, key, exc))
                continue
            written[index] = tmp
            results.append(True)
        linked: set[Path] = set()  # the folders that got a link
        try:
            sync_files(self.root, list(written.values()))
            for index, tmp in written.items():
                bucket, key, _ = objects[index]
                try:
                    *folders, name = _segments(key)
                    folder = self._open_folder(bucket, folders, create=True)
                    try:
                        os.link(tmp, name, dst_dir_fd=folder)
                    finally:
                        os.close(folder)
                    linked.add(self._path(bucket, key).parent)
                except FileExistsError:
                    results[index] = False
                except ValueError as exc:  # not a key
                    results[index] = exc
                except OSError as exc:
                    results[index] = self._failure(bucket, key, exc)
            sync_files(self.root, sorted(linked))
        except OSError as exc:  # a flush failed: none of the batch is sure to be on disk
            for index in written:
                results[index] = self._failure(*objects[index][:2], exc)
        finally:
            for tmp in written.values():
                tmp.unlink(missing_ok=True)
        return results

    def _failure(self, bucket: str, key: str, exc: OSError) -> TemporaryFailure:
        target = self._path(bucket, key)
        if isinstance(exc, PermissionError):
            from esmail.spool import user_name

            user = user_name()
            failure = NeedsFixing(f"cannot write {target}: {exc.strerror} (esmail runs as {user}; folders made by "
                                  f"another user, e.g. by a command run as root, need: chown -R {user}: {self.root})")
        elif exc.errno in (errno.ELOOP, errno.ENOTDIR):
            failure = TemporaryFailure(f"cannot write {target}: a folder on its way is a symbolic link or a file "
                                       f"(esmail never follows links in a bucket); remove it")
        else:
            failure = TemporaryFailure(f"cannot write {target}: {exc.strerror or exc}")
        failure.__cause__ = exc
        return failure

    async def get(self, bucket: str, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, bucket, key)

    def _read(self, bucket: str, key: str) -> bytes | None:
        """The bytes of a regular file at `key`, reached without a link; None for anything else (missing, a link, a folder, a pipe)."""
        try:
            *folders, name = _segments(key)
            folder = self._open_folder(bucket, folders)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
            finally:
                os.close(folder)
        except ValueError:
            return None
        except OSError as exc:
            if exc.errno in _NOT_THERE:
                return None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        with open(fd, "rb") as f:
            return f.read()

    def _open_folder(self, bucket: str, folders: list[str], create: bool = False) -> int:
        """A descriptor of the bucket's folder `folders`, each step opened with O_NOFOLLOW (made first when `create`)."""
        fd = os.open(self.root / bucket, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for folder in folders:
                if create:
                    try:
                        os.mkdir(folder, dir_fd=fd)
                    except FileExistsError:
                        pass
                inner = os.open(folder, _FOLDER, dir_fd=fd)
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def keys(self, bucket: str, prefix: str = "") -> list[str]:
        base = self.root / bucket
        found = []
        for folder, _, names in os.walk(base):  # os.walk does not go into folder links
            for name in names:
                path = Path(folder, name)
                if path.is_file() and not path.is_symlink():
                    found.append(path.relative_to(base).as_posix())
        return sorted(k for k in found if k.startswith(prefix))

    async def check(self, bucket: str) -> None:
        probe = f".esmail-check/{uuid.uuid4().hex}"
        await self._create(bucket, probe, b"check", "text/plain")
        path = self._path(bucket, probe)
        path.unlink()
        path.parent.rmdir()

    def describe(self, bucket: str, key: str) -> str:
        return str(self._path(bucket, key))


def _segments(key: str) -> list[str]:
    """The key's folders and file name; ValueError for a key that could leave its folder (``, `.`, `..`)."""
    segments = key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise ValueError(f"not a key: {key!r}")
    return segments
