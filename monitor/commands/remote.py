"""Options shared by every command that talks to a running sidecar, spelled the same everywhere."""

from __future__ import annotations

import argparse
from typing import Any

from ..defaults import DEFAULT_ADDRESS
from ..errors import InvalidInputError

__all__ = ["add_connection_options", "connect"]


def add_connection_options(
    p: argparse.ArgumentParser, default: str | None = DEFAULT_ADDRESS, default_text: str = DEFAULT_ADDRESS
) -> None:
    """``--address``, ``--timeout`` and the transport security flags (TLS, client certificate, token)."""
    p.add_argument("--address", default=default, metavar="HOST:PORT",
                   help=f"sidecar address (default: {default_text})")  # fmt: skip
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="deadline of each call")
    g = p.add_argument_group("transport security")
    g.add_argument("--tls", action="store_true",
                   help="use TLS, trusting the system CA certificates (implied by --tls-ca, --tls-cert)")  # fmt: skip
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="CA certificate(s) that signed the server's")
    g.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="client certificate, for a server that requires mutual TLS (with --tls-key)")  # fmt: skip
    g.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the bearer token to send (authorization: Bearer <token>); "
                   "for `client outcome`, the outcome token if the server has one")  # fmt: skip


def connect(args: argparse.Namespace, address: str | None = None) -> Any:
    """A :class:`~monitor.client.ReliabilityClient` from the flags of :func:`add_connection_options`.

    Raises
    ------
    InvalidInputError
        A certificate, key or token file cannot be read.
    """
    from ..client import ReliabilityClient, read_token_file

    try:
        token = read_token_file(args.token_file) if args.token_file else None
        return ReliabilityClient(address or args.address, timeout=args.timeout, tls=args.tls,
                                 tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                                 token=token)  # fmt: skip
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
