"""The `esmail` command as an operator runs it: real processes, exit codes, what they print."""

import os
import subprocess
import sys
from email.message import EmailMessage

import pytest

from conftest import FAKE_AWS, SEED, bucket_contents, config_toml
from sheets import xlsx


def esmail(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "esmail", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **FAKE_AWS, **(env or {})}, timeout=120)


def eml(tmp_path, to="sheffield@datafeeds.example.org", name="feed.eml"):
    msg = EmailMessage()
    msg["To"] = to
    msg.set_content("export attached")
    msg.add_attachment(b"a,b\r\n1,2\r\n", maintype="text", subtype="csv", filename="export.csv")
    msg.add_attachment(b"\x89PNG", maintype="image", subtype="png", filename="logo.png")
    path = tmp_path / name
    path.write_bytes(bytes(msg))
    return path


async def test_ingest_prints_each_object_and_stores_it(tmp_path, config, store):
    toml = tmp_path / "esmail.toml"
    toml.write_text(config_toml(config))
    result = esmail("ingest", "--config", toml, eml(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [(b, k.split("/", 2)[2], int(n)) for b, k, n in lines[1:]] == [
        (config.buckets.amr_data, "export.csv", 8), (config.buckets.unprocessable, "logo.png", 4)]
    assert lines[0][0] == config.buckets.inbox and lines[0][1].endswith(".eml")
    amr = await bucket_contents(store, config.buckets.amr_data)
    assert list(amr.values()) == [b"a,b\n1,2\n"] and list(amr)[0].startswith("sheffield/")


def test_ingest_with_recipient_and_without_usable_one(tmp_path):
    data = tmp_path / "data"
    toml = tmp_path / "c.toml"
    toml.write_text(f'[storage]\npath = "{data}"\n[spool]\npath = "{tmp_path / "spool"}"\n')
    ok = esmail("ingest", "--config", toml, "--recipient", "Leeds@x.org", eml(tmp_path))
    assert ok.returncode == 0 and "\tleeds/" in ok.stdout
    bad = esmail("ingest", "--config", toml, eml(tmp_path, to="not..valid@x.org", name="bad.eml"))
    assert bad.returncode == 1 and "no usable recipient" in bad.stderr
    assert any(p.name.endswith(".eml") for p in (data / "es-development-data-unprocessable" / "unknown").rglob("*"))
    missing = esmail("ingest", "--config", toml, tmp_path / "nope.eml")
    assert missing.returncode == 1 and "nope.eml" in missing.stderr
    usage = esmail("ingest", "--config", toml, "--recipient", "a..b@x", eml(tmp_path))
    assert usage.returncode == 2 and "--recipient" in usage.stderr


def test_ingest_the_readme_example_on_the_embedded_default(tmp_path):
    """The quick start's first command, in a fresh folder: no config at all."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "sheffield.eml")
    result = esmail("ingest", example, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    amr = tmp_path / "esmail-data" / "es-development-data-amr-data"
    assert sorted(p.relative_to(amr).as_posix().split("/", 2)[2] for p in amr.rglob("*.csv")) == ["export.csv", "readings/march.csv"]


def test_convert_writes_csvs_and_fails_on_unconvertible(tmp_path):
    (tmp_path / "in.xlsx").write_bytes(xlsx({"A1": "x", "B1": 2.0}))
    (tmp_path / "in.png").write_bytes(b"\x89PNG")
    ok = esmail("convert", tmp_path / "in.xlsx", "--out", tmp_path / "out")
    assert ok.returncode == 0 and (tmp_path / "out" / "in.xlsx.csv").read_bytes() == b'"x",2\n'
    bad = esmail("convert", tmp_path / "in.png", "--out", tmp_path / "out")
    assert bad.returncode == 1 and "in.png cannot be converted" in bad.stderr


@pytest.mark.parametrize("text, message", [
    ("[smtp]\nlisen = 1\n", "unknown key [smtp] lisen"),
    ('[smtp]\nmax_message_size = "forty"\n', "[smtp] max_message_size must be a size"),
    ("[storage]\nbackend = 'ftp'\n", "[storage] backend must be"),
    ("stage = 3\n", "'stage' must be"),
    ("[csv]\nascii_only = 'yes'\n", "[csv] ascii_only must be true or false"),
    ("not toml [", "not valid TOML"),
])
def test_config_errors_exit_2_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = esmail("check-config", "--config", path)
    assert result.returncode == 2 and message in result.stderr and str(path) in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = esmail("check-config", env={"ESMAIL_CONFIG": str(tmp_path / "absent.toml")})
    assert result.returncode == 2 and "absent.toml: config file not found" in result.stderr


def test_check_config_masks_secrets_and_checks_buckets(tmp_path):
    (tmp_path / ".env.development").write_text("ROLLBAR_ACCESS_TOKEN=d00dfeedd00dfeedd00dfeedd00dfeed\n")
    result = esmail("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "d00dfeedd00dfeedd00dfeedd00dfeed" not in result.stdout and "ROLLBAR_ACCESS_TOKEN: set (****)" in result.stdout
    assert result.stdout.count("is writable") == 4  # the spool and the three buckets
    assert "ok      spool: esmail-spool is writable, 0 queued, 0 failed" in result.stdout


def test_check_config_reports_an_unreachable_bucket(tmp_path, moto_url):
    toml = tmp_path / "c.toml"
    toml.write_text(f'[storage]\nbackend = "s3"\nendpoint_url = "{moto_url}"\nregion = "eu-west-2"\n[buckets]\ninbox = "no-such-bucket-here"\n')
    result = esmail("check-config", "--config", toml)
    assert result.returncode == 1 and "FAILED  inbox: no-such-bucket-here" in result.stdout


@pytest.mark.skipif(not SEED.is_dir(), reason="../shared/seed-samples is absent (it sits beside the checkout in CI)")
def test_seed_emails_through_ingest(tmp_path):
    """The old pipeline's real emails: the zip's CSV lands as the old pipeline normalised it."""
    toml = tmp_path / "c.toml"
    toml.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n[spool]\npath = "{tmp_path / "spool"}"\n')
    result = esmail("ingest", "--config", toml, SEED / "files" / "sheffield_email.txt", SEED / "files" / "sheffield-fwd.txt")
    assert result.returncode == 0, result.stderr
    amr = tmp_path / "data" / "es-development-data-amr-data" / "sheffield"
    [first] = amr.glob("*/4003063_9232_Export_20181108_120524_290.csv")
    assert first.read_bytes() == (SEED / "expected" / "sheffield_export.zip.4003063_9232_Export_20181108_120524_290.csv.normalised.csv").read_bytes()
    assert len(list(amr.glob("*/*.csv"))) == 2


def test_ingest_refuses_a_message_over_max_message_size(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n[spool]\npath = "{tmp_path / "spool"}"\n[smtp]\nmax_message_size = "1KB"\n')
    big = tmp_path / "big.eml"
    big.write_bytes(b"To: a@b\r\n\r\n" + b"x" * 2000)
    result = esmail("ingest", "--config", toml, big)
    assert result.returncode == 1 and "over [smtp] max_message_size (1,000)" in result.stderr
    assert not (tmp_path / "data").exists()


def test_ingest_keeps_the_message_in_the_spool_when_storage_fails(tmp_path, moto_url):
    """A bucket that cannot be written is a temporary failure: exit 1, and the spool entry stays for a retry."""
    toml = tmp_path / "c.toml"
    toml.write_text(f'[storage]\nbackend = "s3"\nendpoint_url = "{moto_url}"\nregion = "eu-west-2"\n'
                    f'[buckets]\ninbox = "missing-inbox-bucket"\n[spool]\npath = "{tmp_path / "spool"}"\n')
    message = eml(tmp_path)
    result = esmail("ingest", "--config", toml, message)
    assert result.returncode == 1 and "it stays in the spool as" in result.stderr and "NoSuchBucket" in result.stderr
    [entry] = (tmp_path / "spool" / "queue").iterdir()
    assert entry.read_bytes().endswith(message.read_bytes())
