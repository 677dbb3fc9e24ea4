"""Event kinds are enums whose JSON form (``listen --json``) is the plain string."""

from __future__ import annotations

import json

from fieldchat.device.events import EventType, GapDetected, ReceiptKind, ReceiptReceived


def test_event_kinds_read_as_the_strings_scripts_consume() -> None:
    receipt = ReceiptReceived("c", "p", ReceiptKind.DELIVERED, 3)
    assert json.loads(json.dumps(receipt.to_json())) == {
        "type": "receipt",
        "cid": "c",
        "sender": "p",
        "kind": "delivered",
        "steps": 3,
    }
    assert receipt.type is EventType.RECEIPT
    assert GapDetected("c", "p", 0, 0, 1, 2).to_json()["type"] == "gap"
