"""Property-based API tests generated from the service's own OpenAPI spec: no input may produce a 5xx.

Every operation in ``/openapi.json`` gets Hypothesis-generated requests from schemathesis, in both positive
(schema-valid) and negative (schema-violating) modes, sent with a valid token so they reach validation and
business logic (admin routes get the admin token). A few examples per operation in CI; set
``DELTAPLANE_FUZZ_EXAMPLES`` higher for a deeper run. (The parametrize/from_fixture integration of
schemathesis 4 does not work with pytest 9, so the operations are looped over here with ``@given``.)
"""

import os

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

EXAMPLES = int(os.environ.get("DELTAPLANE_FUZZ_EXAMPLES", "6"))


def test_no_input_produces_a_server_error(service):
    service.admin.open_round("cnn")  # an open round so uploads reach payload validation
    device_token = service.admin.issue_token("fuzzer", "eu")
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.app)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 14
    statuses: dict[str, set[int]] = {}

    def fuzz(op):
        token = service.config.admin_token if op.path.startswith("/admin") else device_token
        strategy = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case):
            headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
            response = case.call(headers=headers)
            case.validate_response(response, checks=[not_a_server_error])
            statuses.setdefault(f"{op.method.upper()} {op.path}", set()).add(response.status_code)

        check()

    for op in operations:
        fuzz(op)
    # the fuzzer really reached the operations (not only auth failures)
    assert all(codes - {401} for codes in statuses.values()), statuses
    assert all(c < 500 for codes in statuses.values() for c in codes)
