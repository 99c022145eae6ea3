"""Whether a server (``hwft serve``, ``hwft board``) can listen where it was told to, asked
before it loads anything: a port already in use, a host that is not this machine's, or a port
below 1024 without the right to it is one line naming the flag to change, not the traceback
of the server library's bind."""

from __future__ import annotations

import errno
import socket

from hwft.errors import UserError


def check_bind(host: str, port: int, command: str) -> None:
    """A UserError where (host, port) cannot be listened on; binds as the servers do
    (SO_REUSEADDR, so a port left in TIME_WAIT by an earlier run is free), then lets go."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(
            f"{command} --host {host}: not a host name or address this machine resolves "
            f"({exc.strerror}); use 127.0.0.1, or this machine's own address"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
            probe.listen(1)
        except OSError as exc:
            raise UserError(bind_message(exc, host, port, command)) from None


def bind_message(exc: OSError, host: str, port: int, command: str) -> str:
    """One line for a refused bind, naming what to change."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{command}: port {port} on {host} is already in use (another server, or an earlier {command} still "
            "running); choose another with --port, or stop what listens there"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{command} --host {host}: not an address of this machine; use 127.0.0.1, or one of its own addresses"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{command}: no permission to listen on {where} (ports below 1024 need privileges); choose "
            "--port 1024 or higher"
        )
    return f"{command}: cannot listen on {where}: {exc.strerror or exc}"
