"""Several hosts on one S3 (DESIGN §15): two `esmail serve` daemons, each with its own spool, writing to the same buckets."""

from __future__ import annotations

import threading
from dataclasses import replace

import boto3
import pytest

from conftest import FAKE_AWS, REGION, Server, eventually
from esmail.config import SpoolConfig
from test_receivers import send_all

pytestmark = pytest.mark.parametrize("config", ["s3"], indirect=True)


def bucket(config, moto_url: str, name: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name=REGION, **{k.lower(): v for k, v in FAKE_AWS.items()})
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            found[item["Key"]] = s3.get_object(Bucket=name, Key=item["Key"])["Body"].read()
    return found


async def test_two_hosts_same_prefix_same_second_same_names_and_a_kill_9(config, moto_url, tmp_path):
    """Both hosts take mail for sheffield at once, every message with an export.csv of its own; host A is killed -9
    with a backlog and started again. Every accepted message's CSV is stored exactly once, and none overwrote another."""
    hosts = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        host_config = replace(config, spool=SpoolConfig(path=tmp_path / name / "spool", min_free=0))
        hosts.append(Server(host_config, tmp_path / name, smtp='domains = ["datafeeds.example.org"]'))
    for host in hosts:
        host.start()
    a, b = hosts
    accepted: dict[str, dict[int, str]] = {}
    threads = [threading.Thread(target=lambda h=h, key=key, numbers=numbers: accepted.__setitem__(key, send_all(h.port, numbers, sessions=8)))
               for h, key, numbers in ((a, "a", list(range(0, 300, 2))), (b, "b", list(range(1, 300, 2))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    a.kill()  # its worker is behind the receiver: what it accepted but did not store yet waits in its spool
    backlog = len(list((tmp_path / "a" / "spool" / "queue").glob("*.msg")))
    assert backlog > 0, "host a stored everything before the kill: no backlog to replay"
    a.start()
    taken = {**accepted["a"], **accepted["b"]}
    assert len(taken) == 300

    def csvs():
        return bucket(config, moto_url, config.buckets.amr_data)

    assert await eventually(lambda: len(csvs()) >= 300, timeout=120)
    for host in hosts:
        assert await eventually(lambda host=host: not list((host.toml.parent / "spool" / "queue").glob("*.msg")), timeout=60)
        assert host.terminate() == 0
    stored = csvs()
    expected = sorted(f"MPAN,00:30\n2200013680374,{n}.5\n".encode() for n in taken)
    assert sorted(stored.values()) == expected  # each once: nothing lost, nothing twice, nothing overwritten
    assert all(key.startswith("sheffield/") and key.rsplit("/", 1)[1].startswith("export") for key in stored)
    inbox = bucket(config, moto_url, config.buckets.inbox)
    assert sorted(key.rsplit("/", 1)[1][:-4] for key in inbox) == sorted(taken.values())
    folders = [key.split("/")[1] for key in stored]
    assert len(set(folders)) < len(folders)  # hosts (and seconds) shared folders: the names took -2, -3, …
