"""Shared fixtures: a real S3 API (moto's server mode over HTTP) and configs that point at it."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from esmail.config import Buckets, Config, SpoolConfig, StorageConfig
from esmail.store import open_store

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-samples"  # ../shared beside the checkout

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "eu-west-2"


@pytest.fixture(scope="session")
def moto_url():
    """A moto S3 server on a free loopback port, for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_buckets(url: str, buckets: Buckets) -> None:
    s3 = boto3.client("s3", endpoint_url=url, region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
    for name in vars(buckets).values():
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})


_counter = iter(range(1_000_000))


@pytest.fixture(params=["local", "s3"])
def config(request, tmp_path) -> Config:
    """A config for each backend, with buckets of its own (fresh names per test on S3)."""
    n = next(_counter)
    buckets = Buckets(inbox=f"t{n}-inbox", amr_data=f"t{n}-amr-data", unprocessable=f"t{n}-unprocessable")
    spool = SpoolConfig(path=tmp_path / "spool")
    if request.param == "local":
        return Config(storage=StorageConfig(path=tmp_path / "data"), buckets=buckets, spool=spool)
    url = request.getfixturevalue("moto_url")
    make_buckets(url, buckets)
    storage = StorageConfig(backend="s3", endpoint_url=url, region=REGION)
    return Config(storage=storage, buckets=buckets, spool=spool, secrets=dict(FAKE_AWS))


@pytest.fixture
async def store(config):
    store = open_store(config)
    yield store
    await store.close()


async def bucket_contents(store, bucket: str) -> dict[str, bytes]:
    """Every object in a bucket: key → bytes."""
    return {key: await store.get(bucket, key) for key in await store.keys(bucket)}


def config_toml(config: Config) -> str:
    """The same config as a TOML file, for tests that run the CLI in a subprocess."""
    lines = [
        "[storage]",
        f'backend = "{config.storage.backend}"',
        f'path = "{config.storage.path}"',
    ]
    if config.storage.endpoint_url:
        lines += [f'endpoint_url = "{config.storage.endpoint_url}"', f'region = "{config.storage.region}"']
    lines += ["[buckets]"] + [f'{k} = "{v}"' for k, v in vars(config.buckets).items()]
    lines += ["[spool]", f'path = "{config.spool.path}"']
    return "\n".join(lines) + "\n"
