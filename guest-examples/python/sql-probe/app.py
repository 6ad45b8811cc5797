"""Test instrument for the SQL helper, speaking the protocol of the Rust `sql-probe`
(guest-examples/sql-probe/src/lib.rs): each message is a JSON description of statements and of
how the call ends, and the results are published to config `target` in the same shape, so a test
can run one spec on both and compare what each language sends and reads. The results are also
logged at info (``results <json>``), so they can be read when the call does not succeed.
"""

import datetime
import decimal
import json
import uuid

from lockgate_sdk import Reject, Retry, config, handler, log, publish, sql

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def param(j):
    if isinstance(j, dict):
        if "numeric" in j:
            return decimal.Decimal(j["numeric"])
        if "uuid" in j:
            return uuid.UUID(j["uuid"])
        if "json" in j:
            return sql.Json(j["json"])
        if "date" in j:
            return datetime.date(1970, 1, 1) + datetime.timedelta(days=j["date"])
        if "timestamptz" in j:
            return EPOCH + datetime.timedelta(microseconds=j["timestamptz"])
        if "int64_array" in j:
            return j["int64_array"]
        if "text_array" in j:
            return j["text_array"]
        return sql.Json(j)
    if isinstance(j, list):
        return sql.Json(j)
    return j


def render(v, type_name):
    if v is None:
        return None
    if isinstance(v, decimal.Decimal):
        return {"numeric": str(v)}
    if isinstance(v, uuid.UUID):
        return {"uuid": str(v)}
    if isinstance(v, (bytes, bytearray)):
        return {"bytes": list(v)}
    if isinstance(v, datetime.datetime):
        return {"timestamptz": (v - EPOCH) // datetime.timedelta(microseconds=1)}
    if isinstance(v, datetime.date):
        return {"date": (v - datetime.date(1970, 1, 1)).days}
    if type_name in ("json", "jsonb"):
        return {"json": v}
    if isinstance(v, list):
        kind = "int64_array" if type_name == "_int8" else "text_array"
        return {kind: v}
    return v


def describe(e):
    return {"error": f"{e.kind}: {e.reason}", "code": e.code}


@handler
def handle(msg):
    target = config.get("target") or "sql-results"
    try:
        spec = json.loads(msg.payload)
    except ValueError:
        raise Reject("payload is not JSON") from None
    results = []
    for s in spec.get("statements", []):
        params = [param(p) for p in s.get("params", [])]
        try:
            if s.get("query"):
                rows = sql.query(s["sql"], params)
                types = [t for _, t in rows.columns]
                results.append(
                    {
                        "columns": [name for name, _ in rows.columns],
                        "rows": [
                            [render(v, t) for v, t in zip(r.values(), types)] for r in rows
                        ],
                    }
                )
            else:
                results.append({"affected": sql.execute(s["sql"], params)})
        except sql.SqlError as e:
            results.append(describe(e))
    out = json.dumps({"id": msg.id, "results": results})
    log.info(f"results {out}")
    then = spec.get("then", "ok")
    if msg.attempt <= 1 and "then_first" in spec:
        then = spec["then_first"]
    if then == "retry":
        raise Retry("asked to retry")
    if then == "reject":
        raise Reject("asked to reject")
    if then == "trap":
        raise RuntimeError("asked to trap")
    if then == "hang":
        while True:
            pass
    publish(target, out)
