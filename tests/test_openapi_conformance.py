"""The gateway against its own OpenAPI document, property-based (schemathesis): every
operation of the document — the tenant endpoints on an app listener, the admin endpoints on
the admin listener — is called on a running gateway with generated valid and invalid
inputs, and each answer must be no 5xx, a documented status code with the documented
content type, and headers and a body matching the documented schemas.

Schemathesis parametrizes the tests when this module is imported, before any gateway runs,
so it reads the document built for the shipped settings and matrix; the first test checks
that the running gateway serves exactly that document (``GET /_entitlements/openapi.json``),
apart from the admin listener's address. (``schemathesis.pytest.from_fixture`` would load it
from the gateway, but as of schemathesis 4.32 it sets ``Function._nodeid``, which pytest 9.2
no longer has.)

Generated identity headers would almost always be refused with 401, so each case also
draws who calls: as generated, a stored tenant by id, or a valid license key (the role
header stays as generated).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gateway.config import load_settings
from gateway.matrix import load_matrix
from gateway.openapi import openapi_document
from tests.conftest import IssueKey
from tests.harness import GatewayThread, gateway_in_thread
from tests.provisioning import SECRET

REPO = Path(__file__).resolve().parent.parent
DOCUMENT = openapi_document(
    load_settings(REPO / "gateway.toml"), load_matrix(REPO / "tier_matrix.toml")
)
api = schemathesis.openapi.from_dict(DOCUMENT)
CALLERS = ("as-generated", "tenant", "key")


@pytest.fixture(scope="module")
def conformance_gateway(
    tmp_path_factory: pytest.TempPathFactory, key_dir: Path, issue_key: IssueKey
) -> Iterator[GatewayThread]:
    """A gateway whose store holds acme (Core with SMS Messaging), operations tagging what
    the plan lacks, and the provisioning hook on (its signatures checked)."""
    key = issue_key(sub="acme", tier="core", addons=("sms_messaging",))
    folder = tmp_path_factory.mktemp("conformance")
    (folder / "tenants.toml").write_text(f'[[tenants]]\nid = "acme"\nkeys = ["{key}"]\n')
    extra = '[store]\nseed = "tenants.toml"\n'
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GATEWAY_PROVISION_SECRET", SECRET)
        with gateway_in_thread(folder, key_dir, app_extra='upsell = "tag"\n', extra=extra) as gw:
            yield gw


@pytest.fixture(scope="module")
def identities(issue_key: IssueKey) -> dict[str, dict[str, str]]:
    return {
        "as-generated": {},
        "tenant": {"X-Tenant-Id": "acme"},
        "key": {"X-License-Key": issue_key(sub="acme", tier="core", exp=int(time.time()) + 3600)},
    }


def without_servers(document: dict[str, Any]) -> dict[str, Any]:
    paths = {
        path: {k: v for k, v in item.items() if k != "servers"}
        for path, item in document["paths"].items()
    }
    return {**document, "paths": paths}


def test_the_gateway_serves_the_document_under_test(conformance_gateway: GatewayThread) -> None:
    gateway = conformance_gateway.gateway
    url = gateway.url("operations", "/_entitlements/openapi.json")
    with urllib.request.urlopen(url, timeout=10) as response:
        served = json.loads(response.read())
    assert without_servers(served) == without_servers(DOCUMENT)
    assert served["paths"]["/healthz"]["servers"][0]["url"] == gateway.admin_url("")


@api.parametrize()
@api.given(caller=st.sampled_from(CALLERS))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(
    case: Any,
    caller: str,
    conformance_gateway: GatewayThread,
    identities: dict[str, dict[str, str]],
) -> None:
    gateway = conformance_gateway.gateway
    if "admin" in case.operation.tags:
        base_url = gateway.admin_url("")
    else:
        base_url = gateway.url("operations", "")
        if caller != "as-generated":
            headers = {k: v for k, v in (case.headers or {}).items() if k != "X-License-Key"}
            case.headers = {**headers, **identities[caller]}
    case.call_and_validate(base_url=base_url)
