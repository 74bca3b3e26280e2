"""The store interface, and the rule every backend shares: an object is written once, never overwritten.

A backend only has to create an object if its key is free (`_create`) and
read one back (`get`). `put` builds the rest on that: when the key is taken by
the same bytes the write was already done (a replay after a crash); when it
is taken by other bytes, the object takes the next free `-2`, `-3`, … name
(DESIGN §3), so two writers never overwrite each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from esmail.keys import with_suffix

MAX_SUFFIX = 1000


class Placed(str):
    """The key that holds an object; `new` is False when the same bytes were there already (a replay, a retry)."""

    new: bool

    def __new__(cls, key: str, new: bool) -> "Placed":
        placed = super().__new__(cls, key)
        placed.new = new
        return placed


class Store(ABC):
    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> Placed:
        """Store `data` at `key` or its first free variant; return the key that holds it."""
        for n in range(1, MAX_SUFFIX + 1):
            candidate = with_suffix(key, n)
            if await self._create(bucket, candidate, data, content_type):
                return Placed(candidate, True)
            if await self.get(bucket, candidate) == data:
                return Placed(candidate, False)
        raise RuntimeError(f"{bucket}/{key}: {MAX_SUFFIX} variants of this key are taken")

    @abstractmethod
    async def _create(self, bucket: str, key: str, data: bytes, content_type: str) -> bool:
        """Write the object if `key` is free and return True; return False if it exists."""

    @abstractmethod
    async def get(self, bucket: str, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""

    @abstractmethod
    async def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in the bucket under `prefix`, sorted."""

    @abstractmethod
    async def check(self, bucket: str) -> None:
        """Raise if the bucket cannot be reached or written."""

    async def close(self) -> None:
        """Release connections."""

    def describe(self, bucket: str, key: str) -> str:
        """Where an object is, in the words an operator would use to find it."""
        return f"{bucket}/{key}"
