"""Download links (DESIGN §6) against a real aiohttp server on a free port: keys and bytes in the buckets."""

import asyncio
import logging
from dataclasses import replace
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from aiohttp import web

from conftest import bucket_contents, ingest
from esmail import mail
from esmail.config import IMSERV_LINK, ConfigError, LinksConfig, load
from esmail.links import is_public

FOLDER = "sheffield/20250323-101112"
SEED = Path(__file__).parents[2] / "shared" / "seed-samples"
CSV = b"MPAN,kWh\r\n2200013680374,1.5\r\n"
local_only = pytest.mark.parametrize("config", ["local"], indirect=True)


class Portal:
    """A supplier's download portal: each path answers one way, and every request is counted."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.base = ""
        app = web.Application()
        app.router.add_get("/{path:.*}", self.answer)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)  # the /slow handler is cut off at the end of a test

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{self.port}"

    async def answer(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] = self.hits.get(path, 0) + 1
        if path == "/imgserver/InternalImage.aspx":
            return web.Response(body=CSV, content_type="application/octet-stream",
                                headers={"Content-Disposition": "attachment; filename=WC-EnergySparksLast7Days_161120212207.csv"})
        if path == "/named":
            return web.Response(body=CSV, headers={"Content-Disposition": "attachment; filename*=UTF-8''caf%C3%A9%20report.csv"})
        if path == "/plain.csv":
            return web.Response(body=CSV, content_type="text/csv")
        if path == "/missing":
            return web.Response(status=404, text="not found")
        if path == "/page":
            return web.Response(text="<html>please log in</html>", content_type="text/html")
        if path == "/unavailable":
            return web.Response(body=b"\x89PNG Your image cannot be displayed at this time", content_type="image/png")
        if path == "/big":  # streamed, no Content-Length: the limit must hold while reading
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(100):
                await response.write(b"x" * 1000)
            return response
        if path == "/trickle":  # an endless body, one byte at a time
            response = web.StreamResponse()
            await response.prepare(request)
            while True:
                await response.write(b"x")
                await asyncio.sleep(0.05)
        if path == "/away":
            raise web.HTTPFound(f"http://localhost:{self.port}/plain.csv")
        if path == "/hop":
            raise web.HTTPFound("/plain.csv")
        if path == "/slow":
            await asyncio.sleep(10)
        if path == "/flaky" and self.hits[path] == 1:
            return web.Response(status=503)
        if path == "/flaky":
            return web.Response(body=CSV, headers={"Content-Disposition": 'attachment; filename="flaky.csv"'})
        return web.Response(status=500)


@pytest.fixture
async def portal():
    portal = Portal()
    await portal.start()
    yield portal
    await portal.runner.cleanup()


def with_links(config, portal: Portal, **settings):
    pattern = rf"http://127\.0\.0\.1:{portal.port}/[a-z./]+(\?[a-zA-Z0-9&%=]+)?"
    return replace(config, links=LinksConfig(patterns=(pattern,), **settings))


def linking(*paths: str, html: bool = False) -> bytes:
    msg = EmailMessage()
    msg["To"] = "sheffield@datafeeds.example.org"
    if html:
        links = "".join(f'<a href="{p.replace("&", "&amp;")}">download</a><br>' for p in paths)
        msg.set_content(f"<html><body>{links}</body></html>", subtype="html", cte="quoted-printable")
    else:
        msg.set_content("Your report: " + "\n".join(paths))
    return bytes(msg)


async def test_a_link_with_content_disposition_lands_under_that_name(config, store, portal):
    config = with_links(config, portal)
    raw = linking(f"{portal.base}/named?id=1&mode=View", html=True)
    await ingest(config, store, raw, ["sheffield"])
    assert await bucket_contents(store, config.buckets.amr_data) == {f"{FOLDER}/café report.csv": b"MPAN,kWh\n2200013680374,1.5\n"}
    assert portal.hits == {"/named": 1}


@local_only
async def test_a_link_without_content_disposition_is_named_after_its_url(config, store, portal):
    config = with_links(config, portal)
    await ingest(config, store, linking(f"{portal.base}/plain.csv"), ["sheffield"])
    assert await bucket_contents(store, config.buckets.amr_data) == {
        f"{FOLDER}/http___127.0.0.1_{portal.port}_plain.csv": b"MPAN,kWh\n2200013680374,1.5\n",
    }


@local_only
@pytest.mark.parametrize("path, error", [
    ("/missing", "HTTP 404"),
    ("/page", "the answer is an HTML page, not a file"),
    ("/unavailable", "the server says the file is not available ('Your image cannot be displayed at this time')"),
    ("/big", "over [links] max_bytes (50,000 bytes)"),
    ("/away", "redirected to http://localhost:{port}/plain.csv, not on a scheme, host and port that a [links] pattern names"),
    ("/slow", "no complete answer within 0.5s (after 1 attempt)"),
    ("/trickle", "no complete answer within 0.5s (after 1 attempt)"),
])
async def test_a_failed_download_is_logged_and_stores_nothing(config, store, portal, caplog, path, error):
    config = with_links(config, portal, max_bytes=50_000, timeout=0.5, attempts=1)
    with caplog.at_level(logging.ERROR, logger="esmail.worker"):
        envelope, _, spool = await ingest(config, store, linking(f"{portal.base}{path}"), ["sheffield"])
    assert await bucket_contents(store, config.buckets.amr_data) == {}
    assert await bucket_contents(store, config.buckets.unprocessable) == {}
    assert list(await bucket_contents(store, config.buckets.inbox)) == [f"{FOLDER}/{envelope.id}.eml"]
    assert f"link download failed for sheffield: {portal.base}{path}: {error.format(port=portal.port)}" in caplog.text
    assert not list(spool.pending())  # the message is finished: the link is reported, not retried for ever


@local_only
async def test_a_redirect_within_the_allowed_host_is_followed(config, store, portal):
    config = with_links(config, portal)
    await ingest(config, store, linking(f"{portal.base}/hop"), ["sheffield"])
    assert list(await bucket_contents(store, config.buckets.amr_data)) == [f"{FOLDER}/http___127.0.0.1_{portal.port}_plain.csv"]  # named after where it came from
    assert portal.hits == {"/hop": 1, "/plain.csv": 1}


@local_only
async def test_a_5xx_is_retried_and_then_succeeds(config, store, portal):
    config = with_links(config, portal, attempts=2)
    await ingest(config, store, linking(f"{portal.base}/flaky"), ["sheffield"])
    assert await bucket_contents(store, config.buckets.amr_data) == {f"{FOLDER}/flaky.csv": b"MPAN,kWh\n2200013680374,1.5\n"}
    assert portal.hits == {"/flaky": 2}


@local_only
async def test_links_are_ignored_when_the_message_has_attachments_and_capped_at_five(config, store, portal):
    config = with_links(config, portal)
    msg = EmailMessage()
    msg["To"] = "sheffield@datafeeds.example.org"
    msg.set_content(f"{portal.base}/named")
    msg.add_attachment(CSV, maintype="text", subtype="csv", filename="attached.csv")
    await ingest(config, store, bytes(msg), ["sheffield"])
    assert list(await bucket_contents(store, config.buckets.amr_data)) == [f"{FOLDER}/attached.csv"]
    assert portal.hits == {}
    paths = [f"{portal.base}/named?n={n}" for n in range(7)]
    await ingest(config, store, linking(*paths), ["other"])
    assert portal.hits == {"/named": 5}


@local_only
async def test_only_the_hosts_and_schemes_the_patterns_name_are_fetched(config, store, portal):
    """A pattern's unescaped `.` may match another host; the download still goes only to the host it names."""
    loose = replace(config, links=LinksConfig(patterns=(rf"http://127.0.0.1:{portal.port}/[a-z.]+",)))
    await ingest(loose, store, linking(f"http://127x0.0.1:{portal.port}/plain.csv"), ["sheffield"])
    assert portal.hits == {} and await bucket_contents(store, config.buckets.amr_data) == {}


def test_a_pattern_that_does_not_name_its_host_is_a_config_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[links]\npatterns = ['https://.*\\.example\\.com/report']\n")
    with pytest.raises(ConfigError, match=r"\[links\] patterns must be a list of regular expressions, each starting with its scheme and host"):
        load(toml, environ={})


@pytest.mark.skipif(not SEED.is_dir(), reason="../shared/seed-samples is absent (it sits beside the checkout in CI)")
@local_only
async def test_the_old_pipelines_imserv_link_gives_the_old_key(config, store, portal):
    """The real IMServ mail, its link pointed at the test portal: data/{ts}/WC-EnergySparksLast7Days_161120212207.csv."""
    msg = BytesParser(policy=policy.default).parsebytes((SEED / "files" / "imserv_email_with_link.txt").read_bytes())
    html = msg.get_body(("html",))
    html.set_content(html.get_content().replace("https://datavision.imserv.com/", f"{portal.base}/"), subtype="html", cte="quoted-printable")
    raw = bytes(msg)
    pattern = IMSERV_LINK.replace(r"https://datavision\.imserv\.com", rf"http://127\.0\.0\.1:{portal.port}")
    config = replace(config, links=LinksConfig(patterns=(pattern,)))
    prefix = mail.header_prefix(mail.parse_headers(raw), ())
    await ingest(config, store, raw, [prefix])
    assert await bucket_contents(store, config.buckets.amr_data) == {
        "data/20250323-101112/WC-EnergySparksLast7Days_161120212207.csv": b"MPAN,kWh\n2200013680374,1.5\n",
    }
    assert portal.hits == {"/imgserver/InternalImage.aspx": 1}


@local_only
async def test_a_host_name_that_resolves_to_a_private_address_is_refused(config, store, portal, caplog):
    """`localhost` named in a pattern still resolves to loopback: refused at once, not retried; only a written address is trusted."""
    config = replace(config, links=LinksConfig(patterns=(rf"http://localhost:{portal.port}/[a-z.]+",), attempts=3))
    with caplog.at_level(logging.ERROR, logger="esmail.worker"):
        await ingest(config, store, linking(f"http://localhost:{portal.port}/plain.csv"), ["sheffield"])
    assert portal.hits == {} and await bucket_contents(store, config.buckets.amr_data) == {}
    assert (f"http://localhost:{portal.port}/plain.csv: localhost resolves to 127.0.0.1, not a public address; "
            "write the address itself in the [links] pattern to allow it") in caplog.text


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("2a00:1450:4009:81d::200e", True),
    ("127.0.0.1", False), ("10.0.0.5", False), ("172.16.3.4", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("0.0.0.0", False), ("::1", False), ("fd00::1", False), ("fe80::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False),
])
def test_which_resolved_addresses_count_as_public(address, public):
    assert is_public(address) is public
