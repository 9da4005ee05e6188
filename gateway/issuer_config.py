"""``issuer.toml``: the issuing service's settings (see the shipped ``issuer.toml``).

Unknown keys are errors, relative paths are relative to the file's folder, and every
problem (in this file or the tier matrix it names) is reported at once, like
``gateway.toml``. ``gateway check --config issuer.toml`` runs ``load_issuer_config``.

    config = load_issuer_config(Path("issuer.toml"))
    config.matrix, config.catalog, config.resolve(config.settings.issuer.ledger)
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from gateway.errors import ConfigError, ConfigProblem
from gateway.matrix import TierMatrix, build_matrix
from gateway.signing_keys import KeyStateError, load_state, signing_kid
from gateway.skus import SkuCatalog, catalog_of
from gateway.tomlfile import TomlDocument

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class IssuerSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9800"
    name: str = "issuer"  # the ``iss`` claim of every license
    tier_matrix: str = "tier_matrix.toml"  # with the [skus] table
    ledger: str = "issuer.db"
    default_days: int = 365
    trial_days: int = 14


class KeysSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dir: str = "issuer-keys/"  # <kid>.key, <kid>.pub, keys.json
    publish: tuple[str, ...] = ()  # folders the gateways load public keys from


class BillingKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key_id: str  # recorded as the actor ``billing:<key_id>``
    secret_env: str  # environment variable holding the HMAC secret


class AuditSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    log: str | None = None


class DeliverySection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_attempts: int = 8  # then the delivery is dead-lettered
    backoff_seconds: float = 1.0  # before the second attempt; doubles each time
    max_backoff_seconds: float = 300.0
    timeout_seconds: float = 5.0
    poll_seconds: float = 1.0  # how often the ledger is looked at for due deliveries


class Target(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    provision_url: str | None = None  # a gateway's POST /admin/provision
    secret_env: str | None = None  # its provisioning secret (with provision_url)
    store: str | None = None  # or a shared store, written directly


class IssuerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    issuer: IssuerSection = IssuerSection()
    keys: KeysSection = KeysSection()
    billing: tuple[BillingKey, ...] = ()
    audit: AuditSection = AuditSection()
    delivery: DeliverySection = DeliverySection()
    targets: tuple[Target, ...] = ()


class IssuerConfig:
    __slots__ = ("path", "settings", "matrix", "catalog")

    def __init__(
        self, path: Path, settings: IssuerSettings, matrix: TierMatrix, catalog: SkuCatalog
    ) -> None:
        self.path = path
        self.settings = settings
        self.matrix = matrix
        self.catalog = catalog

    def resolve(self, relative: str) -> Path:
        return (self.path.parent / relative).resolve()

    @property
    def keys_dir(self) -> Path:
        return self.resolve(self.settings.keys.dir)

    @property
    def publish_dirs(self) -> tuple[Path, ...]:
        return tuple(self.resolve(folder) for folder in self.settings.keys.publish)

    @property
    def ledger_path(self) -> Path:
        return self.resolve(self.settings.issuer.ledger)

    @property
    def audit_path(self) -> Path:
        assert self.settings.audit.log is not None  # checked at load
        return self.resolve(self.settings.audit.log)


def is_issuer_config(path: Path) -> bool:
    """Does ``path`` look like an issuer.toml (an ``[issuer]`` table) rather than gateway.toml?"""
    try:
        return "issuer" in TomlDocument.read(path).data
    except ConfigError:
        return False


def load_issuer_config(path: Path, *, need_signing_key: bool = True) -> IssuerConfig:
    """Load and check ``issuer.toml``; ``need_signing_key=False`` for the ``keys`` verbs,
    which are how a first key comes to be."""
    doc = TomlDocument.read(path)
    settings = doc.convert(doc.data, IssuerSettings, key="")
    problems: list[ConfigProblem] = []
    matrix: TierMatrix | None = None
    catalog: SkuCatalog = {}
    if settings is not None:
        _check(doc, settings, path.parent, need_signing_key)
        matrix_doc: TomlDocument | None = None
        try:
            matrix_doc = TomlDocument.read(path.parent / settings.issuer.tier_matrix)
            matrix = build_matrix(matrix_doc)
            catalog = catalog_of(matrix_doc)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if matrix is not None and not catalog:
            doc.problem(
                "issuer.tier_matrix", "the tier matrix has no [skus] table", header="[issuer]"
            )
    problems[:0] = doc.problems
    if problems or settings is None or matrix is None:
        raise ConfigError(problems)
    return IssuerConfig(path.resolve(), settings, matrix, catalog)


def _check(doc: TomlDocument, settings: IssuerSettings, base: Path, need_key: bool) -> None:
    issuer = settings.issuer
    if not _HOST_PORT.match(issuer.listen):
        doc.problem("issuer.listen", f"{issuer.listen!r} is not host:port", header="[issuer]")
    if issuer.default_days <= 0 or issuer.trial_days <= 0:
        doc.problem("issuer", "default_days and trial_days must be positive", header="[issuer]")
    if settings.audit.log is None:
        doc.problem("audit.log", 'the issuer must keep an audit log: set [audit] log = "..."')
    elif not (base / settings.audit.log).parent.is_dir():
        doc.problem("audit.log", "its folder does not exist", header="[audit]")
    if not settings.billing:
        doc.problem("billing", "at least one [[billing]] key is needed to accept orders")
    seen: set[str] = set()
    for index, billing in enumerate(settings.billing):
        if not _NAME.match(billing.key_id) or billing.key_id in seen:
            doc.problem(
                f"billing[{index}].key_id", "missing, malformed or repeated", header="[[billing]]",
                index=index,
            )  # fmt: skip
        seen.add(billing.key_id)
    names: set[str] = set()
    for index, target in enumerate(settings.targets):
        key = f"targets[{index}]"
        if not _NAME.match(target.name) or target.name in names:
            doc.problem(f"{key}.name", "missing, malformed or repeated", header="[[targets]]",
                        index=index)  # fmt: skip
        names.add(target.name)
        hook = target.provision_url is not None
        if hook == (target.store is not None):
            doc.problem(key, "give either provision_url (+ secret_env) or store",
                        header="[[targets]]", index=index)  # fmt: skip
        elif hook and (
            not str(target.provision_url).startswith(("http://", "https://"))
            or target.secret_env is None
        ):
            doc.problem(key, "provision_url must be http(s)://... and needs secret_env",
                        header="[[targets]]", index=index)  # fmt: skip
        elif target.store is not None and not target.store.startswith(
            ("redis://", "rediss://", "sqlite://")
        ):
            doc.problem(f"{key}.store", "expected redis://, rediss:// or sqlite:///path",
                        header="[[targets]]", index=index)  # fmt: skip
    delivery = settings.delivery
    if (
        delivery.max_attempts < 1
        or min(delivery.backoff_seconds, delivery.timeout_seconds, delivery.poll_seconds) <= 0
    ):
        doc.problem("delivery", "max_attempts, backoff, timeout and poll must be positive",
                    header="[delivery]")  # fmt: skip
    keys_dir = base / settings.keys.dir
    try:
        if signing_kid(load_state(keys_dir)) is None and need_key:
            doc.problem("keys.dir", f"{keys_dir}: no active signing key (gateway keys rotate, "
                        "then keys activate)", header="[keys]")  # fmt: skip
    except KeyStateError as exc:
        doc.problem("keys.dir", str(exc), header="[keys]")
    for folder in settings.keys.publish:
        if not (base / folder).is_dir():
            doc.problem("keys.publish", f"{folder}: not a folder", header="[keys]")
