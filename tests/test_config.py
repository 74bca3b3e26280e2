"""Configuration: defaults, sizes, stage-named buckets, secrets from .env.{stage}."""

from pathlib import Path

import pytest

from esmail import config as config_module
from esmail.config import parse_size
from esmail.errors import ConfigError


@pytest.mark.parametrize("text, size", [("40MB", 40_000_000), ("40MiB", 40 * 2**20), ("500 KB", 500_000), (1024, 1024), ("1.5GB", 1_500_000_000)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["forty", "40XB", True, -1.0, ""])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_module.load(None, environ={})
    assert (cfg.stage, cfg.buckets.amr_data, str(cfg.storage.path), cfg.smtp.max_message_size) == (
        "development", "es-development-data-amr-data", "esmail-data", 40_000_000)


def test_stage_names_buckets_and_env_file_gives_secrets(tmp_path):
    path = tmp_path / "esmail.toml"
    path.write_text('stage = "production"\n[smtp]\ndomains = ["DataFeeds.Example.org"]\n')
    (tmp_path / ".env.production").write_text("AWS_ACCESS_KEY_ID=from-file\nROLLBAR_ACCESS_TOKEN=d00dfeedd00dfeedd00dfeedd00dfeed\n")
    cfg = config_module.load(path, environ={"AWS_ACCESS_KEY_ID": "from-env"})
    assert cfg.buckets.inbox == "es-production-data-inbox" and cfg.smtp.domains == ("datafeeds.example.org",)
    assert cfg.secrets == {"AWS_ACCESS_KEY_ID": "from-env", "ROLLBAR_ACCESS_TOKEN": "d00dfeedd00dfeedd00dfeedd00dfeed"}
    assert "d00dfeed" not in cfg.describe() and "from-env" not in cfg.describe()


@pytest.mark.parametrize("text, host, port", [("127.0.0.1:2525", "127.0.0.1", 2525), ("[::1]:25", "::1", 25), (":25", "0.0.0.0", 25)])
def test_listen_addresses(tmp_path, text, host, port):
    path = tmp_path / "c.toml"
    path.write_text(f'[smtp]\nlisten = "{text}"\n')
    listen = config_module.load(path, environ={}).smtp.listen
    assert (listen.host, listen.port) == (host, port)


def test_example_config_is_valid_and_documents_every_key():
    from pathlib import Path

    example = Path(__file__).parents[1] / "config.example.toml"
    cfg = config_module.load(example, environ={})
    text = example.read_text()
    for section, keys in config_module._SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"{key} =" in text, f"[{section}] {key} is not in config.example.toml"
    assert "[[imap]]" in text
    for key in config_module._IMAP_SCHEMA:
        assert f"# {key} =" in text, f"[[imap]] {key} is not in config.example.toml"
    assert "# [[feed]]" in text
    for key in config_module._FEED_SCHEMA:
        assert f"# {key} =" in text, f"[[feed]] {key} is not in config.example.toml"
    assert cfg.csv.ascii_only is False


def test_the_example_imap_table_loads_once_uncommented(tmp_path):
    example = (Path(__file__).parents[1] / "config.example.toml").read_text()
    imap = example[example.index("# [[imap]]"):example.index("# Feeds:")]
    toml = tmp_path / "c.toml"
    toml.write_text("\n".join(line[2:] for line in imap.splitlines() if line.startswith("# ")))
    [mailbox] = config_module.load(toml, environ={"IMAP_PASSWORD": "x", "IMAP_CLIENT_SECRET": "y", "IMAP_REFRESH_TOKEN": "z"}).imap
    assert (mailbox.host, mailbox.port, mailbox.tls, mailbox.prefix) == ("outlook.office365.com", 993, "implicit", "sheffield")
    assert mailbox.auth == "password" and mailbox.secret_keys == {"password_env": "IMAP_PASSWORD"}
    with pytest.raises(ConfigError, match=r"\[\[imap\]\] #1 password_env = 'IMAP_PASSWORD': that environment variable is not set"):
        config_module.load(toml, environ={})


def test_the_example_feed_table_loads_once_uncommented(tmp_path):
    example = (Path(__file__).parents[1] / "config.example.toml").read_text()
    table = example[example.index("# [[feed]]"):]
    toml = tmp_path / "c.toml"
    toml.write_text("\n".join(line[2:] for line in table.splitlines() if line.startswith("# ")))
    [feed] = config_module.load(toml, environ={}).feeds
    assert (feed.prefix, feed.senders, feed.authenticated, feed.expected_every) == (
        "sheffield", ("*@sheffield.gov.uk", "exports@npower.example"), True, 86400.0)
    assert feed.on_header_change == "store" and feed.format.date_format == "%d/%m/%Y" and len(feed.format.reading_fields) == 48


@pytest.mark.parametrize("text, message", [
    ('[buckets]\ninbox = "Bad_Name"\n', "[buckets] inbox = 'Bad_Name' is not a valid bucket name"),
    ('[buckets]\ninbox = "same"\namr_data = "same"\n', "three different buckets"),
    ("[worker]\nprocesses = -1\n", "[worker] processes must be a whole number"),
    ("smtp = 1\n", "'smtp' must be a table"),
    ('[smtp]\nlisten = "localhost"\n', "[smtp] listen must be an address and port"),
    ('[smtp]\nlisten = "127.0.0.1:70000"\n', "[smtp] listen must be an address and port"),
    ('[smtp]\ntls_cert = "/etc/cert.pem"\n', "[smtp] tls_cert and tls_key go together"),
    ("[smtp]\nrequire_tls = true\n", "require_tls = true needs tls_cert and tls_key"),
    ("[smtp]\ncommand_timeout = 0\n", "[smtp] command_timeout must be a number of seconds"),
    ("[smtp]\nmax_sessions = 0\n", "[smtp] max_sessions must be at least 1"),
    ('[spool]\nmin_free = "lots"\n', "[spool] min_free must be a size"),
    ("[worker]\nmax_attempts = 0\n", "[worker] max_attempts must be at least 1"),
    ('[[imap]]\nhost = "imap.example.org"\nusername = "u"\npassword_env = "P"\ntls = "none"\n', 'tls = "none" sends the password in clear'),
    ('[[imap]]\nhost = "imap.example.org"\nusername = "u"\n', "[[imap]] #1 needs password_env"),
    ('[[imap]]\nhost = "h"\nusername = "u"\npassword_env = "P"\nprefix = "Bad Prefix"\n', "[[imap]] #1 prefix must be"),
    ('[[imap]]\nhost = "h"\nusername = "u"\npassword_env = "P"\nfolders = "x"\n', "unknown key [[imap]] #1 folders"),
    ('[[imap]]\nhost = "h"\nusername = "u"\nauth = "oauth2"\ntoken_url = "https://t/token"\nclient_id = "c"\nclient_secret = "hunter2"\n',
     "[[imap]] #1 client_secret: secrets never go in the config file; put it in an environment variable (or .env.{stage}) "
     "and name that variable in client_secret_env"),
    ('[[imap]]\nhost = "h"\nusername = "u"\npassword = "hunter2"\n', "[[imap]] #1 password: secrets never go in the config file"),
    ('[[imap]]\nhost = "h"\nusername = "u"\nauth = "oauth2"\nclient_id = "c"\nclient_secret_env = "S"\n',
     '[[imap]] #1 needs token_url (auth = "oauth2")'),
    ('[[imap]]\nhost = "h"\nusername = "u"\nauth = "oauth2"\ntoken_url = "http://login.example/token"\nclient_id = "c"\nclient_secret_env = "S"\n',
     "[[imap]] #1 token_url must be an https:// URL"),
    ('[[imap]]\nhost = "h"\nusername = "u"\nauth = "kerberos"\n', '[[imap]] #1 auth must be "password" (default) or "oauth2"'),
    ('[[imap]]\nhost = "h"\nusername = "u"\nauth = "oauth2"\ntoken_url = "https://t/token"\nclient_id = "c"\nclient_secret_env = "NO_SUCH"\n',
     "[[imap]] #1 client_secret_env = 'NO_SUCH': that environment variable is not set; put the OAuth2 client secret of u in it"),
])
def test_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        config_module.load(path, environ={})
    assert message in str(info.value) and str(path) in str(info.value)


FORMAT = ('[[feed]]\nprefix = "edf"\n{feed}[feed.format]\nnumber_of_header_rows = 1\nheader_example = "MPAN,Date,kWh"\n'
          'date_format = "{date_format}"\nmpan_mprn_field = "MPAN"\nreading_date_field = "Date"\nreading_fields = ["kWh"]\n'
          'row_per_reading = true\n')


def _check_config(tmp_path, text: str):
    import subprocess
    import sys

    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n[spool]\npath = "{tmp_path / "spool"}"\nmin_free = 0\n' + text)
    return path, subprocess.run([sys.executable, "-m", "esmail", "--config", str(path), "check-config"], capture_output=True,
                                text=True, timeout=120)


@pytest.mark.parametrize("text, message", [
    (FORMAT.format(feed="", date_format="%d/%m/%Q"), "[[feed]] #1 (prefix 'edf') [feed.format] date_format: '%d/%m/%Q' has %Q, which the "
                                                     "importer's Ruby strptime does not read here; use %d %e %m"),
    (FORMAT.format(feed="", date_format="%d/%m/%Y").replace('["kWh"]', '["KWH"]'),
     "[[feed]] #1 (prefix 'edf') [feed.format] reading_fields[0]: 'KWH' is not a column of header_example (MPAN, Date, kWh); "
     "name one of its columns, or fix header_example to match the files"),
    (FORMAT.format(feed='on_header_change = "wait"\n', date_format="%d/%m/%Y"), '[[feed]] #1 on_header_change must be "store"'),
    ('[[feed]]\nprefix = "edf"\non_header_change = "hold"\n', "[[feed]] prefix 'edf' has on_header_change = \"hold\" but no format"),
    ('[formats]\npath = "/nonexistent/feed-formats.json"\n', "[formats] path = '/nonexistent/feed-formats.json' cannot read it"),
])
def test_a_format_config_error_names_the_feed_the_key_and_the_fix(tmp_path, text, message):
    """check-config exits 2 on a format that cannot be checked, saying which feed, which key and what to do."""
    path, result = _check_config(tmp_path, text)
    assert result.returncode == 2 and message in result.stderr and str(path) in result.stderr, result.stderr


def test_check_config_shows_the_format_and_warns_of_unusable_export_entries(tmp_path):
    """An inline format is printed as its [feed.format] table; an export entry that cannot be checked is a warning
    line naming the prefix and the fault, and check-config still exits 0."""
    export = tmp_path / "feed-formats.json"
    export.write_text('[{"identifier": "legacy", "date_format": "%d/%m/%Y", "header_example": "MPAN,Date,HH1",'
                      ' "mpan_mprn_field": "MPAN", "reading_date_field": "Date", "reading_fields": ["HH8"], "row_per_reading": true,'
                      ' "id": 3, "description": "Legacy", "created_at": "2019-01-01T00:00:00.000Z"}]')
    _, result = _check_config(tmp_path, FORMAT.format(feed='on_header_change = "hold"\n', date_format="%e %b %Y %H:%M:%S")
                              + f'[formats]\npath = "{export}"\n')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'on_header_change = "hold"\n[feed.format]\nheader_example = "MPAN,Date,kWh"\ndate_format = "%e %b %Y %H:%M:%S"' in result.stdout
    assert (f"warning {tmp_path / 'c.toml'}: [formats] path = '{export}': identifier 'legacy': reading_fields[0]: 'HH8' is not a column "
            "of header_example (MPAN, Date, HH1)") in result.stdout
    assert "# [formats] path: 2 prefixes have a format, 1 of them unusable" in result.stdout
