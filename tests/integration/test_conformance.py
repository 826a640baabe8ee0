"""The Application Service API against the Matrix spec's OpenAPI document, fuzzed by schemathesis.

The bridge runs in this process (`offline_bridge`, SQLite, homeserver unreachable) and is reached
over real HTTP on loopback. Schemathesis generates requests from `tests/spec/as-api.json` (Matrix
v1.19), schema-valid ("positive") and schema-violating ("negative"), and sends them through a
`requests` session that refuses any host but 127.0.0.1: the document's `servers` (matrix.org)
are never contacted.

- With the right `hs_token`: no server error; every answer is JSON (a JSON media type and a body
  that parses as strict JSON); errors are Matrix errors with the errcode their status implies;
  documented answers match their documented schema; schema-valid input is accepted; a status the
  document does not list must be one of those justified below.
- Without a token, every documented operation answers 401 M_UNAUTHORIZED; with a wrong one (in
  the Authorization header, in the legacy `access_token` query parameter, or the two
  disagreeing), 403 M_FORBIDDEN.
- Bodies the schema cannot express (not JSON, not UTF-8, NaN, over the size limit, deeply nested,
  lone surrogates, NUL characters) and user IDs in the bridge's own namespace get explicit cases.
  NUL matters most on PostgreSQL, whose text type refuses it; these cases run on SQLite here.

Statuses the bridge returns that as-api.json does not list, and why they are right.
as-api.json documents only 200 for `PUT /transactions/{txnId}` and `POST /ping`, yet both answer
401 M_UNAUTHORIZED when the homeserver sends no token and 403 M_FORBIDDEN when it sends a wrong
one, exactly like the query endpoints whose 401/403 are documented: the spec prose (Application
Service API, Authorization) requires this of every request the homeserver makes. The two
operations that carry a body also answer 400 M_NOT_JSON when the body is not JSON (empty for a
transaction, not UTF-8, a syntax error, NaN/Infinity, nesting deeper than the parser allows),
400 M_BAD_JSON when it is JSON of the wrong shape (transactions: not an object with an `events`
array; ping: not an object, or a non-string `transaction_id`), 400 M_INVALID_PARAM for a txnId
longer than 255 characters, and 413 M_TOO_LARGE for a body over `appservice.max_body_size`
(declared in Content-Length or found while reading a chunked body). These are the spec's common
error codes for exactly these cases: a 4xx tells the homeserver the request itself is at fault,
where a 200 would acknowledge a transaction that delivered nothing, and refusing an oversized body
before buffering it protects the bridge's memory. (as-api.json does not mark the transaction body
`required`, so a PUT without one is schema-valid there; it carries no events and gets 400
M_NOT_JSON.) Malformed *events* inside a well-formed transaction do not change its status: the
transaction is acknowledged with 200 and the bad events are kept as dead letters, so one bad event
cannot wedge the homeserver's retry queue; that is why schemathesis' `negative_data_rejection`
check (a 4xx for any schema violation) is not used. A path that matches no operation (e.g. an
empty path parameter) gets 404 M_UNRECOGNIZED, and a known path with the wrong method 405
M_UNRECOGNIZED with an Allow header, as the spec prescribes for unknown routes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    CheckContext,
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response
from schemathesis.schemas import APIOperation, BaseSchema

from bridge.db.schema import ghost
from tests.conftest import InProcessBridge

# Kept in the repository (tests/spec/README.md: source, licence).
SPEC = Path(__file__).resolve().parents[1] / "spec" / "as-api.json"
PREFIX = "/_matrix/app/v1"
TRANSACTIONS = f"PUT {PREFIX}/transactions/{{txnId}}"
PING = f"POST {PREFIX}/ping"
USERS = f"GET {PREFIX}/users/{{userId}}"
LOOPBACK = "127.0.0.1"

# Examples per operation and scenario; 9 operations in as-api.json.
AUTHORISED_EXAMPLES = 100
UNAUTHORISED_EXAMPLES = 30

# Statuses the bridge may return beyond the documented ones (see the module docstring).
EXTRA_STATUSES = {TRANSACTIONS: {400, 413}, PING: {400, 413}}
ERRCODES = {
    400: {"M_NOT_JSON", "M_BAD_JSON", "M_INVALID_PARAM"},
    401: {"M_UNAUTHORIZED"},
    403: {"M_FORBIDDEN"},
    404: {"M_NOT_FOUND", "M_UNRECOGNIZED"},
    413: {"M_TOO_LARGE"},
}

# Schemathesis' strategies draw from the `random` module, which Hypothesis reports (only sometimes,
# which then also makes it call the example flaky); it is theirs to fix, not this test's.
schemathesis_uses_random = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

pytestmark = [
    pytest.mark.parametrize("db_url", ["sqlite"], indirect=True),
]


def load_schema() -> BaseSchema:
    # An explicit, default configuration: no schemathesis.toml from the working directory applies.
    return schemathesis.openapi.from_path(SPEC, config=schemathesis.Config())


def operation_labels() -> list[str]:
    labels = []
    for result in load_schema().get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # an operation schemathesis cannot read: fail, don't skip it
        labels.append(result.ok().label)
    return labels


OPERATIONS = operation_labels()


# --- Transport: real HTTP, loopback only -------------------------------------------------------


class LoopbackOnlyAdapter(requests.adapters.HTTPAdapter):
    """Refuses any request that would leave the machine (the spec's servers are matrix.org)."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        host = urlsplit(request.url).hostname
        if host != LOOPBACK:
            raise AssertionError(f"refusing to send a request off this machine: {request.url}")
        return super().send(request, *args, **kwargs)


def loopback_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no HTTP(S)_PROXY, no .netrc
    adapter = LoopbackOnlyAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# --- Checks (schemathesis check functions: ctx, response, case) -------------------------------


def header(response: Response, name: str) -> str | None:
    for key, values in response.headers.items():
        if key.lower() == name.lower() and values:
            return values[0]
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(response: Response) -> Any:
    return json.loads(response.content.decode("utf-8"), parse_constant=_reject_constant)


def json_response(ctx: CheckContext, response: Response, case: Case) -> None:
    """A JSON media type and a body that parses as strict JSON; errors are Matrix errors."""
    content_type = header(response, "Content-Type")
    media_type = (content_type or "").split(";")[0].strip().lower()
    assert media_type == "application/json" or media_type.endswith("+json"), (
        f"{response.status_code} answer has Content-Type {content_type!r}, not JSON"
    )
    try:
        body = parse_json(response)
    except (UnicodeDecodeError, ValueError) as e:
        raise AssertionError(
            f"{response.status_code} answer is not valid JSON ({e}): {response.content[:200]!r}"
        ) from None
    if response.status_code >= 400:
        assert isinstance(body, dict), f"{response.status_code} error body is not an object"
        assert isinstance(body.get("errcode"), str), (
            f"{response.status_code} error body has no errcode: {body!r}"
        )
        expected = ERRCODES.get(response.status_code)
        if expected is not None:
            assert body["errcode"] in expected, (
                f"{response.status_code} came with errcode {body['errcode']}, "
                f"expected one of {sorted(expected)}"
            )


def token_accepted(ctx: CheckContext, response: Response, case: Case) -> None:
    assert response.status_code not in (401, 403), (
        f"the right hs_token was refused: {response.status_code} {response.content[:200]!r}"
    )


def known_status(ctx: CheckContext, response: Response, case: Case) -> None:
    """Documented statuses, plus the justified extras of EXTRA_STATUSES."""
    label = case.operation.label
    documented = {int(code) for code in case.operation.responses.status_codes if code.isdigit()}
    allowed = documented | EXTRA_STATUSES.get(label, set())
    assert response.status_code in allowed, (
        f"{label} answered {response.status_code}, neither documented {sorted(documented)} "
        f"nor a justified extra {sorted(EXTRA_STATUSES.get(label, set()))}"
    )


def txn_id_too_long(case: Case) -> bool:
    # Generated path parameters are already percent-encoded; the bridge counts decoded characters.
    txn_id = case.path_parameters.get("txnId")
    return isinstance(txn_id, str) and len(unquote(txn_id)) > 255


def positive_data_accepted(ctx: CheckContext, response: Response, case: Case) -> None:
    """Schema-valid input is accepted (the exceptions are explained in the module docstring)."""
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    label = case.operation.label
    if label == TRANSACTIONS and isinstance(case.body, NotSet):
        # as-api.json does not mark this request body required, but a transaction without
        # one carries nothing: 400 M_NOT_JSON.
        assert response.status_code == 400, (
            f"a transaction without a body got {response.status_code}"
        )
    elif label == TRANSACTIONS and txn_id_too_long(case):
        assert response.status_code == 400, f"a txnId over 255 got {response.status_code}"
    elif label in (TRANSACTIONS, PING):
        assert response.status_code == 200, (
            f"schema-valid {label} answered {response.status_code}, not 200"
        )
    else:
        assert response.status_code in (200, 404), (
            f"schema-valid {label} answered {response.status_code}"
        )


AUTHORISED_CHECKS = [
    not_a_server_error,
    json_response,
    token_accepted,
    known_status,
    content_type_conformance,
    response_schema_conformance,
    positive_data_accepted,
]
UNAUTHORISED_CHECKS = [not_a_server_error, json_response]


# --- The API under test ------------------------------------------------------------------------


class Credentials(requests.auth.AuthBase):
    """The credentials a request carries, whatever schemathesis generated.

    Applied when `requests` prepares the request, after schemathesis has built it: the generated
    Authorization header (random, or deliberately missing or malformed in negative mode) is
    replaced, and schemathesis' own handling of negated security parameters cannot undo it.
    """

    def __init__(self, header: str | None, query_token: str | None = None) -> None:
        self.header = header
        self.query_token = query_token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.pop("Authorization", None)
        if self.header is not None:
            request.headers["Authorization"] = self.header
        if self.query_token is not None:
            request.prepare_url(request.url, {"access_token": self.query_token})
        return request

    def __repr__(self) -> str:
        return f"Credentials({self.header!r}, {self.query_token!r})"


@dataclass
class Api:
    bridge: InProcessBridge
    schema: BaseSchema
    session: requests.Session
    seen: Counter[tuple[str, int, str]] = field(default_factory=Counter)

    @property
    def base_url(self) -> str:
        return self.bridge.base_url

    @property
    def token(self) -> str:
        return self.bridge.hs_token

    @property
    def authorised(self) -> Credentials:
        return Credentials(f"Bearer {self.token}")

    def operation(self, label: str) -> APIOperation:
        operation = self.schema.find_operation_by_label(label)
        assert operation is not None, label
        return operation

    def call(
        self,
        case: Case,
        checks: list[Callable[..., Any]],
        credentials: Credentials,
        **kwargs: Any,
    ) -> Response:
        """Send `case` to the bridge (never elsewhere) and run `checks`; failures raise."""
        # A generated legacy `access_token` query parameter would override `credentials`.
        without(case.query, "access_token")
        response = case.call(
            base_url=self.base_url, session=self.session, auth=credentials, **kwargs
        )
        assert response.request.url.startswith(self.base_url + "/"), response.request.url
        try:
            errcode = parse_json(response).get("errcode", "")
        except (UnicodeDecodeError, ValueError, AttributeError):
            errcode = "?"
        self.seen[(case.operation.label, response.status_code, errcode)] += 1
        case.validate_response(
            response,
            checks=checks,
            transport_kwargs={"base_url": self.base_url, "session": self.session},
        )
        return response

    def summary(self) -> str:
        return "\n".join(
            f"  {count:4d} x {status} {errcode or '-':16s} {label}"
            for (label, status, errcode), count in sorted(self.seen.items())
        )


def without(mapping: MutableMapping[str, Any] | None, name: str) -> None:
    """Remove `name` from a generated headers or query mapping, whatever its case."""
    if mapping is None:
        return
    for key in [k for k in mapping if k.lower() == name.lower()]:
        del mapping[key]


@pytest.fixture
def api(offline_bridge: InProcessBridge) -> Iterator[Api]:
    schema = load_schema()
    # Any URL schemathesis builds on its own (checks that re-send a request) points here too.
    schema.config.update(base_url=offline_bridge.base_url, request_timeout=10)
    session = loopback_session()
    try:
        yield Api(offline_bridge, schema, session)
    finally:
        session.close()


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,  # real HTTP and a real database: timing varies
        database=None,  # nothing written to .hypothesis/
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
        print_blob=True,
    )


# --- With the right token ----------------------------------------------------------------------


@schemathesis_uses_random
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("label", OPERATIONS)
async def test_fuzz_with_hs_token(api: Api, label: str, mode: GenerationMode) -> None:
    operation = api.operation(label)

    @fuzz_settings(AUTHORISED_EXAMPLES)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        api.call(case, AUTHORISED_CHECKS, api.authorised)

    await asyncio.to_thread(run)
    print(f"\n{label} [{mode}]:\n{api.summary()}")


# --- Without a token, with a wrong one ---------------------------------------------------------


def any_case(operation: APIOperation) -> st.SearchStrategy[Case]:
    return st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )


def assert_refused(response: Response, status: int, errcode: str) -> None:
    body = parse_json(response)
    assert (response.status_code, body.get("errcode")) == (status, errcode), (
        f"{response.request.method} {response.request.url} answered {response.status_code} "
        f"{response.content[:200]!r}; expected {status} {errcode}"
    )


@schemathesis_uses_random
@pytest.mark.parametrize("label", OPERATIONS)
async def test_missing_token_is_401(api: Api, label: str) -> None:
    operation = api.operation(label)

    @fuzz_settings(UNAUTHORISED_EXAMPLES)
    @given(case=any_case(operation))
    def run(case: Case) -> None:
        response = api.call(case, UNAUTHORISED_CHECKS, Credentials(None))
        assert "authorization" not in {k.lower() for k in response.request.headers}
        assert "access_token" not in (urlsplit(response.request.url).query or "")
        assert_refused(response, 401, "M_UNAUTHORIZED")

    await asyncio.to_thread(run)
    print(f"\n{label} [no token]:\n{api.summary()}")


def wrong_credentials(api: Api) -> list[Credentials]:
    """Authorization headers and legacy access_token query parameters that must be refused."""
    token = api.token
    flipped = token[:-1] + ("0" if token[-1] != "0" else "1")
    return [
        Credentials(f"Bearer {flipped}"),
        Credentials(f"Bearer {token[:-1]}"),
        Credentials(f"Bearer {token}x"),
        Credentials(f"Bearer {token.upper()}"),
        Credentials(f"Bearer {api.bridge.config.appservice.as_token}"),  # the other token
        Credentials(f"Basic {token}"),
        Credentials("Bearer"),
        Credentials("Bearer "),
        Credentials(None, flipped),  # legacy query parameter only
        Credentials(None, ""),
        Credentials(f"Bearer {token}", flipped),  # header and query parameter disagree
        Credentials(f"Bearer {flipped}", token),
    ]


@schemathesis_uses_random
@pytest.mark.parametrize("label", OPERATIONS)
async def test_wrong_token_is_403(api: Api, label: str) -> None:
    operation = api.operation(label)
    # None: the Authorization header schemathesis generated (a random bearer token, or a
    # malformed value in negative mode).
    credentials = st.one_of(st.none(), st.sampled_from(wrong_credentials(api)))

    @fuzz_settings(UNAUTHORISED_EXAMPLES)
    @given(case=any_case(operation), wrong=credentials)
    def run(case: Case, wrong: Credentials | None) -> None:
        if wrong is None:
            generated = (case.headers or {}).get("Authorization")
            wrong = Credentials(generated if generated is not None else "Bearer wrong")
        response = api.call(case, UNAUTHORISED_CHECKS, wrong)
        assert_refused(response, 403, "M_FORBIDDEN")

    await asyncio.to_thread(run)
    print(f"\n{label} [wrong token]:\n{api.summary()}")


# --- Hostile bodies the schema cannot express --------------------------------------------------


def event(**overrides: Any) -> dict[str, Any]:
    return {
        "event_id": f"${uuid.uuid4().hex}",
        "room_id": "!room:localhost",
        "sender": "@someone:localhost",
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": "hello"},
        "origin_server_ts": 1_700_000_000_000,
    } | overrides


def transaction(*events: dict[str, Any]) -> bytes:
    # json.dumps escapes lone surrogates and NUL as \uXXXX: still valid JSON text.
    return json.dumps({"events": list(events)}).encode()


DEEP = 100_000
# (operation, body or body for the size limit, acceptable statuses, id)
HOSTILE_BODIES: list[tuple[str, bytes | Callable[[int], bytes], set[int], str]] = [
    (TRANSACTIONS, b"", {400}, "txn-empty"),
    (TRANSACTIONS, b"not json", {400}, "txn-syntax"),
    (TRANSACTIONS, b"\xff\xfe{}", {400}, "txn-not-utf8"),
    (TRANSACTIONS, b'{"events": [], "x": NaN}', {400}, "txn-nan"),
    (TRANSACTIONS, b'{"events": [], "x": -Infinity}', {400}, "txn-infinity"),
    (TRANSACTIONS, b"[]", {400}, "txn-array"),
    (TRANSACTIONS, b'{"events": {}}', {400}, "txn-events-not-list"),
    (TRANSACTIONS, b"[" * DEEP + b"]" * DEEP, {400}, "txn-deep-json"),
    (TRANSACTIONS, transaction(event()), {200}, "txn-ok"),
    (TRANSACTIONS, transaction(event(content=json.loads("[" * 80 + "]" * 80))), {200}, "txn-deep"),
    (TRANSACTIONS, transaction("not an event", 42, None, []), {200}, "txn-bad-events"),
    (TRANSACTIONS, lambda limit: b" " * (limit + 1), {413}, "txn-over-limit"),
    (TRANSACTIONS, transaction(event(type="m.\x00")), {200, 400}, "txn-nul-in-type"),
    (TRANSACTIONS, transaction(event(content={"b": "\x00"})), {200, 400}, "txn-nul-in-content"),
    (TRANSACTIONS, transaction(event(content={"b": "\ud800"})), {200, 400}, "txn-lone-surrogate"),
    (TRANSACTIONS, transaction(event(sender="@\udfff:x")), {200, 400}, "txn-bad-event-surrogate"),
    (PING, b"", {200}, "ping-empty"),
    (PING, b"null", {400}, "ping-null"),
    (PING, b"not json", {400}, "ping-syntax"),
    (PING, b'{"transaction_id": 1}', {400}, "ping-txn-not-string"),
    (PING, b'{"transaction_id": "\\ud800"}', {200, 400}, "ping-lone-surrogate"),
    (PING, lambda limit: b" " * (limit + 1), {413}, "ping-over-limit"),
]


@pytest.mark.parametrize(
    ("label", "body", "statuses"),
    [pytest.param(*case[:3], id=case[3]) for case in HOSTILE_BODIES],
)
async def test_hostile_bodies(
    api: Api, label: str, body: bytes | Callable[[int], bytes], statuses: set[int]
) -> None:
    data = body(api.bridge.config.appservice.max_body_size) if callable(body) else body
    path_parameters = {"txnId": uuid.uuid4().hex} if label == TRANSACTIONS else {}
    await send_hostile(api, label, path_parameters, data, statuses)


@pytest.mark.parametrize(
    ("txn_id", "statuses"),
    [
        pytest.param("t" * 256, {400}, id="too-long"),
        pytest.param("%00", {200, 400}, id="nul"),  # PostgreSQL's text type refuses NUL
    ],
)
async def test_unusual_txn_ids(api: Api, txn_id: str, statuses: set[int]) -> None:
    await send_hostile(api, TRANSACTIONS, {"txnId": txn_id}, transaction(event()), statuses)


async def send_hostile(
    api: Api, label: str, path_parameters: dict[str, str], data: bytes, statuses: set[int]
) -> None:
    case = api.operation(label).Case(
        path_parameters=path_parameters,
        headers={"Content-Type": "application/json"},
        media_type="application/json",
    )
    try:
        response = await asyncio.to_thread(
            api.call, case, AUTHORISED_CHECKS, api.authorised, data=data
        )
    except FailureGroup as e:  # schemathesis' curl line cannot show a body passed as `data`
        raise AssertionError(f"request body ({len(data)} bytes): {data[:300]!r}") from e
    assert response.status_code in statuses, (
        f"{label} with a {len(data)}-byte body answered {response.status_code} "
        f"{response.content[:200]!r}; expected one of {sorted(statuses)}"
    )


async def test_chunked_body_over_limit_is_413(api: Api) -> None:
    limit = api.bridge.config.appservice.max_body_size
    case = api.operation(TRANSACTIONS).Case(
        path_parameters={"txnId": uuid.uuid4().hex}, media_type="application/json"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        yield b'{"events": [], "padding": "'
        yield b"x" * limit
        yield b'"}'

    response = await asyncio.to_thread(
        api.call, case, AUTHORISED_CHECKS, api.authorised, data=chunks()
    )
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413


# --- The bridge's own namespace ----------------------------------------------------------------


async def test_user_query_in_bridge_namespace(api: Api) -> None:
    """User IDs random generation never hits: the bot, a known ghost, an unknown ghost."""
    config = api.bridge.config
    known_ghost = config.ghost_mxid("someone=40example.test")
    async with api.bridge.bridge.db.begin() as conn:
        await conn.execute(
            ghost.insert().values(
                mxid=known_ghost,
                remote_kind="email",
                remote_id="someone@example.test",
                created_at=0,
            )
        )
    expectations = {
        # The bridge's own bot always exists, even with the homeserver unreachable.
        config.bot_mxid: {200},
        known_ghost: {200},
        config.ghost_mxid("nobody.here"): {404},
        f"@{config.appservice.bot_username}:elsewhere.example": {404},
    }
    operation = api.operation(USERS)
    failures = []
    for user_id, statuses in expectations.items():
        case = operation.Case(path_parameters={"userId": user_id})
        try:
            response = await asyncio.to_thread(api.call, case, AUTHORISED_CHECKS, api.authorised)
        except Exception as e:  # collect all, report together
            failures.append(f"{user_id}: {e}")
            continue
        if response.status_code not in statuses:
            failures.append(f"{user_id}: {response.status_code}, expected {sorted(statuses)}")
    assert not failures, "\n".join(failures)


# --- Routes the document does not have ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/users/", 404, None),  # empty path parameter
        ("GET", "/no-such-endpoint", 404, None),
        ("PUT", "/ping", 405, "POST"),
        ("DELETE", "/transactions/1", 405, "PUT"),
    ],
)
async def test_unknown_routes(
    api: Api, method: str, path: str, status: int, allow: str | None
) -> None:
    """The spec's "Unknown routes": 404 (405 for a known path) M_UNRECOGNIZED, as JSON."""

    def send() -> requests.Response:
        return api.session.request(
            method,
            api.base_url + PREFIX + path,
            headers={"Authorization": f"Bearer {api.token}"},
            timeout=10,
        )

    response = await asyncio.to_thread(send)
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert (response.status_code, response.json().get("errcode")) == (status, "M_UNRECOGNIZED")
    if allow is not None:
        assert allow in response.headers.get("Allow", "")
