"""The counters behind `/metrics` (Prometheus text format, prometheus_client).

Module-level, as prometheus_client intends: the receiver and the worker
count as they go; the spool's gauges are read from the spool at scrape time.
They live in a registry of their own, so only esmail's series are served.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

SMTP_REPLIES = Counter("esmail_smtp_replies", "Final replies to MAIL, RCPT and DATA (and 421 at connect), by command and code",
                       ["command", "code"], registry=REGISTRY)
MESSAGES = Counter("esmail_messages", "Spool entries finished by the worker: stored, quarantined (every prefix refused it), or failed (to failed/)",
                   ["outcome"], registry=REGISTRY)
QUARANTINED = Counter("esmail_quarantined", "Messages a feed's policy quarantined, by prefix and kind of reason (sender, unauthenticated)",
                      ["prefix", "reason"], registry=REGISTRY)
OBJECTS = Counter("esmail_objects_stored", "Objects written to storage, by logical bucket", ["bucket"], registry=REGISTRY)
STORED_BYTES = Counter("esmail_stored_bytes", "Bytes written to storage, by logical bucket", ["bucket"], registry=REGISTRY)
CONVERSION = Histogram("esmail_conversion_seconds", "Time to parse and convert one message in the process pool",
                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=REGISTRY)
RETRIES = Counter("esmail_retries", "Worker attempts that failed temporarily and will be retried", registry=REGISTRY)
FILE_CHECKS = Counter("esmail_file_checks", "CSVs checked as the importer will read them (DESIGN §16), by prefix and verdict "
                      "(ok, warnings, rejected, header changed, format unusable, new shape)", ["prefix", "verdict"], registry=REGISTRY)
LINK_DOWNLOADS = Counter("esmail_link_downloads", "Link downloads, by outcome (ok, failed)", ["outcome"], registry=REGISTRY)
SPOOL_DEPTH = Gauge("esmail_spool_depth", "Messages waiting in the spool", registry=REGISTRY)
SPOOL_OLDEST = Gauge("esmail_spool_oldest_seconds", "Age of the oldest message waiting in the spool (0: none)", registry=REGISTRY)
SPOOL_QUARANTINED = Gauge("esmail_spool_quarantined", "Entries in the spool's quarantine/ folder, waiting for a human to release them",
                          registry=REGISTRY)
HISTORY_BACKLOG = Gauge("esmail_history_backlog", "History rows waiting to be written to the database (PostgreSQL away or slow)",
                        registry=REGISTRY)
SPOOL_FAILED = Gauge("esmail_spool_failed", "Entries in the spool's failed/ folder, waiting for a human", registry=REGISTRY)
FEED_LAST_MESSAGE = Gauge("esmail_feed_last_message_timestamp_seconds", "When the last message for a declared feed was received (Unix time)",
                          ["prefix"], registry=REGISTRY)
FEED_LATE = Gauge("esmail_feed_late", "1 when a feed with expected_every has had nothing for 1.5 × that, else 0", ["prefix"], registry=REGISTRY)
TLS_FAILURES = Counter("esmail_tls_handshake_failures", "STARTTLS handshakes that failed (a client's unknown CA, garbage)", registry=REGISTRY)
TLS_CERT_EXPIRY = Gauge("esmail_tls_certificate_expiry_timestamp_seconds", "When the TLS certificate in use expires (Unix time)",
                        registry=REGISTRY)
HTTP_LOGIN_FAILURES = Counter("esmail_http_login_failures", "Wrong passwords sent to the page (answered 401, or 429 while that client is throttled)",
                              registry=REGISTRY)
