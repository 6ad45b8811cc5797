// Write lockgate message handlers in JavaScript.
//
//   import { handler, publish, config, Reject } from "lockgate-sdk";
//
//   export const handle = handler((msg) => {
//     const target = config.get("target");
//     if (!target) throw new Reject("`target` is not set");
//     publish(target, msg.text().toUpperCase(), { key: msg.key });
//   });
//
// Returning normally acknowledges the message and releases what it published. Throwing `Retry`
// asks for another attempt (optionally not before `afterMs`), throwing `Reject` sends the message
// to the dead-letter destination. Any other exception is a bug in the handler: it is logged at
// error level and the call traps, which the host treats like a panic in a Rust handler (retried
// unless the route says `retry_traps = false`).
//
// The `lockgate:handler/...` imports are the component's WIT imports, resolved by
// `jco componentize` (scripts/build-guest-js.sh bundles this package with the handler).

import { publish as witPublish } from "lockgate:handler/emit@0.1.0";
import { get as witConfigGet } from "lockgate:handler/config@0.1.0";
import { log as witLog } from "lockgate:handler/log@0.1.0";
import * as witKv from "lockgate:handler/kv@0.1.0";

// ---- text ------------------------------------------------------------------------------------
// TextEncoder/TextDecoder exist in StarlingMonkey but not in QuickJS, so UTF-8 is also done here.

const nativeEncoder = typeof TextEncoder === "function" ? new TextEncoder() : undefined;
const nativeDecoder =
  typeof TextDecoder === "function" ? new TextDecoder("utf-8", { fatal: true }) : undefined;

/** Encodes a string as UTF-8 bytes. */
export function utf8Encode(s) {
  if (nativeEncoder !== undefined) return nativeEncoder.encode(s);
  let ascii = true;
  for (let i = 0; i < s.length; i++) {
    if (s.charCodeAt(i) >= 0x80) {
      ascii = false;
      break;
    }
  }
  if (ascii) {
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const out = [];
  for (let i = 0; i < s.length; i++) {
    let c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
        i++;
      }
    }
    if (c >= 0xd800 && c <= 0xdfff) c = 0xfffd; // lone surrogate
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
    else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
  }
  return new Uint8Array(out);
}

/**
 * Decodes UTF-8 bytes. With `fatal` (the default) invalid UTF-8 throws a `TypeError`; without
 * it each invalid sequence becomes U+FFFD.
 */
export function utf8Decode(bytes, fatal = true) {
  if (fatal && nativeDecoder !== undefined) {
    try {
      return nativeDecoder.decode(bytes);
    } catch {
      // fall through to the decoder below, which says where
    }
  }
  let isAscii = true;
  for (let k = 0; k < bytes.length; k++) {
    if (bytes[k] >= 0x80) {
      isAscii = false;
      break;
    }
  }
  if (isAscii) {
    let s = "";
    for (let k = 0; k < bytes.length; k += 8192) {
      s += String.fromCharCode.apply(null, bytes.subarray(k, k + 8192));
    }
    return s;
  }
  let s = "";
  let i = 0;
  const bad = () => {
    if (fatal) throw new TypeError(`invalid UTF-8 at byte ${i}`);
    s += "\ufffd";
    i++;
  };
  while (i < bytes.length) {
    const b = bytes[i];
    let need, cp, min;
    if (b < 0x80) { s += String.fromCharCode(b); i++; continue; }
    else if (b >= 0xc2 && b < 0xe0) { need = 1; cp = b & 0x1f; min = 0x80; }
    else if (b >= 0xe0 && b < 0xf0) { need = 2; cp = b & 0x0f; min = 0x800; }
    else if (b >= 0xf0 && b < 0xf5) { need = 3; cp = b & 0x07; min = 0x10000; }
    else { bad(); continue; }
    let ok = true;
    for (let k = 1; k <= need; k++) {
      const n = bytes[i + k];
      if (n === undefined || (n & 0xc0) !== 0x80) { ok = false; break; }
      cp = (cp << 6) | (n & 0x3f);
    }
    if (!ok || cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) { bad(); continue; }
    s += String.fromCodePoint(cp);
    i += need + 1;
  }
  return s;
}

// ---- u64 -------------------------------------------------------------------------------------
// The two engines' bindings disagree on WIT u64: StarlingMonkey (jco's convention) uses BigInt,
// QuickJS (componentize-qjs) uses Number and rejects a BigInt. The SDK hands numbers to the
// handler (exact up to 2^53, far above any offset or timestamp) and converts on the way out.

const QUICKJS = globalThis.__cqjs !== undefined;

/** A WIT u64 from the handler's number or bigint, in the form this engine's bindings expect. */
function u64(value, what) {
  if (value === undefined || value === null) return undefined;
  const n = typeof value === "bigint" ? value : Number(value);
  if (typeof n === "number" && (!Number.isFinite(n) || n < 0)) {
    throw new RangeError(`${what} must be a non-negative number, got ${value}`);
  }
  if (typeof n === "bigint" && n < 0n) throw new RangeError(`${what} must not be negative, got ${value}`);
  if (QUICKJS) return typeof n === "bigint" ? Number(n) : Math.ceil(n);
  return typeof n === "bigint" ? n : BigInt(Math.ceil(n));
}

/** A WIT u64 from the bindings as a number. */
const num = (value) => (value === undefined || value === null ? undefined : Number(value));

// An integer is its decimal digits (`2` is "2"), as every SDK stores a number.
function toBytes(value, what) {
  if (value instanceof Uint8Array) return value;
  if (typeof value === "string") return utf8Encode(value);
  if (typeof value === "number" && Number.isSafeInteger(value)) return utf8Encode(String(value));
  if (typeof value === "bigint") return utf8Encode(value.toString());
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  throw new TypeError(`${what} must be a string, an integer or bytes, got ${typeof value}`);
}

// ---- errors ----------------------------------------------------------------------------------

/** Base class of `Retry` and `Reject`; `reason` is the text the host records. */
export class HandlerError extends Error {
  constructor(reason) {
    super(String(reason));
    this.name = new.target.name;
    this.reason = String(reason);
  }
}

/**
 * A transient failure: the host tries the message again, not before `afterMs` milliseconds if
 * given (it waits at least its own backoff and at most the route's `max_backoff_ms`).
 */
export class Retry extends HandlerError {
  constructor(reason, afterMs) {
    super(reason);
    this.afterMs = u64(afterMs, "afterMs");
  }

  /** The WIT `handler-error` value (`handler` returns it to the host). */
  get payload() {
    return { tag: "retry", val: { reason: this.reason, afterMs: this.afterMs } };
  }
}

/** The message can never succeed: no retry; it goes to the dead-letter destination. */
export class Reject extends HandlerError {
  get payload() {
    return { tag: "reject", val: this.reason };
  }
}

// ---- the message -----------------------------------------------------------------------------

/**
 * One delivered message. Fields: `id`, `topic`, `partition` (number or undefined), `offset`
 * (number or undefined), `key` (Uint8Array or undefined), `headers` (array of `{name, value}`,
 * value a Uint8Array, in broker order), `payload` (Uint8Array), `timestampMs` (number or
 * undefined), `attempt` (1 for the first attempt), `replyTo` (string or undefined).
 */
export class Message {
  constructor(wit) {
    this.id = wit.id;
    this.topic = wit.topic;
    // QuickJS gives a WIT `none` as null, StarlingMonkey as undefined: the SDK uses undefined.
    this.partition = wit.partition ?? undefined;
    this.offset = num(wit.offset);
    this.key = wit.key ?? undefined;
    this.headers = wit.headers;
    this.payload = wit.payload;
    this.timestampMs = num(wit.timestampMs);
    this.attempt = wit.attempt;
    this.replyTo = wit.replyTo ?? undefined;
  }

  /** The payload as text; throws `Reject` if it is not UTF-8. */
  text() {
    try {
      return utf8Decode(this.payload);
    } catch (e) {
      throw new Reject(`payload is not UTF-8: ${e.message}`);
    }
  }

  /** The payload parsed as JSON; throws `Reject` if it is not valid JSON. */
  json() {
    const text = this.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new Reject(`payload is not valid JSON: ${e.message}`);
    }
  }

  /** The key as text (invalid UTF-8 replaced), or undefined. */
  keyText() {
    return this.key === undefined ? undefined : utf8Decode(this.key, false);
  }

  /** The first header called `name` (case-sensitive) as text (invalid UTF-8 replaced), or undefined. */
  header(name) {
    const v = this.headerBytes(name);
    return v === undefined ? undefined : utf8Decode(v, false);
  }

  /** The first header called `name` (case-sensitive) as bytes, or undefined. */
  headerBytes(name) {
    const h = this.headers.find((h) => h.name === name);
    return h === undefined ? undefined : h.value;
  }
}

// ---- the export ------------------------------------------------------------------------------

/**
 * Wraps `fn(msg)` as the component's `handle` export: `export const handle = handler(fn)`.
 * `fn`'s return value is ignored; it must not be async.
 */
export function handler(fn) {
  return function handle(witMessage) {
    try {
      const result = fn(new Message(witMessage));
      // An async handler returns a promise that nobody awaits: whatever it does after its first
      // `await` (or any error it throws) would be lost while the message is acknowledged.
      if (result !== null && typeof result === "object" && typeof result.then === "function") {
        throw new TypeError(
          "the handler returned a promise: handlers are called synchronously, so an async handler's work would not run before the message is acknowledged; make it a plain function",
        );
      }
    } catch (e) {
      // The bindings lower a thrown plain object's `payload` as the `err` value (QuickJS treats
      // a thrown Error, even one with a `payload`, as a crash).
      if (e instanceof HandlerError) throw { payload: e.payload };
      // A bug in the handler: record it (QuickJS has no console), then trap like a Rust panic.
      // Rethrowing a value that is not a `handler-error` makes the bindings trap the call.
      witLog("error", `handler threw: ${e && e.stack ? `${e}\n${e.stack}` : String(e)}`);
      throw e;
    }
  };
}

// ---- publishing ------------------------------------------------------------------------------

function headerList(headers) {
  if (headers === undefined || headers === null) return [];
  const entries = Array.isArray(headers) ? headers : Object.entries(headers);
  return entries.map((h) => {
    const [name, value] = Array.isArray(h) ? h : [h.name, h.value];
    return { name: String(name), value: toBytes(value, `header ${name}`) };
  });
}

/**
 * Buffers one output; it is published only if the handler returns normally.
 *
 * `payload` and `key` may be strings (UTF-8) or bytes; `headers` an object, an array of
 * `[name, value]` pairs or of `{name, value}`. A refusal by the host (topic not in the route's
 * `outputs`, too large, too many) throws `Reject`: the host fails the call anyway, and a retry
 * would be refused the same way.
 */
export function publish(topic, payload, { key, headers } = {}) {
  try {
    witPublish({
      topic: String(topic),
      key: key === undefined || key === null ? undefined : toBytes(key, "key"),
      headers: headerList(headers),
      payload: toBytes(payload, "payload"),
    });
  } catch (e) {
    const err = e && e.payload !== undefined ? e.payload : e;
    let why;
    if (err && err.tag === "not-allowed") why = `topic \`${err.val}\` is not in the route's outputs`;
    else if (err && err.tag === "too-large") why = `output larger than max_output_bytes (${err.val} bytes)`;
    else if (err && err.tag === "too-many") why = `more than max_outputs (${err.val}) outputs`;
    else throw e;
    throw new Reject(`publish failed: ${why}`);
  }
}

// ---- config, log, kv -------------------------------------------------------------------------

/** Read-only configuration from the handler's `config` table (or `lockgate test -c k=v`). */
export const config = {
  /** The value configured under `key` (always a string), else `fallback`. */
  get(key, fallback = undefined) {
    const v = witConfigGet(String(key));
    return v === undefined || v === null ? fallback : v;
  },
};

/** Structured logging, attributed by the host to the route, handler and message. */
export const log = {
  trace: (m) => witLog("trace", String(m)),
  debug: (m) => witLog("debug", String(m)),
  info: (m) => witLog("info", String(m)),
  warn: (m) => witLog("warn", String(m)),
  error: (m) => witLog("error", String(m)),
};

function kvCall(f) {
  try {
    return f();
  } catch (e) {
    const err = e && e.payload !== undefined ? e.payload : e;
    if (err && err.tag === "unavailable") throw new Retry(`kv unavailable: ${err.val}`);
    if (err && err.tag === "invalid-key") throw new Reject(`kv: invalid key: ${err.val}`);
    if (err && err.tag === "too-large") throw new Reject(`kv: value larger than ${err.val} bytes`);
    throw e;
  }
}

const ttl = (ms) => u64(ms, "ttlMs");
const optBytes = (v, what) => (v === undefined || v === null ? undefined : toBytes(v, what));

/**
 * Per-handler key-value state: persistent, with optional TTL (ms) and compare-and-swap. On a
 * route with an idempotency key, a message's writes are held back and applied together with its
 * key when it succeeds (a failed call leaves no trace); elsewhere writes take effect at once and
 * are not undone when the call fails (docs/handlers/contract.md). An unavailable store throws
 * `Retry`; a bad key or an oversized value throws `Reject`. `get` returns a Uint8Array, or
 * undefined; `getText` the value as text (invalid UTF-8 replaced), or undefined, so a number
 * reads back with `Number(kv.getText(key) ?? 0)`. Values are strings (stored as UTF-8),
 * integers (stored as their decimal digits, as every SDK stores a number) or bytes; anything
 * else throws a TypeError.
 */
export const kv = {
  get: (key) => kvCall(() => witKv.get(key)) ?? undefined,
  getText: (key) => {
    const v = kv.get(key);
    return v === undefined ? undefined : utf8Decode(v, false);
  },
  set: (key, value, ttlMs) => kvCall(() => witKv.set(key, toBytes(value, "value"), ttl(ttlMs))),
  delete: (key) => kvCall(() => witKv.delete(key)),
  compareAndSwap: (key, expected, next, ttlMs) =>
    kvCall(() =>
      witKv.compareAndSwap(key, optBytes(expected, "expected"), optBytes(next, "new"), ttl(ttlMs)),
    ),
};
