"""The issuer's signing keys and their life cycle: published → active → retired.

The issuer's key folder holds ``<kid>.key`` (private, 0600), ``<kid>.pub`` and ``keys.json``,
the state of each kid. A rotation never lets a gateway see a license signed with a kid it
does not know yet, and never pulls a kid from the gateways while a license it signed is
still valid (the order of steps is the runbook in docs/licensing.md):

1. ``rotate``: a new kid is generated and its public key written into every folder the
   gateways load (``publish``); its state is ``published``: it signs nothing yet.
2. The gateways reload (SIGHUP) and trust the new kid.
3. ``activate``: the issuer signs with the newest ``active`` kid from now on.
4. ``retire``, once the ledger shows no license signed by the old kid is valid any more
   (expiry plus grace): the public key is removed from the gateways' folders, the private
   key deleted; after the gateways reload, its keys get ``license_unknown_key``.

A folder without ``keys.json`` (keys made by ``gateway keys generate``) is adopted: every
``<kid>.key`` in it counts as active, as it was in use before rotations were recorded.

    key, kid = signing_key(Path("issuer-keys"))
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.license import generate_keypair, load_signing_key

STATE_FILE = "keys.json"
KeyStateName = Literal["published", "active", "retired"]


class KeyRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    state: KeyStateName
    created: int
    activated: int | None = None
    retired: int | None = None


class KeyFolderState(msgspec.Struct, frozen=True):
    keys: dict[str, KeyRecord] = {}


class KeyStateError(ValueError):
    """A rotation step that is not allowed now (a usage problem, with the reason)."""


def load_state(folder: Path) -> KeyFolderState:
    """The recorded states, or the adopted ones of a folder that has no ``keys.json``."""
    path = folder / STATE_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=KeyFolderState)
    except FileNotFoundError:
        pass
    except msgspec.DecodeError as exc:
        raise KeyStateError(f"{path}: not a key state file: {exc}") from exc
    if not folder.exists():
        return KeyFolderState()  # the first ``rotate`` creates it
    if not folder.is_dir():
        raise KeyStateError(f"{folder}: not a folder of signing keys")
    adopted = {
        key.stem: KeyRecord("active", int(key.stat().st_mtime), int(key.stat().st_mtime))
        for key in sorted(folder.glob("*.key"))
    }
    return KeyFolderState(adopted)


def _save(folder: Path, state: KeyFolderState) -> None:
    write_atomically(folder / STATE_FILE, msgspec.json.format(msgspec.json.encode(state)))


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a gateway reading the
    folder (or a crash) never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def signing_kid(state: KeyFolderState) -> str | None:
    """The kid the issuer signs with: the most recently activated active one."""
    active = [(record.activated or 0, kid) for kid, record in state.keys.items()
              if record.state == "active"]  # fmt: skip
    return max(active)[1] if active else None


def signing_key(folder: Path) -> tuple[Ed25519PrivateKey, str]:
    """The private key to sign with now; ``KeyStateError`` when no kid is active."""
    kid = signing_kid(load_state(folder))
    if kid is None:
        raise KeyStateError(
            f"{folder}: no active signing key: `gateway keys rotate`, reload the gateways, "
            "then `gateway keys activate KID`"
        )
    return load_signing_key(folder / f"{kid}.key")


def rotate(folder: Path, publish: tuple[Path, ...], kid: str | None = None) -> str:
    """Generate a new kid, publish its public key, record it as ``published``."""
    state = load_state(folder)
    kid = kid or f"k{time.strftime('%Y%m%d')}-{os.urandom(3).hex()}"
    if kid in state.keys:
        raise KeyStateError(f"kid {kid!r} exists already ({state.keys[kid].state})")
    _, public_path = generate_keypair(folder, kid)
    for target in publish:
        if not target.is_dir():
            raise KeyStateError(f"publish folder {target} does not exist")
        write_atomically(target / public_path.name, public_path.read_bytes())
    keys = dict(state.keys)
    keys[kid] = KeyRecord("published", int(time.time()))
    _save(folder, KeyFolderState(keys))
    return kid


def activate(folder: Path, kid: str) -> None:
    state = load_state(folder)
    record = state.keys.get(kid)
    if record is None:
        raise KeyStateError(f"no kid {kid!r} in {folder}")
    if record.state != "published":
        raise KeyStateError(f"kid {kid!r} is {record.state}, not published")
    keys = dict(state.keys)
    keys[kid] = KeyRecord("active", record.created, int(time.time()))
    _save(folder, KeyFolderState(keys))


def retire(folder: Path, kid: str, publish: tuple[Path, ...]) -> None:
    """Mark ``kid`` retired, delete its private key and unpublish its public key. The
    caller checked the ledger (no license it signed is valid any more)."""
    state = load_state(folder)
    record = state.keys.get(kid)
    if record is None:
        raise KeyStateError(f"no kid {kid!r} in {folder}")
    if record.state == "retired":
        raise KeyStateError(f"kid {kid!r} is retired already")
    if record.state == "active" and signing_kid(state) == kid:
        raise KeyStateError(
            f"kid {kid!r} is the key the issuer signs with: rotate and activate its successor first"
        )
    keys = dict(state.keys)
    keys[kid] = KeyRecord("retired", record.created, record.activated, int(time.time()))
    _save(folder, KeyFolderState(keys))
    for target in (folder, *publish):
        (target / f"{kid}.pub").unlink(missing_ok=True)
    (folder / f"{kid}.key").unlink(missing_ok=True)
