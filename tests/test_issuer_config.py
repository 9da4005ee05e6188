"""``issuer.toml``: the shipped example, and every problem named by ``gateway check``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.errors import ConfigError
from gateway.issuer_config import load_issuer_config
from gateway.signing_keys import activate, rotate

REPO = Path(__file__).resolve().parent.parent
Capture = pytest.CaptureFixture[str]


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    """The shipped issuer.toml beside the shipped matrix, with its folders and a key."""
    shutil.copy(REPO / "issuer.toml", tmp_path / "issuer.toml")
    shutil.copy(REPO / "tier_matrix.toml", tmp_path / "tier_matrix.toml")
    (tmp_path / "keys").mkdir()
    return tmp_path / "issuer.toml"


def test_the_shipped_example_checks_once_a_key_is_active(shipped: Path, capsys: Capture) -> None:
    assert main(["check", "--config", str(shipped)]) == 1
    assert "no active signing key" in capsys.readouterr().err
    rotate(shipped.parent / "issuer-keys", (shipped.parent / "keys",), "k1")
    activate(shipped.parent / "issuer-keys", "k1")
    assert main(["check", "--config", str(shipped)]) == 0
    assert "12 SKUs, 1 delivery targets" in capsys.readouterr().out
    config = load_issuer_config(shipped)
    assert config.ledger_path == shipped.parent / "issuer.db"
    assert config.publish_dirs == (shipped.parent / "keys",)


@pytest.mark.parametrize(
    ("edit", "key", "fragment"),
    [
        pytest.param(('log = "audit.jsonl"', "# no log"), "audit.log", "must keep an audit log",
                     id="no-audit-log"),
        pytest.param(('log = "audit.jsonl"', 'log = "nowhere/audit.jsonl"'), "audit.log",
                     "folder does not exist", id="audit-folder-missing"),
        pytest.param(('listen = "127.0.0.1:9800"', 'listen = "everywhere"'), "issuer.listen",
                     "not host:port", id="bad-listen"),
        pytest.param(('secret_env = "GATEWAY_PROVISION_SECRET"', ""), "targets[0]",
                     "needs secret_env", id="hook-without-secret"),
        pytest.param(('provision_url = "http://127.0.0.1:9900/admin/provision"',
                      'store = "redis://127.0.0.1:6379/0"\nprovision_url = "http://x/"'),
                     "targets[0]", "either provision_url", id="hook-and-store"),
        pytest.param(('publish = ["keys/"]', 'publish = ["elsewhere/"]'), "keys.publish",
                     "not a folder", id="publish-folder-missing"),
        pytest.param(("max_attempts = 8", "max_attempts = 0"), "delivery", "positive",
                     id="no-attempts"),
        pytest.param(('[[billing]]\nkey_id = "billing-main"\nsecret_env = "ISSUER_BILLING_SECRET"',
                      ""), "billing", "at least one", id="no-billing-key"),
        pytest.param(("trial_days = 14", "trial_days = 14\ncolour = 1"), "issuer",
                     "`colour`", id="unknown-key"),
    ],
)  # fmt: skip
def test_problems_are_named(shipped: Path, edit: tuple[str, str], key: str, fragment: str) -> None:
    rotate(shipped.parent / "issuer-keys", (), "k1")
    activate(shipped.parent / "issuer-keys", "k1")
    text = shipped.read_text()
    assert edit[0] in text
    shipped.write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(ConfigError) as caught:
        load_issuer_config(shipped)
    found = {problem.key: problem.message for problem in caught.value.problems}
    assert key in found and fragment in found[key], found


def test_a_matrix_problem_is_reported_with_its_file(shipped: Path) -> None:
    matrix = shipped.parent / "tier_matrix.toml"
    matrix.write_text(matrix.read_text() + '\n[skus.GOLD]\ntier = "gold"\n')
    with pytest.raises(ConfigError) as caught:
        load_issuer_config(shipped, need_signing_key=False)
    (problem,) = caught.value.problems
    assert (problem.file, problem.key) == (str(matrix), "skus.GOLD.tier")
