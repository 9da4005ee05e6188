"""Minting: serials from the ledger, the upgrade/downgrade rule, idempotent orders, and
``gateway license issue`` (offline, with and without the issuer's ledger)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.issuer_config import load_issuer_config
from gateway.issuing import Order, Terms, build, order_digest, parse_order
from gateway.ledger import Ledger, LedgerLicense, OrderConflict
from gateway.license import KeyRing, LicenseClaims, Seats
from gateway.matrix import TierMatrix
from gateway.signing_keys import activate, rotate, signing_key
from gateway.skus import Plan

REPO = Path(__file__).resolve().parent.parent
Capture = pytest.CaptureFixture[str]
DAY = 86400


@pytest.fixture
def issuer_dir(tmp_path: Path) -> Path:
    """The shipped issuer.toml and tier_matrix.toml with a rotated-in, active key ``k1``."""
    shutil.copy(REPO / "issuer.toml", tmp_path / "issuer.toml")
    shutil.copy(REPO / "tier_matrix.toml", tmp_path / "tier_matrix.toml")
    (tmp_path / "keys").mkdir()
    rotate(tmp_path / "issuer-keys", (tmp_path / "keys",), "k1")
    activate(tmp_path / "issuer-keys", "k1")
    return tmp_path


def issue(capsys: Capture, *argv: str) -> tuple[int, LicenseClaims | None, str]:
    code = main(["license", "issue", *argv])
    out, err = capsys.readouterr()
    if code != 0:
        return code, None, err
    import msgspec

    from gateway.license import decode_unverified

    return code, msgspec.convert(decode_unverified(out.strip())[1], LicenseClaims), err


def test_keys_issued_in_the_same_second_get_increasing_serials(
    key_dir: Path, config_dir: Path, capsys: Capture
) -> None:
    argv = ["--signing-key", str(key_dir / "test.key"), "--tenant", "acme", "--tier", "core",
            "--config", str(config_dir / "gateway.toml")]  # fmt: skip
    serials = []
    for _ in range(3):
        code, claims, _ = issue(capsys, *argv)
        assert code == 0 and claims is not None
        serials.append(claims.serial)
    assert serials == sorted(set(serials))


def test_license_issue_checks_the_matrix_without_config(
    key_dir: Path, config_dir: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(config_dir)  # ./gateway.toml is the default
    base = ["--signing-key", str(key_dir / "test.key"), "--tenant", "acme"]
    assert issue(capsys, *base, "--tier", "gold")[0] == 2
    code, _, err = issue(capsys, *base, "--tier", "core", "--addon", "personalized_url")
    assert code == 2 and "not available to tier 'core'" in err
    monkeypatch.chdir(config_dir.parent)  # no gateway.toml here
    code, _, err = issue(capsys, *base, "--tier", "core")
    assert code == 2 and "no matrix" in err


def test_license_issue_by_sku(key_dir: Path, config_dir: Path, capsys: Capture) -> None:
    base = ["--signing-key", str(key_dir / "test.key"), "--tenant", "acme",
            "--config", str(config_dir / "gateway.toml")]  # fmt: skip
    code, claims, _ = issue(capsys, *base, "--sku", "CORE", "--sku", "ADDON-SMS",
                            "--sku", "SEAT-DRIVER:4")  # fmt: skip
    assert code == 0 and claims is not None
    assert (claims.tier, claims.addons, claims.seats) == ("core", ("sms_messaging",), Seats(1, 5))
    code, _, err = issue(capsys, *base, "--sku", "FLEET", "--sku", "ADDON-ROUTE-DIST")
    assert code == 2 and "ADDON-ROUTE-DIST" in err and "addon_included_in_tier" in err
    with pytest.raises(SystemExit):  # one or the other
        issue(capsys, *base, "--sku", "CORE", "--tier", "core")


def test_license_issue_with_the_issuer_ledger(issuer_dir: Path, capsys: Capture) -> None:
    config = ["--issuer-config", str(issuer_dir / "issuer.toml"), "--tenant", "acme"]
    code, fleet, _ = issue(capsys, *config, "--sku", "FLEET", "--reason", "DEAL-1")
    assert code == 0 and fleet is not None
    assert fleet.iss == "issuer" and fleet.nbf == fleet.iat
    keyring = KeyRing.load(issuer_dir / "keys")
    assert "k1" in keyring.keys
    code, core, err = issue(capsys, *config, "--sku", "CORE")
    assert code == 0 and core is not None and "downgrade" in err
    assert core.serial > fleet.serial
    assert core.nbf == fleet.exp  # scheduled for the end of the period paid for
    code, enterprise, err = issue(capsys, *config, "--sku", "ENTERPRISE")
    assert code == 0 and enterprise is not None and "upgrade" in err
    assert enterprise.nbf == enterprise.iat and enterprise.serial > core.serial
    held = Ledger(issuer_dir / "issuer.db").licenses("acme")
    assert [lic.change for lic in held] == ["upgrade", "downgrade", "new"]
    assert all(lic.kid == "k1" for lic in held)
    assert issue(capsys, *config, "--sku", "CORE", "--serial", "3")[0] == 2


def test_serials_never_collide_across_processes(issuer_dir: Path) -> None:
    command = [sys.executable, "-m", "gateway.cli", "license", "issue", "--issuer-config",
               str(issuer_dir / "issuer.toml"), "--tenant", "acme", "--sku", "CORE"]  # fmt: skip
    workers = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(6)]
    assert [worker.wait(timeout=60) for worker in workers] == [0] * 6
    serials = [lic.serial for lic in Ledger(issuer_dir / "issuer.db").licenses("acme")]
    assert len(serials) == 6 and len(set(serials)) == 6


def test_serials_stay_above_serials_in_seconds(issuer_dir: Path) -> None:
    # Keys issued before the ledger existed carried the issuing second as serial.
    config = load_issuer_config(issuer_dir / "issuer.toml")
    minted = mint(config.matrix, issuer_dir, Plan("core", (), None, None))
    assert minted.serial > int(time.time()) * 1000


def mint(
    matrix: TierMatrix, issuer_dir: Path, plan: Plan, order: tuple[str, str] | None = None,
    **terms: object,
) -> LedgerLicense:  # fmt: skip
    key, kid = signing_key(issuer_dir / "issuer-keys")
    fields: dict[str, object] = {"tenant": "acme", "plan": plan, "issuer": "tests",
                                 "actor": "tests", "now": int(time.time())}  # fmt: skip
    fields.update(terms)
    described = Terms(**fields)  # type: ignore[arg-type]
    lic, _ = Ledger(issuer_dir / "issuer.db").mint(
        "acme",
        lambda serial, held: build(described, matrix, serial, held, key, kid),
        lambda _: None,
        order=order,
    )
    return lic


@pytest.mark.parametrize(
    ("before", "after", "change"),
    [
        pytest.param(Plan("core", (), None, None), Plan("fleet", (), None, None), "upgrade",
                     id="higher-tier"),
        pytest.param(Plan("fleet", (), None, None), Plan("core", (), None, None), "downgrade",
                     id="lower-tier"),
        pytest.param(Plan("core", ("sms_messaging",), None, None), Plan("core", (), None, None),
                     "downgrade", id="addon-dropped"),
        pytest.param(Plan("core", (), None, None), Plan("core", ("sms_messaging",), None, None),
                     "upgrade", id="addon-added"),
        pytest.param(Plan("fleet", (), Seats(9, 9), None), Plan("fleet", (), None, None),
                     "downgrade", id="fewer-seats"),
        pytest.param(Plan("fleet", (), None, None), Plan("fleet", (), Seats(5, 9), None),
                     "upgrade", id="more-seats"),
        pytest.param(Plan("fleet", (), None, None), Plan("fleet", (), None, None), "renewal",
                     id="same-plan"),
    ],
)  # fmt: skip
def test_upgrades_start_now_downgrades_at_the_period_end(
    issuer_dir: Path, before: Plan, after: Plan, change: str
) -> None:
    matrix = load_issuer_config(issuer_dir / "issuer.toml").matrix
    first = mint(matrix, issuer_dir, before, days=30)
    second = mint(matrix, issuer_dir, after)
    assert second.change == change
    assert second.nbf == (first.exp if change == "downgrade" else second.iat)


def test_an_explicit_start_wins(issuer_dir: Path) -> None:
    matrix = load_issuer_config(issuer_dir / "issuer.toml").matrix
    mint(matrix, issuer_dir, Plan("fleet", (), None, None))
    start = int(time.time()) + 5 * DAY
    lic = mint(matrix, issuer_dir, Plan("core", (), None, None), starts_at=start)
    assert (lic.change, lic.nbf, lic.exp) == ("downgrade", start, start + 365 * DAY)


def test_orders_are_idempotent_by_id(issuer_dir: Path) -> None:
    matrix = load_issuer_config(issuer_dir / "issuer.toml").matrix
    plan = Plan("fleet", (), None, None)
    first = mint(matrix, issuer_dir, plan, order=("ord-1", "digest-a"))
    again = mint(matrix, issuer_dir, plan, order=("ord-1", "digest-a"))
    assert again == first
    with pytest.raises(OrderConflict):
        mint(matrix, issuer_dir, plan, order=("ord-1", "digest-b"))
    assert len(Ledger(issuer_dir / "issuer.db").licenses("acme")) == 1


def test_the_same_order_spelled_differently_has_one_digest() -> None:
    one = parse_order(b'{"order_id": "o", "tenant": "t", "skus": ["CORE"], '
                      b'"starts_at": "2030-01-01"}')  # fmt: skip
    two = parse_order(b'{"starts_at": 1893456000, "skus": [{"sku": "CORE", "quantity": 1}], '
                      b'"tenant": "t", "order_id": "o"}')  # fmt: skip
    three = Order("o", "t", ["CORE"], starts_at=1893456001)
    assert order_digest(one) == order_digest(two) != order_digest(three)


def test_a_grandfather_window_is_part_of_the_order() -> None:
    plain = Order("o", "t", ["CORE"])
    window = Order("o", "t", ["CORE"], grandfather_tier="enterprise", grandfather_until=1893456000)
    spelled = Order("o", "t", ["CORE"], grandfather_tier="enterprise",
                    grandfather_until="2030-01-01")  # fmt: skip
    assert order_digest(window) == order_digest(spelled) != order_digest(plain)
    # An order without a window keeps the digest it had before windows existed.
    assert order_digest(plain) == (
        "375e3d7038413e27ea7ba899df7092680ed05ced4ece4bb0cb1eea801722f5fb"
    )  # so a ledger's earlier orders still match when billing repeats them


def test_nothing_is_minted_when_the_audit_line_cannot_be_written(issuer_dir: Path) -> None:
    matrix = load_issuer_config(issuer_dir / "issuer.toml").matrix
    key, kid = signing_key(issuer_dir / "issuer-keys")
    terms = Terms(tenant="acme", plan=Plan("core", (), None, None), issuer="t", actor="t",
                  now=int(time.time()))  # fmt: skip

    def refuse(_: LedgerLicense) -> None:
        raise OSError("disk full")

    ledger = Ledger(issuer_dir / "issuer.db")
    with pytest.raises(OSError, match="disk full"):
        ledger.mint("acme", lambda s, h: build(terms, matrix, s, h, key, kid), refuse)
    assert ledger.licenses("acme") == ()
