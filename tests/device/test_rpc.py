"""JSON-RPC 2.0 framing and dispatch (:mod:`fieldchat.device.rpc`), without sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldchat.device.rpc import MAX_BATCH, Dispatcher, Method, Param, RpcError, notification
from fieldchat.schemas.errors import ConfigError, TransportError, UnknownConversation


def _echo(params: dict[str, Any], context: list[str]) -> object:
    context.append("echo")
    return params


def _fail(params: dict[str, Any], context: list[str]) -> object:
    kind = params["kind"]
    if kind == "config":
        raise ConfigError("bad flag")
    if kind == "transport":
        raise TransportError("no broker")
    if kind == "protocol":
        raise UnknownConversation("unknown conversation x")
    if kind == "rpc":
        raise RpcError(-32000, "busy")
    raise RuntimeError("a bug")


def _unjsonable(params: dict[str, Any], context: list[str]) -> object:
    return {"x": object()}


DISPATCH = Dispatcher(
    [
        Method(
            "echo",
            "",
            (
                Param("s", "string", "", max_length=5),
                Param("n", "integer", "", required=False, minimum=0, maximum=9),
                Param("xs", "string[]", "", required=False),
                Param("f", "number", "", required=False),
                Param("b", "boolean", "", required=False),
            ),
            _echo,
        ),
        Method("fail", "", (Param("kind", "string", ""),), _fail),
        Method("odd", "", (), _unjsonable),
    ]
)


def _handle(request: object, context: list[str] | None = None) -> Any:
    line = request if isinstance(request, bytes) else json.dumps(request).encode()
    reply = DISPATCH.handle(line, context if context is not None else [])
    return None if reply is None else json.loads(reply)


def _call(method: str, params: object, rid: object = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


def test_a_call_by_name_or_by_position() -> None:
    calls: list[str] = []
    assert _handle(_call("echo", {"s": "hi", "n": 2}), calls) == {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"s": "hi", "n": 2},
    }
    assert _handle(_call("echo", ["hi", 3], rid="x"))["result"] == {"s": "hi", "n": 3}
    assert (
        _handle({"jsonrpc": "2.0", "id": None, "method": "echo", "params": {"s": ""}})["id"] is None
    )
    assert calls == ["echo"]


def test_notifications_run_and_get_no_answer() -> None:
    calls: list[str] = []
    request = {"jsonrpc": "2.0", "method": "echo", "params": {"s": "hi"}}
    assert _handle(request, calls) is None
    assert _handle({"jsonrpc": "2.0", "method": "nope"}) is None  # not even an error (§4.1)
    assert calls == ["echo"]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{", -32700),
        (b"\xff\xfe", -32700),
        (b"[" * 100_000, -32700),  # nesting past the parser's recursion limit
        (b"1", -32600),
        (b'"a string"', -32600),
        (b'{"jsonrpc":"2.0","id":1}', -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":7}', -32600),
        (b'{"id":1,"method":"echo"}', -32600),
        (b'{"jsonrpc":"2.0","id":[1],"method":"echo"}', -32600),
        (b'{"jsonrpc":"2.0","id":true,"method":"echo"}', -32600),
        (b"[]", -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":"nope"}', -32601),
        (b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"s":"a","f":NaN}}', -32700),
        (b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"s":"a","f":-Infinity}}', -32700),
    ],
)
def test_malformed_lines_get_their_json_rpc_error(line: bytes, code: int) -> None:
    reply = _handle(line)
    assert reply["jsonrpc"] == "2.0"
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({}, "missing parameter 's'"),
        ({"s": 1}, "parameter 's' must be string"),
        ({"s": "toolong"}, "parameter 's' is too long"),
        ({"s": "a", "n": True}, "parameter 'n' must be integer"),
        ({"s": "a", "n": 1.5}, "parameter 'n' must be integer"),
        ({"s": "a", "n": -1}, "parameter 'n' is below 0"),
        ({"s": "a", "n": 10}, "parameter 'n' is above 9"),
        ({"s": "a", "xs": ["a", 1]}, "parameter 'xs' must be string[]"),
        ({"s": "a", "f": "1"}, "parameter 'f' must be number"),
        ({"s": "a", "b": 0}, "parameter 'b' must be boolean"),
        ({"s": "a", "zz": 1}, "unknown parameter 'zz' for echo"),
        (["a", 1, [], 1.0, True, "extra"], "echo takes 5 params"),
        ("a string", "params must be an object or an array"),
        ({"s": "\ud800"}, "parameter 's' is not valid Unicode"),
        ({"s": "a", "xs": ["\udfff"]}, "parameter 'xs' is not valid Unicode"),
    ],
)
def test_invalid_params_say_which(params: object, says: str) -> None:
    calls: list[str] = []
    reply = _handle(_call("echo", params), calls)
    assert reply["error"] == {"code": -32602, "message": says}
    assert calls == [], "the handler never runs with bad params"


@pytest.mark.parametrize(
    ("kind", "code", "data"),
    [
        ("config", 1001, {"reason": "config", "kind": "config"}),
        ("transport", 1002, {"reason": "transport", "kind": "transport"}),
        ("protocol", 1003, {"reason": "unknown_conversation", "kind": "protocol"}),
        ("rpc", -32000, None),
        ("bug", -32603, None),
    ],
)
def test_errors_of_a_method_are_typed(kind: str, code: int, data: object) -> None:
    reply = _handle(_call("fail", {"kind": kind}, rid=9))
    assert reply["id"] == 9
    assert reply["error"]["code"] == code
    assert reply["error"].get("data") == data


def test_a_result_that_is_not_json_is_an_internal_error() -> None:
    reply = _handle(_call("odd", {}))
    assert reply["error"]["code"] == -32603


def test_a_batch_answers_each_call_in_order() -> None:
    batch = [
        _call("echo", {"s": "a"}, rid=1),
        {"jsonrpc": "2.0", "method": "echo", "params": {"s": "n"}},
        _call("nope", {}, rid=2),
        "junk",
        _call("fail", {"kind": "config"}, rid=3),
    ]
    replies = _handle(batch)
    assert [(r.get("id"), "error" in r) for r in replies] == [
        (1, False),
        (2, True),
        (None, True),
        (3, True),
    ]
    assert replies[2]["error"]["code"] == -32600
    only_notifications = [{"jsonrpc": "2.0", "method": "echo", "params": {"s": "n"}}]
    assert _handle(only_notifications) is None


def test_a_batch_is_bounded() -> None:
    reply = _handle([_call("echo", {"s": "a"}, rid=i) for i in range(MAX_BATCH + 1)])
    assert reply["error"]["code"] == -32600


def test_notification_lines() -> None:
    line = notification("event", {"type": "gap", "cid": "é"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "jsonrpc": "2.0",
        "method": "event",
        "params": {"type": "gap", "cid": "é"},
    }


def test_two_methods_of_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="two methods"):
        Dispatcher([Method("a", "", (), _echo), Method("a", "", (), _echo)])


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_requests = st.fixed_dictionaries(
    {
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
        "method": st.sampled_from(["echo", "fail", "odd", "x", 1]),
    },
    optional={"id": _json, "params": _json},
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        _json.map(lambda v: json.dumps(v).encode()),
        _requests.map(lambda v: json.dumps(v).encode()),
        st.lists(_requests, max_size=5).map(lambda v: json.dumps(v).encode()),
    )
)
def test_any_line_gets_a_json_rpc_answer_or_none(line: bytes) -> None:
    reply = DISPATCH.handle(line, [])
    if reply is None:
        return
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    answers = json.loads(reply)
    for answer in answers if isinstance(answers, list) else [answers]:
        assert answer["jsonrpc"] == "2.0" and "id" in answer
        assert ("result" in answer) != ("error" in answer)
        if "error" in answer:
            assert isinstance(answer["error"]["code"], int) and answer["error"]["message"]
