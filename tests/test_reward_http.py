"""The `http` built-in reward against a real HTTP server on 127.0.0.1."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reward import RewardError, build_reward

TOKEN_ENV = "RLHF_TEST_REWARD_TOKEN"


class ScoringServer:
    """Answers each POST with the next scripted action; records every request it gets.

    Actions: ("ok", body_fn) -> 200 with json(body_fn(request body)); ("auth", (token, body_fn))
    -> like "ok" if the request has ``Authorization: Bearer <token>``, else 401;
    ("status", code) -> that code; ("raw", bytes) -> 200 with those bytes; ("sleep", seconds)
    -> no answer before that delay.
    The last action repeats once the script runs out.
    """

    def __init__(self):
        self.script = []
        self.requests = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"headers": dict(self.headers), "body": body})
                index = min(len(server.requests), len(server.script)) - 1
                kind, value = server.script[index]
                if kind == "sleep":
                    server.release.wait(value)
                    return  # the client gave up long ago
                if kind == "auth":
                    token, value = value
                    if self.headers.get("Authorization") != f"Bearer {token}":
                        kind, value = "status", 401
                if kind == "status":
                    self._send(value, b'{"error": "scripted failure"}')
                elif kind == "raw":
                    self._send(200, value)
                else:
                    self._send(200, json.dumps(value(body)).encode())

            def _send(self, code, payload):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = ScoringServer()
    yield srv
    srv.close()


def _lengths(body):
    return {"scores": [len(r) / 10 for r in body["responses"]]}


def _http(url, **args):
    return build_reward({"name": "http", "args": {"url": url, "backoff": 0.01, **args}})


def test_success_with_auth_header(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    server.script = [("auth", ("s3cret", _lengths))]
    reward = _http(server.url, auth_env=TOKEN_ENV, headers={"X-Client": "rlhf-test"})
    result = reward(["p1", "p2"], ["abcde", "abcdefghij"])
    assert result.total == [0.5, 1.0]
    [request] = server.requests
    assert request["body"] == {"prompts": ["p1", "p2"], "responses": ["abcde", "abcdefghij"]}
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-Client"] == "rlhf-test"


def test_wrong_token_is_a_401_without_retry(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    server.script = [("auth", ("s3cret", _lengths))]
    with pytest.raises(RewardError, match=f"HTTP 401 Unauthorized from POST {server.url}"):
        _http(server.url, auth_env=TOKEN_ENV)(["p"], ["a"])
    assert len(server.requests) == 1


def test_bare_list_response(server):
    server.script = [("ok", lambda body: [1.5, -2])]
    assert _http(server.url)(["p", "q"], ["a", "b"]).total == [1.5, -2.0]


def test_missing_auth_env_fails_at_build(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(RewardError) as err:
        _http("http://127.0.0.1:9/score", auth_env=TOKEN_ENV)
    assert err.value.reward == "http" and f"'{TOKEN_ENV}', which is not set" in str(err.value)


def test_timeout_retries_then_fails(server):
    server.script = [("sleep", 5.0)]
    reward = _http(server.url, timeout=0.2, retries=2)
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        reward(["p"], ["r"])
    elapsed = time.monotonic() - start
    assert len(server.requests) == 3
    assert 0.6 <= elapsed < 2.5
    message = str(err.value)
    assert message.startswith(f"reward 'http': raised RuntimeError: POST {server.url} failed: ")
    assert "timed out" in message and "gave up after 3 attempts" in message


def test_server_error_is_retried(server):
    server.script = [("status", 500), ("status", 503), ("ok", _lengths)]
    assert _http(server.url, retries=2)(["p"], ["abc"]).total == [pytest.approx(0.3)]
    assert len(server.requests) == 3


def test_server_error_gives_up_after_retries(server):
    server.script = [("status", 502)]
    with pytest.raises(RewardError) as err:
        _http(server.url, retries=1)(["p"], ["abc"])
    assert len(server.requests) == 2
    assert f"HTTP 502 Bad Gateway from POST {server.url}" in str(err.value)
    assert "gave up after 2 attempts" in str(err.value)


def test_client_error_is_not_retried(server):
    server.script = [("status", 400), ("ok", _lengths)]
    with pytest.raises(RewardError) as err:
        _http(server.url, retries=3)(["p"], ["abc"])
    assert len(server.requests) == 1
    assert str(err.value) == (f"reward 'http': raised RuntimeError: HTTP 400 Bad Request from "
                              f"POST {server.url}: {{\"error\": \"scripted failure\"}}")


def test_bad_json_response(server):
    server.script = [("raw", b"<html>not json</html>")]
    with pytest.raises(RewardError) as err:
        _http(server.url)(["p"], ["abc"])
    assert f"POST {server.url} returned invalid JSON" in str(err.value)
    assert "b'<html>not json</html>'" in str(err.value)
    assert len(server.requests) == 1


def test_unexpected_json_shape(server):
    server.script = [("ok", lambda body: {"score": 1.0})]
    with pytest.raises(RewardError, match="expected a list or an object with 'scores'"):
        _http(server.url)(["p"], ["abc"])


def test_wrong_count_from_server_names_reward(server):
    server.script = [("ok", lambda body: {"scores": [1.0]})]
    with pytest.raises(RewardError, match=r"^reward 'http': returned 1 scores for 2 responses$"):
        _http(server.url)(["p", "q"], ["a", "b"])


def test_connection_refused_is_retried():
    with socket.socket() as sock:  # a port nothing listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RewardError) as err:
        _http(url, retries=1)(["p"], ["a"])
    assert f"POST {url} failed: ConnectionRefusedError" in str(err.value)
    assert "gave up after 2 attempts" in str(err.value)


@pytest.mark.parametrize("args, text", [
    ({"url": "file:///etc/passwd"}, "url must start with http:// or https://"),
    ({"url": "http://127.0.0.1:9/", "retries": -1}, "retries must be a non-negative integer"),
    ({"url": "http://127.0.0.1:9/", "timeout": 0}, "timeout must be positive"),
])
def test_bad_args(args, text):
    with pytest.raises(RewardError, match="cannot build it") as err:
        build_reward({"name": "http", "args": args})
    assert text in str(err.value)
