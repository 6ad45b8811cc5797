// SQL on the handler's PostgreSQL database, in the message's own transaction.
//
//   import { handler } from "lockgate-sdk";
//   import * as sql from "lockgate-sdk/sql";
//
//   export const handle = handler((msg) => {
//     const d = msg.json();
//     sql.execute("UPDATE account_balances SET balance = balance + $1 WHERE account = $2", [
//       d.amount,
//       d.account,
//     ]);
//     for (const row of sql.query("SELECT account, balance FROM account_balances")) {
//       console.log(row.account, row.balance);
//     }
//   });
//
// The database is the PostgreSQL store the handler's runtime.toml table grants
// (`[handlers.<name>] sql = "<store>"`). The first statement of a call opens a transaction, every
// later one runs in it, and lockgate commits it only when the message is done, together with the
// message's idempotency key: a retry, reject, trap, timeout or crash rolls it back, so each
// message applies its statements once (docs/handlers/sql.md).
//
// Parameters are `$1`, `$2`, ... and an array of values: null/undefined, boolean, number (an
// integer is int64, another number float64), bigint (int64), string (text), Uint8Array (bytes),
// Date (timestamptz), a plain object (json), arrays of one of these (an array parameter), or a
// typed value from `json`, `numeric`, `uuid`, `date`, `timestamp`. Column values come back as:
// int16/int32 and int64 within 2^53 a number (a larger int64 a bigint), floats a number, text a
// string, bytea a Uint8Array, json parsed, uuid and numeric their text, date "YYYY-MM-DD", time
// "HH:MM:SS.ffffff", timestamp and timestamptz a Date (milliseconds: microseconds are dropped),
// arrays arrays (a NULL element null).
//
// A failed statement throws a `SqlError` (`kind`, and the SQLSTATE `code` when the server refused
// it, "23505" for a unique violation). Left uncaught it ends the call as a retry when trying
// again may succeed (the database is unavailable; SQLSTATE classes 40, 08, 53, 57) and as a
// reject otherwise. Importing this module makes `lockgate build` build the handler against a
// world with the `sql` interface.

import { execute as witExecute, query as witQuery } from "lockgate:handler/sql@0.1.0";
import { HandlerError } from "./index.js";

// StarlingMonkey (jco's convention) gives and takes WIT 64-bit integers as BigInt, QuickJS
// (componentize-qjs) as Number.
const QUICKJS = globalThis.__cqjs !== undefined;

const PREFIX = {
  failed: "SQL statement failed",
  unavailable: "database unavailable",
  refused: "SQL statement refused",
  "too-large": "SQL result too large",
  aborted: "SQL transaction aborted",
  "bad-parameter": "bad SQL parameter",
};

/**
 * A statement failed. `kind` is "failed" (the server refused it: `code`, `detail` and
 * `constraint` say why), "unavailable", "refused" (transaction control, several statements, no
 * grant), "too-large" (over `sql_max_rows` or `sql_max_result_bytes`), "aborted" (an earlier
 * statement of the call failed) or "bad-parameter". `message` (and `reason`) is the whole text,
 * SQLSTATE and detail included.
 */
export class SqlError extends HandlerError {
  constructor(kind, message, code, detail, constraint) {
    let reason = `${PREFIX[kind] ?? "SQL error"}${code ? ` (${code})` : ""}: ${message}`;
    if (detail) reason += ` (${detail})`;
    super(reason);
    this.kind = kind;
    this.code = code ?? undefined;
    this.detail = detail ?? undefined;
    this.constraint = constraint ?? undefined;
  }

  /** Whether the statement broke a unique constraint (SQLSTATE 23505). */
  get isUniqueViolation() {
    return this.code === "23505";
  }

  /** Whether running the message again may succeed. */
  get retryable() {
    if (this.kind === "unavailable") return true;
    return this.code !== undefined && ["40", "08", "53", "57"].includes(this.code.slice(0, 2));
  }

  /** The WIT `handler-error` value (`handler` returns it to the host). */
  get payload() {
    return this.retryable
      ? { tag: "retry", val: { reason: this.reason, afterMs: undefined } }
      : { tag: "reject", val: this.reason };
  }
}

/** A parameter of an explicit SQL type (see `json`, `numeric`, `uuid`, `date`, `timestamp`). */
export class SqlValue {
  constructor(tag, val) {
    this.tag = tag;
    this.val = val;
  }
}

/** `value` sent as json whatever its JavaScript type (an array would otherwise be an array). */
export const json = (value) => new SqlValue("json", JSON.stringify(value));
/** A numeric from its decimal text ("12.50") or a number. */
export const numeric = (text) => new SqlValue("numeric", String(text));
/** A uuid from its text. */
export const uuid = (text) => new SqlValue("uuid", String(text));
/** A date from "YYYY-MM-DD" or a Date (its UTC day). */
export const date = (d) => new SqlValue("date", days(d));
/** A timestamp without time zone from a Date (its UTC wall time) or microseconds since 1970. */
export const timestamp = (t) => new SqlValue("timestamp", i64(micros(t)));

const DAY_MS = 86_400_000;

function days(d) {
  const ms = d instanceof Date ? d.getTime() : Date.parse(`${d}T00:00:00Z`);
  if (!Number.isFinite(ms)) throw new TypeError(`${d} is not a date (YYYY-MM-DD)`);
  return Math.floor(ms / DAY_MS);
}

function micros(t) {
  if (t instanceof Date) {
    const ms = t.getTime();
    if (!Number.isFinite(ms)) throw new TypeError("an invalid Date cannot be a parameter");
    return BigInt(ms) * 1000n;
  }
  return BigInt(t);
}

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

/** A WIT s64 in the form this engine's bindings take. */
function i64(v) {
  const b = BigInt(v);
  if (b < I64_MIN || b > I64_MAX) throw new RangeError(`${v} is out of range for int64`);
  return QUICKJS ? Number(b) : b;
}

/** `[kind, wire value]` of one non-null parameter; kind names the WIT case. */
function scalar(p) {
  if (p instanceof SqlValue) return [p.tag, p.val];
  switch (typeof p) {
    case "boolean":
      return ["boolean", p];
    case "number":
      return Number.isSafeInteger(p) ? ["int64", i64(p)] : ["float64", p];
    case "bigint":
      return p >= I64_MIN && p <= I64_MAX ? ["int64", i64(p)] : ["numeric", p.toString()];
    case "string":
      return ["text", p];
    default:
  }
  if (p instanceof Uint8Array) return ["bytes", p];
  if (ArrayBuffer.isView(p)) return ["bytes", new Uint8Array(p.buffer, p.byteOffset, p.byteLength)];
  if (p instanceof Date) return ["timestamptz", i64(micros(p))];
  if (typeof p === "object" && p !== null) return ["json", JSON.stringify(p)];
  throw new TypeError(`a ${typeof p} cannot be a SQL parameter`);
}

// An array's elements share one kind; a timestamp array travels as timestamptz (the WIT has no
// timestamp array: the host converts the same microseconds either way).
const ARRAYS = {
  boolean: "boolean-array",
  int64: "int64-array",
  float64: "float64-array",
  text: "text-array",
  bytes: "bytes-array",
  numeric: "numeric-array",
  uuid: "uuid-array",
  json: "json-array",
  date: "date-array",
  timestamptz: "timestamptz-array",
  timestamp: "timestamptz-array",
};

function toValue(p) {
  if (p === null || p === undefined) return { tag: "null" };
  if (Array.isArray(p)) {
    let items = p.map((x) => (x === null || x === undefined ? undefined : scalar(x)));
    const kinds = new Set(items.filter((i) => i !== undefined).map((i) => i[0]));
    if (kinds.size === 2 && kinds.has("int64") && kinds.has("float64")) {
      // Mixed numbers: a float array.
      items = items.map((i) => (i === undefined ? undefined : ["float64", Number(i[1])]));
      kinds.delete("int64");
    }
    if (kinds.size > 1) throw new TypeError(`an array's elements must be of one kind, got ${[...kinds].join(", ")}`);
    const kind = kinds.size === 0 ? "text" : [...kinds][0];
    if (ARRAYS[kind] === undefined) throw new TypeError(`an array of ${kind} is not supported`);
    return { tag: ARRAYS[kind], val: items.map((i) => (i === undefined ? undefined : i[1])) };
  }
  const [tag, val] = scalar(p);
  return { tag, val };
}

function params(ps) {
  if (ps === undefined) return [];
  if (!Array.isArray(ps)) throw new TypeError(`params must be an array, got ${typeof ps}`);
  return ps.map((p, i) => {
    try {
      return toValue(p);
    } catch (e) {
      throw new SqlError("bad-parameter", `$${i + 1}: ${e.message}`);
    }
  });
}

const pad = (n, w = 2) => String(n).padStart(w, "0");

function fromScalar(tag, v) {
  if (v === null || v === undefined) return null;
  switch (tag.replace(/-array$/, "")) {
    case "int64": {
      const b = BigInt(v);
      return b >= -(2n ** 53n) + 1n && b <= 2n ** 53n - 1n ? Number(b) : b;
    }
    case "json":
      return JSON.parse(v);
    case "date": {
      const d = new Date(Number(v) * DAY_MS);
      return `${pad(d.getUTCFullYear(), 4)}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
    }
    case "time": {
      const us = BigInt(v);
      const s = us / 1_000_000n;
      return `${pad(s / 3600n)}:${pad((s / 60n) % 60n)}:${pad(s % 60n)}.${pad(us % 1_000_000n, 6)}`;
    }
    case "timestamp":
    case "timestamptz":
      return new Date(Number(BigInt(v) / 1000n));
    default:
      return v;
  }
}

function fromValue(v) {
  if (v.tag === "null") return null;
  if (v.tag.endsWith("-array")) return Array.from(v.val, (x) => fromScalar(v.tag, x));
  return fromScalar(v.tag, v.val);
}

function sqlError(e) {
  const err = e && e.payload !== undefined ? e.payload : e;
  if (err && err.tag === "failed" && err.val) {
    const db = err.val;
    return new SqlError("failed", db.message, db.code, db.detail ?? undefined, db.constraint ?? undefined);
  }
  if (err && typeof err.tag === "string" && PREFIX[err.tag] !== undefined) {
    return new SqlError(err.tag, String(err.val));
  }
  return e;
}

/**
 * Runs a statement that returns rows (`SELECT`, `... RETURNING`). Returns an array of objects
 * (column name to value); its `columns` property lists `{name, typeName}` (PostgreSQL's type
 * name: `int8`, `text`, ...), also when there is no row.
 */
export function query(statement, ps) {
  const values = params(ps);
  let rs;
  try {
    rs = witQuery(String(statement), values);
  } catch (e) {
    throw sqlError(e);
  }
  const names = rs.columns.map((c) => c.name);
  const rows = rs.rows.map((r) => {
    const row = {};
    r.forEach((v, i) => {
      row[names[i]] = fromValue(v);
    });
    return row;
  });
  rows.columns = rs.columns.map((c) => ({ name: c.name, typeName: c.typeName }));
  return rows;
}

/** Runs a statement and returns the number of rows it affected. */
export function execute(statement, ps) {
  const values = params(ps);
  try {
    return Number(witExecute(String(statement), values));
  } catch (e) {
    throw sqlError(e);
  }
}
