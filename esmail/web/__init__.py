"""The data team's page (DESIGN §13), served beside /healthz and /metrics on `[http] listen`.

    GET  /                          the feeds: last message, last CSV, 7 days, status; 24 hours; the spool; 30 days
    GET  /messages                  newest first, 50 a page: ?prefix= &state= &q= &page=
    GET  /messages/{id}             envelope, headers, authentication, outcomes, every object stored
    POST /messages/{id}/retry       a failed entry back to the queue (form with a CSRF token)
    POST /messages/{id}/release     a quarantined entry let through (form with a CSRF token)
    GET  /objects/{bucket}/{key}    an object, read through the store (the three configured buckets only)
    GET  /api/feeds, /api/messages, /api/messages/{id}    the same data as JSON

Server-rendered Jinja2 templates (templates/), plain HTML that needs no
JavaScript; every value is escaped. The data comes from esmail.web.data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from esmail.web.access import protect
from esmail.web.views import Views

if TYPE_CHECKING:
    from esmail.daemon import Daemon

__all__ = ["protect", "setup"]


def setup(app: web.Application, daemon: "Daemon") -> None:
    """Add the page's routes to the monitor's application."""
    views = Views(daemon)
    app.router.add_get("/", views.feeds)
    app.router.add_get("/messages", views.messages)
    app.router.add_get("/messages/{id}", views.message)
    app.router.add_post("/messages/{id}/retry", views.retry)
    app.router.add_post("/messages/{id}/release", views.release)
    app.router.add_get("/objects/{bucket}/{key:.+}", views.object)
    app.router.add_get("/api/feeds", views.api_feeds)
    app.router.add_get("/api/messages", views.api_messages)
    app.router.add_get("/api/messages/{id}", views.api_message)
    app.router.add_get("/static/esmail.css", views.stylesheet)
