"""Keeps a number per message key in kv (`count/<key>`, stored as decimal text): adds the payload
(an integer; empty adds 1) and publishes the sum to config `target`, keyed like the message.

The same handler exists in every SDK language; `tests/fixtures/counter` checks that they all
store, read and add the same way.
"""

from lockgate_sdk import Reject, config, handler, kv, publish


@handler
def handle(msg):
    key = msg.key_text()
    if key is None:
        raise Reject("no key: the count is kept per message key")
    text = msg.text().strip()
    try:
        add = int(text) if text else 1
    except ValueError:
        raise Reject(f"payload {text!r} is not an integer") from None
    slot = f"count/{key}"
    stored = kv.get(slot)
    try:
        current = int(stored) if stored is not None else 0
    except ValueError:
        raise Reject(f"{slot} holds {stored!r}, not a number") from None
    total = current + add
    kv.set(slot, total)  # an int is stored as its decimal digits
    target = config.get("target")
    if target is None:
        raise Reject("config `target` is not set")
    publish(target, total, key=key)
