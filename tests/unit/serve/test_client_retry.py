"""The client retries UNAVAILABLE (and only that, by default) with bounded, jittered backoff, and counts it.

A real gRPC server on loopback whose Predict fails with a scripted status a given number of times first."""

from __future__ import annotations

import socket
import time
from concurrent import futures

import grpc
import pytest

from cl_service.serve.client import Client, pb2, pb2_grpc

pytestmark = pytest.mark.timeout(60)


class _Flaky(pb2_grpc.ContinualLearningServicer):
    """Fails the first ``n`` calls with ``code``, then answers ``ok-<call number>``."""

    def __init__(self, n: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.n, self.code, self.calls = n, code, 0

    def Predict(self, request, context):
        self.calls += 1
        if self.calls <= self.n:
            context.abort(self.code, f"scripted failure {self.calls}")
        return pb2.PredictResponse(answer=f"ok-{self.calls}")

    def ListExperts(self, request, context):
        self.calls += 1
        if self.calls <= self.n:
            context.abort(self.code, "scripted failure")
        return pb2.ListExpertsResponse(experts=[pb2.Expert(id="expert:RS", task="RS")])


def _serve(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb2_grpc.add_ContinualLearningServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _fast(port: int, **kw) -> Client:
    return Client(f"127.0.0.1:{port}", retry_initial_backoff_s=0.01, retry_max_backoff_s=0.05, **kw)


def test_unavailable_is_retried_until_answered_and_counted():
    flaky = _Flaky(3)
    server, port = _serve(flaky)
    try:
        with _fast(port) as c:
            assert c.predict([b"x"], "q", timeout=10).answer == "ok-4"
            assert (c.retried, c.retried_calls, flaky.calls) == (3, 1, 4)
            assert c.predict([b"x"], "q", timeout=10).answer == "ok-5"  # no failure: no retry
            assert (c.retried, c.retried_calls) == (3, 1)
            flaky.calls, flaky.n = 0, 2
            assert [e.task for e in c.list_experts().experts] == ["RS"]  # ListExperts too
            assert (c.retried, c.retried_calls) == (5, 2)
    finally:
        server.stop(None)


def test_retries_are_bounded_by_count_and_off_with_zero():
    flaky = _Flaky(100)
    server, port = _serve(flaky)
    try:
        with _fast(port, retries=2) as c, pytest.raises(grpc.RpcError) as ei:
            c.predict([b"x"], "q", timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and flaky.calls == 3 and c.retried == 2
        flaky.calls = 0
        with _fast(port, retries=0) as c, pytest.raises(grpc.RpcError):
            c.predict([b"x"], "q", timeout=10)
        assert flaky.calls == 1 and c.retried == 0
    finally:
        server.stop(None)


def test_retries_stop_at_the_deadline():
    flaky = _Flaky(10_000)
    server, port = _serve(flaky)
    try:
        with Client(f"127.0.0.1:{port}", retries=1000, retry_deadline_s=1.0, retry_initial_backoff_s=0.05,
                    retry_max_backoff_s=0.2) as c:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as ei:
                c.predict([b"x"], "q", timeout=10)
            took = time.monotonic() - t0
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert took < 1.5 and 3 <= c.retried == flaky.calls - 1, (took, c.retried)
    finally:
        server.stop(None)


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_other_codes_are_not_retried_unless_asked(code):
    flaky = _Flaky(1, code)
    server, port = _serve(flaky)
    try:
        with _fast(port) as c, pytest.raises(grpc.RpcError) as ei:
            c.predict([b"x"], "q", timeout=10)
        assert ei.value.code() == code and flaky.calls == 1 and c.retried == 0
        flaky.calls = 0
        with _fast(port, retry_codes=("UNAVAILABLE", code.name)) as c:
            assert c.predict([b"x"], "q", timeout=10).answer == "ok-2" and c.retried == 1
    finally:
        server.stop(None)


def test_no_server_fails_unavailable_within_the_bound():
    with socket.socket() as s:  # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        with Client(f"127.0.0.1:{s.getsockname()[1]}", retries=3, retry_initial_backoff_s=0.01,
                    retry_max_backoff_s=0.02) as c:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as ei:
                c.predict([b"x"], "q", timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and c.retried == 3
    assert time.monotonic() - t0 < 5
