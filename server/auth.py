"""Who is calling: API keys name principals; TLS credentials for the listening port.

A principal owns the requests it submits (see `EngineClient`). Keys are compared through their
SHA-256 digests, so a lookup costs the same whatever the key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import grpc

from server.config import Security

ANONYMOUS = "anonymous"
"""The one principal of a server without API keys: every caller shares it."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def default_principal(key: str) -> str:
    """The name of a key given without one: stable, and reveals nothing usable."""
    return "key-" + _digest(key).hex()[:8]


def load_api_keys(keys: Iterable[str] = (), files: Iterable[str] = ()) -> dict[str, str]:
    """API key -> principal of `--api-key` values and `--api-keys-file` files.

    A file has one key per line, `PRINCIPAL KEY` or just `KEY`; blank lines and lines starting
    with `#` are skipped. A key without a principal is named by `default_principal`.

    Raises:
        ValueError: a line has more than two fields, or a key is listed twice.
    """
    entries = [(default_principal(k), k) for k in keys]
    for path in files:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2:
                raise ValueError(f"{path}:{number}: expected 'PRINCIPAL KEY' or 'KEY'")
            entries.append((fields[0], fields[1]) if len(fields) == 2
                           else (default_principal(fields[0]), fields[0]))
    out: dict[str, str] = {}
    for principal, key in entries:
        if key in out:
            raise ValueError(f"API key of {principal!r} is listed twice")
        out[key] = principal
    return out


class Principals:
    """Resolves a call's `authorization: Bearer <key>` metadata to its principal."""

    def __init__(self, api_keys: dict[str, str]) -> None:
        self._by_digest = {_digest(key): name for key, name in api_keys.items()}

    @property
    def required(self) -> bool:
        """Whether calls must carry a key (the server has API keys)."""
        return bool(self._by_digest)

    def of(self, metadata) -> str | None:
        """The caller's principal; None when keys are required and the call has no known one."""
        if not self._by_digest:
            return ANONYMOUS
        for key, value in metadata or ():
            if key == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer":
                    return self._by_digest.get(_digest(token.strip()))
        return None


def server_credentials(security: Security) -> grpc.ServerCredentials | None:
    """TLS credentials of `security`; None for a plaintext port."""
    if security.tls_cert is None:
        return None
    ca = Path(security.tls_client_ca).read_bytes() if security.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(security.tls_key).read_bytes(), Path(security.tls_cert).read_bytes())],
        root_certificates=ca, require_client_auth=ca is not None)


# ---- the client side ----------------------------------------------------------------------------

def _with_key(details: grpc.aio.ClientCallDetails, metadatum) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), metadatum)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


class _Key:
    """Adds `authorization: Bearer <key>` to every call of a channel."""

    def __init__(self, api_key: str) -> None:
        self.metadatum = ("authorization", f"Bearer {api_key}")


# grpc.aio files each interceptor under the first call kind it implements: one class per kind.
class _UnaryKey(_Key, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_key(details, self.metadatum), request)


class _StreamKey(_Key, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_key(details, self.metadatum), request)


def client_channel(address: str, args, options=None) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` as the client flags in `args` say (`--tls`, `--tls-ca`,
    `--tls-cert`/`--tls-key`, `--api-key`, else $POLYDECODE_API_KEY; see
    `server.cli.add_client_security_args`)."""
    api_key = args.api_key or os.environ.get("POLYDECODE_API_KEY")
    interceptors = [_UnaryKey(api_key), _StreamKey(api_key)] if api_key else None
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    read = (lambda path: Path(path).read_bytes() if path else None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.tls_ca), private_key=read(args.tls_key),
        certificate_chain=read(args.tls_cert))
    return grpc.aio.secure_channel(address, credentials, options=options,
                                   interceptors=interceptors)
