"""Transport security and admin access: TLS / mutual TLS credentials and an admin-token check.

Admin policy (what ``slimrank serve`` installs): every ``slimrank.v1.Admin`` call must carry
``authorization: Bearer <token>`` matching the configured token (compared in constant time),
else UNAUTHENTICATED. With no token configured the Admin service is refused entirely
(PERMISSION_DENIED) unless it was explicitly opened with ``allow_without_token`` (the CLI's
``--admin-insecure``), for local trials. Recommender and health calls are not affected;
restrict who may call them with mutual TLS.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from slimrank.config import Config, require

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/slimrank.v1.Admin/"
AUTHORIZATION = "authorization"
BEARER = "Bearer "
MIN_TOKEN_LENGTH = 16


@dataclasses.dataclass(frozen=True)
class TLSConfig(Config):
    """PEM files of the server's certificate chain and key; ``client_ca`` turns on mutual TLS.

    With ``client_ca`` set, clients must present a certificate signed by that CA.
    """

    cert: str
    key: str
    client_ca: str | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            value = getattr(self, name)
            if name == "client_ca" and value is None:
                continue
            require(bool(value) and Path(value).is_file(), self, name, value, "is not a file")


def _check_pems(
    context: ssl.SSLContext,
    ca_flag: str,
    ca: str | Path | None,
    cert: str | Path | None,
    key: str | Path | None,
) -> None:
    """Load the PEM files into ``context`` with OpenSSL; ``ValueError`` names the flag."""
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as err:
            reason = err.reason or err
            raise ValueError(f"{ca_flag} {ca}: no PEM CA certificate ({reason})") from None
    if cert is not None and key is not None:
        try:  # an encrypted key gets an empty passphrase, and fails, instead of a prompt
            context.load_cert_chain(str(cert), str(key), password=lambda: b"")
        except ssl.SSLError as err:
            raise ValueError(
                f"--tls-cert {cert} with --tls-key {key}: not a PEM certificate chain and its "
                f"unencrypted private key ({err.reason or err})"
            ) from None


def check_tls_files(tls: TLSConfig) -> None:
    """Raise ``ValueError`` naming the flag whose PEM file a TLS server could not use.

    grpc takes the bytes unchecked and fails later at bind time, saying only "Failed to bind";
    OpenSSL (through :mod:`ssl`) says what is wrong: not PEM, or a key that is not the
    certificate's. An encrypted key is refused (no passphrase prompt).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _check_pems(context, "--tls-client-ca", tls.client_ca, tls.cert, tls.key)


def checked_channel_credentials(
    ca: str | Path | None, cert: str | Path | None, key: str | Path | None
) -> grpc.ChannelCredentials:
    """Return :func:`channel_credentials` after checking the files with OpenSSL.

    ``ValueError`` names the flag (``--tls-ca``, ``--tls-cert``, ``--tls-key``) whose file is
    missing or unusable, where grpc would fail each call with UNAVAILABLE.
    """
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: not a file")
    _check_pems(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "--tls-ca", ca, cert, key)
    return channel_credentials(ca, cert, key)


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """Return TLS server credentials; they require a client certificate when ``client_ca``."""
    root = None if tls.client_ca is None else Path(tls.client_ca).read_bytes()
    pair = (Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())
    return grpc.ssl_server_credentials(
        [pair], root_certificates=root, require_client_auth=root is not None
    )


def channel_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Return TLS channel credentials trusting ``ca`` (None: system roots), with a client cert.

    ``cert`` and ``key`` (PEM files) go together; give them for servers that require mutual TLS.
    """
    if (cert is None) != (key is None):
        raise ValueError("channel_credentials: give both cert and key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else Path(ca).read_bytes(),
        private_key=None if key is None else Path(key).read_bytes(),
        certificate_chain=None if cert is None else Path(cert).read_bytes(),
    )


def read_token(path: str | Path) -> str:
    """Return the admin token in ``path`` (surrounding whitespace dropped).

    Raises ``ValueError`` naming the file when others may read it or anyone but its owner
    may write it (mode bits o+r, g+w, o+w: ``chmod 600`` it), or when the token is shorter
    than :data:`MIN_TOKEN_LENGTH` characters.
    """
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ValueError(
            f"{path}: admin token file has mode {mode:04o}, readable by others or writable by "
            "its group or others; make it readable by the server's user only (chmod 600)"
        )
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{path}: admin token file is empty")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{path}: admin token has {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}; "
            "use a random one (e.g. openssl rand -hex 32)"
        )
    return token


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Return the call metadata that presents ``token``."""
    return ((AUTHORIZATION, BEARER + token),)


def bearer_token(value: str | bytes) -> bytes:
    """Return the token of an ``authorization`` value ``Bearer <token>``, else ``b""``.

    The scheme is case-insensitive (RFC 7235 section 2.1, which RFC 6750 uses), so
    ``bearer`` and ``BEARER`` work too; spaces after it are skipped.
    """
    raw = value.encode() if isinstance(value, str) else bytes(value)
    scheme, _, token = raw.partition(b" ")
    if scheme.lower() != BEARER.strip().lower().encode():
        return b""
    return token.lstrip(b" ")


def _refuse(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AdminAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls to methods under ``prefix`` that lack the bearer ``token``.

    ``token`` None refuses them all with PERMISSION_DENIED, unless ``allow_without_token``.
    Put it after the metrics interceptor so that refusals are counted by code.
    """

    def __init__(
        self,
        token: str | None,
        allow_without_token: bool = False,
        prefix: str = ADMIN_PREFIX,
    ) -> None:
        if token is not None and not token:
            raise ValueError("AdminAuthInterceptor.token='': must be None or non-empty")
        self._expected = None if token is None else token.encode()
        self._open = token is None and allow_without_token
        self._prefix = prefix
        if self._open:
            log.warning("Admin service open without a token (--admin-insecure)")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if (
            handler is None
            or self._open
            or not handler_call_details.method.startswith(self._prefix)
        ):
            return handler
        if self._expected is None:
            return _refuse(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                "the Admin service is disabled: the server has no admin token",
            )
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTHORIZATION:
                presented = bearer_token(value)
        if not hmac.compare_digest(presented, self._expected):
            return _refuse(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong admin token (metadata authorization: Bearer <token>)",
            )
        return handler
