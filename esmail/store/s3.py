"""The S3 backend (aioboto3): any endpoint, credentials from the config's secrets or the AWS chain.

Objects are written with `If-None-Match: *`, so S3 itself refuses to
overwrite (412); `Store.put` turns that into "already done" or "next name".
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import aioboto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from esmail.config import StorageConfig
from esmail.errors import TemporaryFailure
from esmail.store.base import Store

_CONFLICT = {"PreconditionFailed", "412"}
_RETRY_CONFLICT = {"ConditionalRequestConflict", "409"}


class S3Store(Store):
    def __init__(self, storage: StorageConfig, secrets: Mapping[str, str]):
        self.storage = storage
        self.session = aioboto3.Session(
            aws_access_key_id=secrets.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=secrets.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=secrets.get("AWS_SESSION_TOKEN"),
            region_name=storage.region,
        )
        self._stack = contextlib.AsyncExitStack()
        self._client = None

    async def _s3(self):
        if self._client is None:
            # No retries of botocore's own: the worker retries, and one probe at a time while the store is down (esmail.outage)
            boto_config = BotoConfig(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60)
            self._client = await self._stack.enter_async_context(
                self.session.client("s3", endpoint_url=self.storage.endpoint_url, config=boto_config)
            )
        return self._client

    async def _create(self, bucket: str, key: str, data: bytes, content_type: str) -> bool:
        s3 = await self._s3()
        for _ in range(3):
            try:
                await s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = _code(exc)
                if code in _CONFLICT:
                    return False
                if code not in _RETRY_CONFLICT:
                    raise TemporaryFailure(f"s3://{bucket}/{key}: {code}: {exc}") from exc
            except BotoCoreError as exc:
                raise TemporaryFailure(f"s3://{bucket}/{key}: {exc}") from exc
        raise TemporaryFailure(f"s3://{bucket}/{key}: concurrent writes kept conflicting")

    async def get(self, bucket: str, key: str) -> bytes | None:
        s3 = await self._s3()
        try:
            response = await s3.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise TemporaryFailure(f"s3://{bucket}/{key}: {_code(exc)}: {exc}") from exc
        except BotoCoreError as exc:
            raise TemporaryFailure(f"s3://{bucket}/{key}: {exc}") from exc

    async def keys(self, bucket: str, prefix: str = "") -> list[str]:
        s3 = await self._s3()
        found = []
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(found)

    async def check(self, bucket: str) -> None:
        s3 = await self._s3()
        probe = ".esmail-check/probe"
        try:
            await s3.put_object(Bucket=bucket, Key=probe, Body=b"check")
            await s3.delete_object(Bucket=bucket, Key=probe)
        except (ClientError, BotoCoreError) as exc:
            raise TemporaryFailure(f"s3://{bucket}: {exc}") from exc

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    def describe(self, bucket: str, key: str) -> str:
        return f"s3://{bucket}/{key}"


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
