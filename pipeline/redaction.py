"""Redaction of printed text: no credential is ever printed, and no stored value is rewritten.

:func:`redact` makes text fit to *print* (messages, logs, tracebacks); :func:`public_url` makes a
URL fit to *store* (true, without ``user:password@``). Credentials stay out of what is stored by
construction: they live only in the private option groups and the environment. A base module,
so that the console's log handlers and the storage module share it.
"""

from __future__ import annotations

import os
import re
from typing import Any

_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'\"]+)")
_BARE_CRED = re.compile(r"(?<![\w/:@.-])[\w.~%+-]+:[^\s/'\"@][^\s'\"]*@(?=[\w.-])")
# a URL's authority with user-info, as RFC 3986 delimits it: ``scheme://user:password@host``
_AUTHORITY = re.compile(
    r"(?P<scheme>(?<![\w+.-])[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]*(?:@[^/?#@\s'\"]*)*@)"
)
# the same in printed text, where a password may hold spaces and quotes: up to the last ``@``
# before the authority ends (a ``/``, ``?``, ``#`` or the end of the line)
_LOOSE_AUTHORITY = re.compile(r"(?P<scheme>(?<![\w+.-])[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\n]{0,256}@")
# a credential field in text: ``"secret": "..."``, ``'token': '...'``, ``aws_secret_access_key=...``,
# ``X-Amz-Security-Token: ...``, ``Signature=...`` (names ending in one of these words)
_FIELD = re.compile(
    r"""(?<![\w-])(?P<name>[\w.-]*?(?:secret|password|passwd|pwd|token|signature|private[_-]?key|account[_-]?key)"""
    r"""(?:[_-]?access)?(?:[_-]?key)?)(?P<sep>["']?\s*[:=]\s*)"""
    r"""(?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&'"})\]]+)""",
    re.IGNORECASE,
)
# a registered credential value is searched for in printed text only when it is at least this
# long: a short one (``testing``, ``admin``) would be found inside ordinary words and paths
MIN_SECRET_LEN = 16
_SECRET_KEYS = ("secret", "token", "password", "passwd", "credential", "session")
_SECRETS: set[str] = set()


def register_secrets(options: Any) -> None:
    """Remember the long credential values of storage options (and of the AWS environment), so
    that :func:`redact` removes them from *printed* text wherever they appear. Nothing stored is
    ever rewritten with them: stored configs leave the storage options out by construction."""
    if isinstance(options, dict):
        for k, v in options.items():
            if isinstance(v, (dict, list)):
                register_secrets(v)
            elif isinstance(v, str) and len(v) >= MIN_SECRET_LEN and any(s in str(k).lower() for s in _SECRET_KEYS):
                _SECRETS.add(v)
    elif isinstance(options, list):
        for v in options:
            register_secrets(v)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS_JSON"):
        value = os.environ.get(name, "")
        if len(value) >= MIN_SECRET_LEN:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """Text fit to *print* (messages, logs, tracebacks): ``user:password@`` removed from URLs
    (whatever characters the password holds), the same without a scheme, the values of
    credential fields (``"secret": ...``, ``aws_secret_access_key=...``) and the long credential
    values registered from storage options and the environment.

    Never use it on a value that is stored: see :func:`public_url` for those."""

    def url(m: re.Match) -> str:
        rest = m.group("rest")
        at = rest.rfind("@")
        if at < 0:
            return m.group(0)
        cred = rest[:at]
        if ":" in cred or "/" not in cred:  # user:password@... or user@host
            return m.group("scheme") + "***@" + rest[at + 1 :]
        return m.group(0)

    out = str(text)
    for secret in sorted(_SECRETS, key=len, reverse=True):  # before the patterns cut them apart
        out = out.replace(secret, "***")
    out = _LOOSE_AUTHORITY.sub(lambda m: m.group("scheme") + "***@", out)
    out = _URL.sub(url, out)
    out = _BARE_CRED.sub("***@", out)

    def field(m: re.Match) -> str:
        value = m.group("value")
        quote = value[0] if value[:1] in ("'", '"') else ""
        return m.group("name") + m.group("sep") + quote + "***" + quote

    return _FIELD.sub(field, out)


def public_url(text: str) -> str:
    """A value fit to *store* (manifests, checkpoints, reports): the URL (or the URLs in the
    text) unchanged but for the user-info of its authority (``user:password@``), which is
    left out. Nothing else is touched: a path that happens to hold a credential's characters
    stays as it is."""
    text = str(text)
    if "," in text and "{" not in text:
        return ",".join(public_url(part) for part in text.split(","))
    scheme, sep, rest = text.partition("://")
    if sep and re.fullmatch(r"\s*[a-zA-Z][a-zA-Z0-9+.-]*", scheme):  # one URL: its authority, exactly
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        if "@" in authority:
            return scheme + sep + rest[authority.rfind("@") + 1 :]
        return text
    return _AUTHORITY.sub(lambda m: m.group("scheme"), text)


def add_secret(value: str) -> None:
    """Register one credential value (a URL's whole user-info, say) for :func:`redact`."""
    if value:
        _SECRETS.add(value)
