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
