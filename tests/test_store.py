"""The store contract on both backends: write once, replay is a no-op, a clash takes the next name."""

import boto3

from conftest import REGION


async def test_put_and_get(config, store):
    bucket = config.buckets.amr_data
    assert await store.put(bucket, "p/20250323-101112/export.csv", b"a\n", "text/csv; charset=utf-8") == "p/20250323-101112/export.csv"
    assert await store.get(bucket, "p/20250323-101112/export.csv") == b"a\n"
    assert await store.get(bucket, "p/missing.csv") is None


async def test_replay_with_same_bytes_writes_nothing_new(config, store):
    bucket = config.buckets.amr_data
    for _ in range(2):
        assert await store.put(bucket, "p/f/export.csv", b"same\n", "text/csv") == "p/f/export.csv"
    assert await store.keys(bucket) == ["p/f/export.csv"]


async def test_other_bytes_never_overwrite(config, store):
    """A second writer with different bytes gets `-2`, then `-3`, before the first extension."""
    bucket = config.buckets.amr_data
    keys = [await store.put(bucket, "p/f/export.xlsx.csv", data, "text/csv") for data in (b"1\n", b"2\n", b"3\n", b"2\n")]
    assert keys == ["p/f/export.xlsx.csv", "p/f/export-2.xlsx.csv", "p/f/export-3.xlsx.csv", "p/f/export-2.xlsx.csv"]
    assert [await store.get(bucket, k) for k in keys[:3]] == [b"1\n", b"2\n", b"3\n"]


async def test_check_passes_on_a_writable_bucket_and_leaves_nothing(config, store):
    await store.check(config.buckets.inbox)
    assert await store.keys(config.buckets.inbox) == []


async def test_content_type_on_s3(moto_url, config, store):
    if config.storage.backend != "s3":
        return
    await store.put(config.buckets.amr_data, "k.csv", b"a\n", "text/csv; charset=utf-8")
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name=REGION, aws_access_key_id="t", aws_secret_access_key="t")
    assert s3.head_object(Bucket=config.buckets.amr_data, Key="k.csv")["ContentType"] == "text/csv; charset=utf-8"


async def test_local_writes_leave_no_temporary_files(tmp_path):
    from esmail.store.local import TMP_DIR, LocalStore

    store = LocalStore(tmp_path)
    await store.put("b", "x/y.csv", b"1", "text/csv")
    await store.put("b", "x/y.csv", b"2", "text/csv")
    assert list((tmp_path / TMP_DIR).iterdir()) == []
    assert sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*.csv")) == ["x/y-2.csv", "x/y.csv"]
