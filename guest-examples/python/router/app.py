"""Routes a JSON message by its `kind` field to config `route.<kind>`, else to config `default`.

The payload is forwarded unchanged, with the message's key.
"""

from lockgate_sdk import Reject, config, handler, log, publish


@handler
def handle(msg):
    data = msg.json()  # invalid JSON: rejected, never retried
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind is None:
        raise Reject("missing `kind` field")
    if not isinstance(kind, str):
        raise Reject(f"`kind` must be a string, got {type(kind).__name__}")
    topic = config.get(f"route.{kind}") or config.get("default")
    if topic is None:
        raise Reject(f"no route for kind `{kind}` and no `default`")
    log.debug(f"routing {msg.id} (kind `{kind}`) to {topic}")
    publish(topic, msg.payload, key=msg.key)
