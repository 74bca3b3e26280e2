"""The store contract on both backends: write once, replay is a no-op, a clash takes the next name."""

import boto3
import pytest

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


async def test_local_reads_never_follow_a_link_under_a_bucket(tmp_path):
    """A file link, a folder link and a link on the way to a file read as no object; a real file beside them reads; so does nothing odd."""
    from esmail.store.local import LocalStore

    outside = tmp_path / "outside"
    (outside / "sheffield").mkdir(parents=True)
    (outside / "secret.txt").write_text("not for the page")
    (outside / "sheffield" / "export.csv").write_text("not for the page either")
    store = LocalStore(tmp_path / "data")
    await store.put("b", "sheffield/real.csv", b"real\n", "text/csv")
    folder = tmp_path / "data" / "b"
    (folder / "sheffield" / "planted.csv").symlink_to(outside / "secret.txt")
    (folder / "everything").symlink_to("/")
    (folder / "elsewhere").symlink_to(outside)
    assert (folder / "everything" / "etc" / "hostname").read_bytes()  # the links do lead somewhere
    for key in ("sheffield/planted.csv", "everything/etc/hostname", "elsewhere/secret.txt", "elsewhere/sheffield/export.csv",
                "sheffield", "sheffield/real.csv/more", "../outside/secret.txt", "sheffield/../sheffield/real.csv"):
        assert await store.get("b", key) is None, key
    assert await store.get("b", "sheffield/real.csv") == b"real\n"
    assert await store.keys("b") == ["sheffield/real.csv"]


async def test_local_writes_never_follow_a_link_under_a_bucket(tmp_path):
    """A folder link on a key's way: the write fails (TemporaryFailure naming the link) and nothing lands outside;
    a file link at the key itself: the object takes the next name and the link's target keeps its bytes."""
    from esmail.errors import TemporaryFailure
    from esmail.store.local import LocalStore

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "export.csv").write_bytes(b"theirs\n")
    store = LocalStore(tmp_path / "data")
    await store.check("b")
    folder = tmp_path / "data" / "b"
    (folder / "sheffield").symlink_to(outside)
    with pytest.raises(TemporaryFailure, match="symbolic link"):
        await store.put("b", "sheffield/20250323-101112/export.csv", b"ours\n", "text/csv")
    with pytest.raises(TemporaryFailure, match="symbolic link"):
        await store.put("b", "sheffield/export.csv", b"ours\n", "text/csv")
    assert sorted(p.name for p in outside.iterdir()) == ["export.csv"]
    (folder / "leeds").mkdir()
    (folder / "leeds" / "export.csv").symlink_to(outside / "export.csv")
    assert await store.put("b", "leeds/export.csv", b"ours\n", "text/csv") == "leeds/export-2.csv"
    assert (outside / "export.csv").read_bytes() == b"theirs\n"
    assert (folder / "leeds" / "export-2.csv").read_bytes() == b"ours\n"
