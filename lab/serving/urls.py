"""Server URLs as people type them: checked and normalised before any request (``check_url``).

A URL the lab cannot use gets a ``URLError`` (a ValueError) that names what is
wrong (scheme, host, IPv6 brackets, port range) and shows a good one, instead of
an exception from deep inside the HTTP client.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlparse

import httpx


class URLError(ValueError):
    """A server URL the client cannot use; the message says what is wrong with it and shows a good one."""


URL_EXAMPLE = "http://127.0.0.1:8080"
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_url(url: str) -> str:
    """A server's base URL checked and normalised; raises :class:`URLError` naming what is wrong.

    Accepted: ``http://`` or ``https://``, a host (a name, an IPv4 address, or
    an IPv6 address in brackets: ``http://[::1]:8080``), an optional port in
    1..65535 and an optional path (``/v1``). Refused, in words: no scheme or
    another one, no host, an unclosed or bare IPv6 address, a port that is not
    a number or out of range, spaces, user:password@, a ?query or #fragment.
    Returned: scheme and host lower-cased, the path without a trailing slash,
    surrounding spaces stripped; ``httpx.URL`` accepts it.
    """
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise URLError(f"a server URL is required, e.g. {URL_EXAMPLE}; got none")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise URLError(f"a URL holds no spaces or control characters; got {url!r}")
    scheme, separator, rest = text.partition("://")
    if not separator:
        raise URLError(f"a URL requires http:// or https:// in front, e.g. {URL_EXAMPLE}; got {url!r}")
    if scheme.lower() not in ("http", "https"):
        raise URLError(f"a server URL requires http:// or https://; got {scheme}:// in {url!r}")
    if "?" in rest or "#" in rest:
        raise URLError(f"a server's base URL has no ?query or #fragment, e.g. {URL_EXAMPLE}; got {url!r}")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise URLError(f"a user or password in the URL (user@host) is not supported: give the host only; got {url!r}")
    host, port = _split_host_port(authority, url)
    normalised = f"{scheme.lower()}://{host}" + (f":{port}" if port is not None else "") + (slash + path).rstrip("/")
    try:
        httpx.URL(normalised)
    except Exception as error:  # noqa: BLE001 - any refusal of httpx becomes ours, in words
        raise URLError(f"{url!r} is not a URL the HTTP client can use ({error})") from None
    return normalised


def _split_host_port(authority: str, url: str) -> tuple[str, int | None]:
    """``host[:port]`` or ``[v6][:port]`` -> (host as it goes in a URL, port or None); raises URLError."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise URLError(f"an IPv6 address must be closed with ']', e.g. http://[::1]:8080; got {url!r}")
        address, after = authority[1:end], authority[end + 1:]
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise URLError(f"{address!r} in brackets is not an IPv6 address (e.g. http://[::1]:8080); got {url!r}") from None
        if after and not after.startswith(":"):
            raise URLError(f"after an IPv6 address's ']' comes ':PORT' or nothing, e.g. http://[::1]:8080; got {url!r}")
        host, port_text = f"[{address.lower()}]", (after[1:] if after else None)
    else:
        if authority.count(":") > 1:
            raise URLError(f"an IPv6 address goes in brackets, e.g. http://[::1]:8080; got {url!r}")
        name, colon, port_text = authority.partition(":")
        port_text = port_text if colon else None
        if not name:
            raise URLError(f"a URL requires a host, e.g. {URL_EXAMPLE}; got {url!r}")
        if not name.isascii():
            raise URLError(f"a host name must be ASCII (an international name in its xn-- form); got {name!r}")
        labels = name.removesuffix(".").split(".")
        if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise URLError(f"{name!r} is not a host name (letters, digits, '-' and '.'), e.g. {URL_EXAMPLE}; got {url!r}")
        if all(label.isdigit() for label in labels):
            try:
                ipaddress.IPv4Address(name)
            except ValueError:
                hint = f" (did you mean http://127.0.0.1:{name}?)" if len(labels) == 1 else ""
                raise URLError(f"{name!r} is not an IPv4 address{hint}; got {url!r}") from None
        host = name.lower()
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit()):
        raise URLError(f"the port must be a number in 1..65535; got {port_text!r} in {url!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise URLError(f"the port must be in 1..65535; got {port} in {url!r}")
    return host, port


def is_local_url(url: str) -> bool:
    """A server on this machine (localhost, 127.x, ::1, 0.0.0.0): its timings share the lab's cores."""
    host = (urlparse(url if "//" in url else f"http://{url}").hostname or "").lower()
    return host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.")
