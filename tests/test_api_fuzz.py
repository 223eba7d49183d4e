"""Thousands of generated requests to /v1 (schemathesis, from our OpenAPI document): no 5xx.

Valid and invalid requests are generated for every operation and sent over the agent's
real unix socket; every answer must be a non-5xx JSON answer, and documented answers must
match their schema. Bounded: a fixed number of examples, about half a minute.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from tests.test_api_support import LIVE_PEER, OPENAPI, AgentProcess, agent_config, free_port

#: Requests to send in all (generation costs ~12 ms each): about 50 s on 2 cores.
EXAMPLES = 2000


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    sock = tmp / "health.sock"
    proc = AgentProcess(tmp, agent_config(str(sock), free_port(), peers=LIVE_PEER),
                        socket_path=sock)
    proc.start()
    try:
        proc.wait_serving()
        proc.wait_rounds(1)
        yield proc
    finally:
        proc.stop()


def case_strategy() -> st.SearchStrategy:
    schema = schemathesis.openapi.from_dict(json.loads(OPENAPI.read_text()))
    strategies = []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/v1/events":
            continue  # a stream that does not end: tests/test_events_api.py covers its queries
        strategies.append(op.as_strategy(GenerationMode.POSITIVE))
        if list(op.iter_parameters()):
            strategies.append(op.as_strategy(GenerationMode.NEGATIVE))
    return st.one_of(strategies)


def test_generated_requests_never_get_a_server_error(agent: AgentProcess) -> None:
    sent: list[int] = []
    started = time.monotonic()
    transport = httpx.HTTPTransport(uds=agent.socket_path)
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=10) as client:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=case_strategy())
        def check(case: schemathesis.Case) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://localhost")
            kwargs.pop("verify", None)
            kwargs.pop("cookies", None)
            resp = client.request(**kwargs)
            sent.append(resp.status_code)
            assert resp.status_code < 500, (case.as_curl_command(), resp.text)
            case.validate_response(
                resp,
                checks=[not_a_server_error, content_type_conformance,
                        response_schema_conformance],
            )

        check()
    elapsed = time.monotonic() - started
    assert len(sent) >= 2000, f"only {len(sent)} requests were sent"
    assert elapsed < 120, f"the fuzz run took {elapsed:.0f}s"
    # Both valid and invalid requests were exercised.
    assert any(s == 200 for s in sent) and any(400 <= s < 500 for s in sent)
    assert agent.proc is not None and agent.proc.poll() is None
    assert "Traceback" not in agent.log()
