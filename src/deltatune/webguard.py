"""What the two HTTP servers (`serve`, `ui`) check of a request's `Host` header.

Bound to a loopback address, a server can only be reached from this machine, so a request whose `Host` header
names another machine comes from a web page that made its own domain name resolve to 127.0.0.1 (DNS
rebinding): the browser then treats the server as that page's own origin and lets it read the answers. Such
requests get 403 (as Ollama and Jupyter do); a server listening on another address checks no `Host`.
"""

from __future__ import annotations

import ipaddress
import re

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _name(host: str) -> str:
    """A host name as compared here: lower-case, IPv6 without brackets, without the trailing dot of an absolute
    name (`localhost.` is `localhost`: browsers reach http://localhost.:7860/ and send that `Host`)."""
    host = host.strip().lower().strip("[]")
    return host[:-1] if host.endswith(".") and not host.endswith("..") else host


def is_loopback(host: str) -> bool:
    """Whether a `--host` value binds this machine only (127.0.0.0/8, ::1, localhost, in any case)."""
    host = _name(host)
    try:
        return host in LOCAL_HOSTS or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ALLOWED_HOST_HELP = (
    "a name this server is also reached by, e.g. through a reverse proxy that passes the browser's Host header "
    "(repeatable). Bound to a loopback address, only this machine's names are accepted in Host otherwise (a "
    "guard against DNS rebinding)"
)


def allowed_hosts_for(bind_host: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The `Host` names a server bound to `bind_host` accepts: this machine's and `extra` (`--allowed-host`),
    when it binds a loopback address; None (any) otherwise."""
    return (*LOCAL_HOSTS, bind_host, *extra) if is_loopback(bind_host) else None


def names_problem(names: list[str] | None) -> str | None:
    """Why an `--allowed-host` value is not a host name (None: all are)."""
    for name in names or ():
        if not re.fullmatch(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*", name.strip()):
            return (
                f"--allowed-host {name!r} is not a host name: give the name alone (proxy.example.com), without "
                "a scheme, port or path"
            )
    return None


def host_name(netloc: str) -> str:
    """The host of a `Host` header or an origin's `host[:port]`, lower-case, IPv6 without brackets, without the
    trailing dot of an absolute name."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return _name(netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc)


def host_problem(headers: dict[bytes, bytes], allowed: frozenset[str] | None) -> str | None:
    """Why a request's `Host` header is refused (None: accepted, or `allowed` is None)."""
    if allowed is None:
        return None
    host = headers.get(b"host", b"").decode("latin-1")
    if not host or host_name(host) in allowed:  # no Host at all: an HTTP/1.0 tool, never a browser
        return None
    return (
        f"Host {host!r} is not this server's address: it listens on this machine only, so reach it as 127.0.0.1 "
        "or localhost (a name it is also reached by, through a proxy, is given with --allowed-host NAME)"
    )


def allowed_set(hosts: tuple[str, ...] | None) -> frozenset[str] | None:
    return None if hosts is None else frozenset(_name(h) for h in hosts)
