// Test instrument for the SQL helper, speaking the protocol of the Rust `sql-probe`
// (guest-examples/sql-probe/src/lib.rs): each message is a JSON description of statements and of
// how the call ends, and the results are published to config `target` in the same shape, so a
// test can run one spec on both and compare what each language sends and reads. The results are
// also logged at info (`results <json>`), so they can be read when the call does not succeed.

import { Reject, Retry, config, handler, log, publish } from "lockgate-sdk";
import * as sql from "lockgate-sdk/sql";

function param(j) {
  if (Array.isArray(j)) return sql.json(j);
  if (j === null || typeof j !== "object") return j;
  if ("numeric" in j) return sql.numeric(j.numeric);
  if ("uuid" in j) return sql.uuid(j.uuid);
  if ("json" in j) return sql.json(j.json);
  if ("date" in j) return sql.date(new Date(j.date * 86_400_000));
  if ("timestamptz" in j) return new Date(j.timestamptz / 1000);
  if ("int64_array" in j) return j.int64_array;
  if ("text_array" in j) return j.text_array;
  return sql.json(j);
}

function render(v, typeName) {
  if (v === null) return null;
  if (typeName === "json" || typeName === "jsonb") return { json: v };
  if (typeName === "numeric") return { numeric: v };
  if (typeName === "uuid") return { uuid: v };
  if (typeName === "date") return { date: Date.parse(`${v}T00:00:00Z`) / 86_400_000 };
  if (typeName === "timestamptz") return { timestamptz: v.getTime() * 1000 };
  if (typeName === "bytea") return { bytes: Array.from(v) };
  if (typeName === "_int8") return { int64_array: v.map((x) => (x === null ? null : Number(x))) };
  if (Array.isArray(v)) return { text_array: v };
  return typeof v === "bigint" ? Number(v) : v;
}

export const handle = handler((msg) => {
  const target = config.get("target") ?? "sql-results";
  const spec = msg.json();
  const results = [];
  for (const s of spec.statements ?? []) {
    const params = (s.params ?? []).map(param);
    try {
      if (s.query) {
        const rows = sql.query(s.sql, params);
        results.push({
          columns: rows.columns.map((c) => c.name),
          rows: rows.map((r) => rows.columns.map((c) => render(r[c.name], c.typeName))),
        });
      } else {
        results.push({ affected: sql.execute(s.sql, params) });
      }
    } catch (e) {
      if (!(e instanceof sql.SqlError)) throw e;
      results.push({ error: `${e.kind.replace("-", "_")}: ${e.reason}`, code: e.code ?? null });
    }
  }
  const out = JSON.stringify({ id: msg.id, results });
  log.info(`results ${out}`);
  const then = msg.attempt <= 1 && spec.then_first !== undefined ? spec.then_first : (spec.then ?? "ok");
  if (then === "retry") throw new Retry("asked to retry");
  if (then === "reject") throw new Reject("asked to reject");
  if (then === "trap") throw new Error("asked to trap");
  if (then === "hang") for (;;);
  publish(target, out);
});
