"""The provisioning API fuzzed by schemathesis from its own OpenAPI document.

The bridge runs in this process (SQLite, homeserver unreachable) with the API on, and is reached
over real HTTP on loopback. For every operation, schema-valid ("positive") and schema-violating
("negative") requests are sent with the right bearer secret. Positive ones act as an admin (a
generated user ID is unknown to the permission table and would stop at 403); negative ones keep
whatever was generated. Every answer must be documented for its operation, match the documented
schema, be JSON, and never be a server error: hostile room IDs, names, URLs (outbound webhooks
through the egress checks) and bodies included. With a wrong or no secret, every operation
answers 401.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    CheckContext,
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response
from schemathesis.schemas import BaseSchema

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.harness.ports import free_port
from bridge.web.provisioning import PREFIX, openapi_document
from tests.conftest import InProcessBridge, bridge_config_dict
from tests.integration.test_conformance import (
    Credentials,
    fuzz_settings,
    header,
    loopback_session,
    parse_json,
    schemathesis_uses_random,
    without,
)

SECRET = "provisioning-fuzz-" + "s" * 32
ADMIN = "@admin:localhost"
EXAMPLES = 15
UNAUTHORISED_EXAMPLES = 10

pytestmark = [pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


def load_schema() -> BaseSchema:
    return schemathesis.openapi.from_dict(openapi_document(), config=schemathesis.Config())


def operation_labels() -> list[str]:
    labels = []
    for result in load_schema().get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()
        labels.append(result.ok().label)
    return labels


OPERATIONS = operation_labels()


@pytest.fixture
async def provisioning_bridge(db_url: str) -> AsyncIterator[InProcessBridge]:
    port = free_port()
    raw = bridge_config_dict(
        free_port(),
        port,
        db_url,
        provisioning={"shared_secret": SECRET},
        webhooks={"egress": ["http://127.0.0.2:9/in"]},
    )
    config = parse_config(raw, env={})
    bridge = Bridge(config)
    await bridge.start()
    try:
        yield InProcessBridge(bridge, config, f"http://127.0.0.1:{port}")
    finally:
        await bridge.stop()


@pytest.fixture
def schema(provisioning_bridge: InProcessBridge) -> tuple[BaseSchema, str]:
    found = load_schema()
    base_url = provisioning_bridge.base_url + PREFIX
    found.config.update(base_url=base_url, request_timeout=10)
    return found, base_url


def json_answer(ctx: CheckContext, response: Response, case: Case) -> None:
    """JSON, and every error is {"errcode", "error"}."""
    media_type = (header(response, "Content-Type") or "").split(";")[0].strip().lower()
    assert media_type == "application/json", f"{response.status_code}: {media_type!r}"
    body = parse_json(response)
    if response.status_code >= 400:
        assert isinstance(body, dict), body
        assert isinstance(body.get("errcode"), str), body
        assert isinstance(body.get("error"), str), body


def documented_status(ctx: CheckContext, response: Response, case: Case) -> None:
    documented = {int(code) for code in case.operation.responses.status_codes if code.isdigit()}
    assert response.status_code in documented, (
        f"{case.operation.label} answered {response.status_code} "
        f"{response.content[:200]!r}, not one of {sorted(documented)}"
    )


CHECKS = [
    not_a_server_error,
    json_answer,
    documented_status,
    content_type_conformance,
    response_schema_conformance,
]


def send(
    case: Case, session: requests.Session, base_url: str, credentials: Credentials
) -> Response:
    without(case.query, "access_token")
    response = case.call(base_url=base_url, session=session, auth=credentials)
    assert urlsplit(response.request.url).hostname == "127.0.0.1", response.request.url
    return response


# GET /openapi.json takes nothing: there is no request to break.
CASES = [
    (label, mode)
    for label in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode == GenerationMode.POSITIVE or "openapi.json" not in label
]


@schemathesis_uses_random
@pytest.mark.parametrize(("label", "mode"), CASES, ids=str)
async def test_fuzz_with_the_secret(
    schema: tuple[BaseSchema, str], label: str, mode: GenerationMode
) -> None:
    found, base_url = schema
    operation = found.find_operation_by_label(label)
    assert operation is not None
    session = loopback_session()
    statuses: dict[int, int] = {}

    @fuzz_settings(EXAMPLES)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        if mode == GenerationMode.POSITIVE and isinstance(case.query, dict) and case.query:
            case.query["user_id"] = ADMIN
        response = send(case, session, base_url, Credentials(f"Bearer {SECRET}"))
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(
            response,
            checks=CHECKS,
            transport_kwargs={"base_url": base_url, "session": session},
        )

    try:
        await asyncio.to_thread(run)
    finally:
        session.close()
    print(f"\n{label} [{mode}]: {dict(sorted(statuses.items()))}")
    assert statuses


@schemathesis_uses_random
@pytest.mark.parametrize("label", [label for label in OPERATIONS if "openapi.json" not in label])
async def test_wrong_or_no_secret_is_401(schema: tuple[BaseSchema, str], label: str) -> None:
    found, base_url = schema
    operation = found.find_operation_by_label(label)
    assert operation is not None
    session = loopback_session()
    wrong = [
        Credentials(None),
        Credentials(f"Bearer {SECRET[:-1]}"),
        Credentials(f"Bearer {SECRET}x"),
        Credentials(f"Basic {SECRET}"),
        Credentials("Bearer "),
    ]

    @fuzz_settings(UNAUTHORISED_EXAMPLES)
    @given(
        case=st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        ),
        credentials=st.sampled_from(wrong),
    )
    def run(case: Case, credentials: Credentials) -> None:
        response = send(case, session, base_url, credentials)
        body: Any = parse_json(response)
        assert response.status_code == 401, (response.status_code, body)
        assert body["errcode"] in ("M_MISSING_TOKEN", "M_UNKNOWN_TOKEN"), body

    try:
        await asyncio.to_thread(run)
    finally:
        session.close()
