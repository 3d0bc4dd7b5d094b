"""Every event says who made it: per-role nkeys that log in to NATS and sign what they publish.

A credentials folder holds `<role>.nk` (the role's nkey seed, 0600: a pod gets only its own)
and `public-keys.json` (every role's public key: not secret, every reader needs it). The
same seed authenticates the connection (the broker enforces the role's permissions,
`groundloop.permissions`) and signs each published event: headers `Groundloop-Signer` (the
public key) and `Groundloop-Signature` (ed25519 over subject, newline, body, base64url).
Readers check the signature against the public keys and that the signer's role may produce
the event's type under its producer name; anything else is quarantined with the reason.

    python -m groundloop.identity keys DIR    # generate missing seeds, write the public keys
                                              # and DIR/nats-keys.env for the server
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import ssl
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing
import nkeys

from groundloop.permissions import ROLES, key_variable, producer_refusal, role_of
from groundloop.settings import Settings

SIGNER = "Groundloop-Signer"
SIGNATURE = "Groundloop-Signature"
PUBLIC_KEYS = "public-keys.json"
SERVER_ENV = "nats-keys.env"


class CredentialsError(RuntimeError):
    pass


def seed_path(directory: Path, role: str) -> Path:
    return directory / f"{role}.nk"


def new_seed() -> bytes:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def public_key(seed: bytes) -> str:
    return _text(nkeys.from_seed(bytearray(seed)).public_key)


def _text(key: object) -> str:
    # nkeys types the encoded public key as a VerifyKey; it is the base32 bytes.
    return key.decode() if isinstance(key, bytes | bytearray) else str(key)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def generate(directory: Path, roles: list[str] | None = None) -> dict[str, str]:
    """Create the seeds missing in `directory` (kept ones stay: rotating is deleting a seed
    and rerunning) and write the public keys of every role found; role -> public key."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    for role in roles or list(ROLES):
        path = seed_path(directory, role)
        if not path.exists():
            _write_private(path, new_seed())
    keys = {
        role: public_key(seed_path(directory, role).read_bytes().strip())
        for role in ROLES
        if seed_path(directory, role).exists()
    }
    (directory / PUBLIC_KEYS).write_text(json.dumps(keys, indent=2, sort_keys=True) + "\n")
    env = "".join(f"{key_variable(role)}={key}\n" for role, key in sorted(keys.items()))
    (directory / SERVER_ENV).write_text(env)
    return keys


def load_public_keys(directory: Path) -> dict[str, str]:
    path = directory / PUBLIC_KEYS
    try:
        keys = json.loads(path.read_text())
    except FileNotFoundError:
        raise CredentialsError(
            f"no {PUBLIC_KEYS} in {directory}: readers need every role's public key; "
            f"generate the folder with `python -m groundloop.identity keys {directory}` "
            "or mount the public-keys config map there"
        ) from None
    except ValueError as exc:
        raise CredentialsError(f"{path} is not JSON ({exc})") from None
    return {str(role): str(key) for role, key in keys.items()}


def load_seed(directory: Path, role: str) -> bytes:
    path = seed_path(directory, role)
    try:
        seed = path.read_bytes().strip()
    except FileNotFoundError:
        have = sorted(p.stem for p in directory.glob("*.nk"))
        raise CredentialsError(
            f"no credentials for role {role!r}: {path} is missing (this folder has: "
            f"{', '.join(have) or 'none'}); give the process its role's seed, or connect "
            "with the name of a role whose seed it holds"
        ) from None
    # Group bits are allowed: Kubernetes secret volumes with an fsGroup are group-readable.
    if path.stat().st_mode & 0o007:
        raise CredentialsError(f"{path} is readable by every user; chmod 600 {path}")
    return seed


def _message(subject: str, body: bytes) -> bytes:
    return subject.encode() + b"\n" + body


class Signer:
    """Signs a role's events with the seed it logs in with."""

    def __init__(self, role: str, seed: bytes):
        self.role = role
        self._key = nkeys.from_seed(bytearray(seed))
        self.public_key = _text(self._key.public_key)

    def headers(self, subject: str, body: bytes) -> dict[str, str]:
        signature = self._key.sign(_message(subject, body))
        return {SIGNER: self.public_key, SIGNATURE: base64.urlsafe_b64encode(signature).decode()}


def _verify_key(public: str) -> nacl.signing.VerifyKey:
    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        raise CredentialsError(f"{public!r} is not an nkey user public key")
    return nacl.signing.VerifyKey(raw[1:33])


# Signature checks remembered per process: every event is read by several readers of one
# process (each role's consumer, each log follower), and ed25519 verification was the largest
# part of reading one. 8192 digests (about 1.5 MB with the LRU's bookkeeping) cover the events
# in flight between a publish and its last reader.
VERIFIED_SIGNATURES_KEPT = 8192


class VerifiedSignatures:
    """The (signer, signature, signed bytes) triples whose signature checked out, least
    recently used dropped first. Only checks that passed are kept, under a SHA-256 of all
    three, so a hit means these exact bytes were verified before: a changed byte of the
    message, the signature or the signer misses and is verified again. The lock makes it safe
    to share between the event loop and worker threads."""

    def __init__(self, bound: int = VERIFIED_SIGNATURES_KEPT):
        self.bound = bound
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(signer: str, signature: bytes, message: bytes) -> bytes:
        # Length prefixes: no two different triples hash the same bytes.
        signer_bytes = signer.encode()
        h = hashlib.sha256(len(signer_bytes).to_bytes(4, "big") + signer_bytes)
        h.update(len(signature).to_bytes(4, "big") + signature)
        h.update(message)
        return h.digest()

    def __contains__(self, digest: bytes) -> bool:
        with self._lock:
            if digest not in self._digests:
                return False
            self._digests.move_to_end(digest)
            return True

    def add(self, digest: bytes) -> None:
        with self._lock:
            self._digests[digest] = None
            self._digests.move_to_end(digest)
            while len(self._digests) > self.bound:
                self._digests.popitem(last=False)

    def __len__(self) -> int:
        return len(self._digests)


_verified_in_this_process = VerifiedSignatures()


class Verifier:
    """Checks who signed an event against the permission map's public keys."""

    def __init__(self, public_keys: Mapping[str, str], verified: VerifiedSignatures | None = None):
        self.roles = {key: role for role, key in public_keys.items()}
        self._keys = {key: _verify_key(key) for key in public_keys.values()}
        # Shared by every Verifier of the process (one per connection): whether a signature
        # matches its key and bytes does not depend on which roles a Verifier knows.
        self._verified = _verified_in_this_process if verified is None else verified

    def refusal(
        self, subject: str, body: bytes, headers: Mapping[str, str], event_type: str, producer: str
    ) -> str | None:
        """Why the event must not be believed (unsigned, unknown signer, forged, or a role
        publishing what it may not), or None."""
        signer, signature = headers.get(SIGNER), headers.get(SIGNATURE)
        if not signer or not signature:
            return (
                f"unsigned {event_type} (producer {producer!r}): this bus verifies events and "
                f"every role signs what it publishes; no {SIGNER} header"
            )
        role = self.roles.get(signer)
        if role is None:
            return f"{event_type} signed by {signer[:12]}..., a key of no role of this deployment"
        forged = f"{event_type} with a signature of role {role} that does not match its bytes"
        try:
            raw_signature = base64.urlsafe_b64decode(signature)
        except (binascii.Error, ValueError):
            return forged
        message = _message(subject, body)
        digest = VerifiedSignatures.digest(signer, raw_signature, message)
        if digest not in self._verified:
            try:
                self._keys[signer].verify(message, raw_signature)
            except (nacl.exceptions.BadSignatureError, ValueError):
                return forged
            self._verified.add(digest)
        return producer_refusal(role, event_type, producer)


def embedded_credentials(data_dir: Path, nats_url: str | None) -> Path | None:
    """The credentials of the embedded broker of `data_dir` (groundloop.broker lays it out as
    data_dir/nats/{broker.json,credentials}) when `nats_url` is that broker, else None."""
    root = data_dir / "nats"
    try:
        port = json.loads((root / "broker.json").read_text())["port"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    credentials = root / "credentials"
    local = {f"nats://127.0.0.1:{port}", f"nats://localhost:{port}"}
    return credentials if nats_url in local and credentials.is_dir() else None


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A client TLS context when a CA is configured (with a client certificate for mTLS)."""
    if settings.nats_tls_ca is None:
        if settings.nats_tls_cert is not None:
            raise CredentialsError("GROUNDLOOP_NATS_TLS_CERT needs GROUNDLOOP_NATS_TLS_CA")
        return None
    context = ssl.create_default_context(cafile=str(settings.nats_tls_ca))
    if settings.nats_tls_cert is not None:
        if settings.nats_tls_key is None:
            raise CredentialsError("GROUNDLOOP_NATS_TLS_CERT needs GROUNDLOOP_NATS_TLS_KEY")
        context.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
    return context


@dataclass(frozen=True)
class Identity:
    """Who a connection is: its role, the seed it logs in and signs with (None: no
    authentication), the verifier of what it reads (None: events not verified), its TLS."""

    role: str
    seed: bytes | None
    signer: Signer | None
    verifier: Verifier | None
    tls: ssl.SSLContext | None


def of(settings: Settings, connection_name: str) -> Identity:
    """The identity of a process connecting as `connection_name` with `settings`: the
    configured credentials folder, else the embedded broker's when it is the one."""
    role = role_of(connection_name)
    credentials = settings.nats_credentials_dir or embedded_credentials(
        settings.data_dir, settings.nats_url
    )
    verify = settings.verify_events if settings.verify_events is not None else bool(credentials)
    if verify and credentials is None:
        raise CredentialsError(
            "GROUNDLOOP_VERIFY_EVENTS is on but no credentials folder is set: set "
            "GROUNDLOOP_NATS_CREDENTIALS_DIR to a folder with public-keys.json"
        )
    seed = load_seed(credentials, role) if credentials else None
    return Identity(
        role,
        seed,
        Signer(role, seed) if seed else None,
        Verifier(load_public_keys(credentials)) if verify and credentials else None,
        tls_context(settings),
    )


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "keys":
        directory = Path(argv[1])
        keys = generate(directory)
        print(f"{len(keys)} role keys in {directory} (server variables: {SERVER_ENV})")
        return 0
    print("usage: python -m groundloop.identity keys DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
