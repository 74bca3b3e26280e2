"""Where objects go: one small async interface (`base.Store`), two backends side by side."""

from __future__ import annotations

from esmail.config import Config
from esmail.store.base import Store


def open_store(config: Config) -> Store:
    """The backend the configuration names; call `await store.close()` when done."""
    if config.storage.backend == "s3":
        from esmail.store.s3 import S3Store

        return S3Store(config.storage, config.secrets)
    from esmail.store.local import LocalStore

    return LocalStore(config.storage.path)


__all__ = ["Store", "open_store"]
