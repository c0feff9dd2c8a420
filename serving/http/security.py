"""``Gate``: who may call which endpoint, checked in one place for both dispatch paths.

# design: every endpoint declares a scope (public, inference, admin) in the endpoint table. The
# dispatcher (direct routes) and the Flask view wrapper both call ``Gate.check`` before the handler,
# so no path can skip it. Keys are compared in constant time (``hmac.compare_digest`` against every
# configured key, no early exit) and never logged. With no key configured a scope is open, which is
# the default on loopback; serving/host/conf.py warns at start when the bind is not loopback and
# no key is set. The Host check (``SERVING_ALLOWED_HOSTS``) stops a web page from driving a server
# on loopback through DNS rebinding; probes (the public scope) skip it, since orchestrators send the
# pod address as Host.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Protocol

from serving.config import Settings
from serving.errors import ConfigError, Forbidden, MisdirectedHost, Unauthorized
from serving.http.local_names import is_wildcard, machine_names
from serving.http.request import RequestState

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class Guarded(Protocol):
    """What the gate reads of what a request calls: an HTTP ``Endpoint`` or a gRPC ``Rpc``."""

    @property
    def path(self) -> str: ...

    @property
    def scope(self) -> str: ...


def read_keys(inline: str, path: str, variable: str) -> tuple[bytes, ...]:
    """Keys from a comma-separated setting plus a file of one key per line (blank lines and #
    comments skipped)."""
    keys = [key.strip() for key in inline.split(",") if key.strip()]
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{variable}_FILE={path!r} cannot be read: {exc.strerror}") from None
        keys += [
            line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
        ]
    for key in keys:
        if len(key) < 16 or not key.isascii() or any(c.isspace() for c in key):
            raise ConfigError(
                f"{variable}: every key must be at least 16 printable ASCII characters without "
                "spaces"
                " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
    return tuple(key.encode() for key in keys)


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names accepted (lower case, without port); None accepts any.

    Unset, they are loopback's names and what the server is bound to: the bind address, or for a
    wildcard bind (0.0.0.0, ::) this machine's names and addresses (``local_names``).
    """
    if settings.allowed_hosts.strip() == "*":
        return None
    hosts = {host.strip().lower() for host in settings.allowed_hosts.split(",") if host.strip()}
    if not hosts:
        hosts = set(LOOPBACK_HOSTS) | bound_hosts([settings.bind])
    return frozenset(hosts)


def bound_hosts(binds: list[str]) -> set[str]:
    """The Host names that name these bind addresses: each one's host, or for a wildcard this
    machine's names and addresses (unix sockets name none)."""
    hosts: set[str] = set()
    for address in binds:
        if address.startswith("unix:"):
            continue
        host = address.rpartition(":")[0] if ":" in address else address
        if is_wildcard(host):
            hosts |= machine_names()
        else:
            hosts.add(host.strip("[]").lower())
    return hosts


def host_name(header: str) -> str:
    """The host part of a Host header: ``[::1]:8000`` -> ``::1``, ``Example.org:80`` ->
    ``example.org``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class Gate:
    """Keys per scope and the allowed hosts, from the settings; ``check`` raises 400/401/403 or
    returns."""

    def __init__(self, settings: Settings) -> None:
        self.inference_keys = read_keys(
            settings.api_keys, settings.api_keys_file, "SERVING_API_KEYS"
        )
        self.admin_keys = read_keys(
            settings.admin_keys, settings.admin_keys_file, "SERVING_ADMIN_KEYS"
        )
        self.hosts = allowed_hosts(settings)
        self._from_bind = not settings.allowed_hosts.strip()
        self._hosts_seen: dict[str, bool] = {}
        # Inference takes an inference or an admin key once inference keys exist; admin endpoints
        # take an admin key when admin keys exist, else an inference key when those exist (never
        # open while inference is closed).
        self.required: dict[str, tuple[bytes, ...]] = {
            "public": (),
            "inference": self.inference_keys + self.admin_keys if self.inference_keys else (),
            "admin": self.admin_keys or self.inference_keys,
        }

    def allow_binds(self, binds: list[str]) -> None:
        """Also accept the Host names of the addresses gunicorn really listens on (its ``-b``),
        unless SERVING_ALLOWED_HOSTS lists the hosts itself (called in each worker, before it
        serves)."""
        if self.hosts is not None and self._from_bind:
            self.hosts = self.hosts | bound_hosts(binds)
            self._hosts_seen.clear()

    @property
    def keys_on(self) -> bool:
        return bool(self.inference_keys or self.admin_keys)

    def check(self, request: RequestState, endpoint: Guarded) -> None:
        """Refuse the request unless its Host is allowed and it carries a key of the endpoint's
        scope."""
        scope = endpoint.scope
        if scope == "public":
            return
        if self.hosts is not None:
            header = request.header("Host")
            if header is not None and not self._host_allowed(header):
                raise MisdirectedHost(
                    f"this server does not answer for Host {header[:64]!r}: set"
                    " SERVING_ALLOWED_HOSTS to the names clients use (e.g."
                    f" SERVING_ALLOWED_HOSTS={host_name(header)[:64]})"
                )
        keys = self.required[scope]
        if not keys:
            return
        if self._matches(request, keys):
            request.admin = scope == "admin" and bool(self.admin_keys)  # an authenticated operator
            return
        if scope == "admin" and self._matches(request, self.inference_keys):
            raise Forbidden(f"{endpoint.path} needs an admin key (SERVING_ADMIN_KEYS)")
        raise Unauthorized("this endpoint needs an API key: send Authorization: Bearer <key>")

    def _host_allowed(self, header: str) -> bool:
        """Whether a Host header names this server (answers cached: clients send a handful of
        values)."""
        allowed = self._hosts_seen.get(header)
        if allowed is None:
            allowed = self.hosts is None or host_name(header) in self.hosts
            # bounded: invented Host values cannot grow it without end
            if len(self._hosts_seen) < 1024:
                self._hosts_seen[header] = allowed
        return allowed

    @staticmethod
    def _matches(request: RequestState, keys: tuple[bytes, ...]) -> bool:
        header = request.header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        candidate = token.strip().encode("latin-1", "replace")
        found = False
        # every key is compared: the time does not say which one matched, or how much
        for key in keys:
            found |= hmac.compare_digest(candidate, key)
        return found
