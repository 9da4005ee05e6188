"""Problem bodies (gateway/problems.py): the upgrade link a refusal carries is the one a
plain quote-and-encode builds, whatever the request id, feature or upgrade URL."""

from __future__ import annotations

import json
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from gateway.problems import problem_prefix, upgrade_parts, with_upgrade

PREFIX = problem_prefix(
    403, "feature_not_entitled", "Feature not in plan", "no", last="upgrade", feature="f"
)
UNRESERVED = st.text("abcXYZ019._~-", min_size=1, max_size=20)


@given(
    upgrade=st.one_of(st.just("/_entitlements/ui"), st.text(max_size=30)),
    rid=st.one_of(UNRESERVED, st.text(min_size=1, max_size=20)),
    feature=st.one_of(UNRESERVED, st.text(min_size=1, max_size=20)),
)
def test_the_upgrade_link_names_the_request_and_the_feature_quoted(
    upgrade: str, rid: str, feature: str
) -> None:
    body = json.loads(with_upgrade(upgrade_parts(PREFIX, upgrade, feature), rid))
    link = f"{upgrade}?from={quote(rid, safe='')}&feature={quote(feature, safe='')}"
    assert body["upgrade"] == link
    assert body["request_id"] == rid
    assert list(body)[-2:] == ["upgrade", "request_id"]
