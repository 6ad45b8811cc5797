// Outbound HTTP from a handler, synchronous like `handle`.
//
//   import { http } from "lockgate-sdk/http";
//
//   const customer = http
//     .get(`${base}/customers/${id}`, { headers: { accept: "application/json" } })
//     .errorForStatus() // 5xx, 429, 408: Retry (after Retry-After); other 4xx: Reject
//     .json();
//
// What a request may reach is the handler's grant in runtime.toml
// (`[handlers.<name>.http] allowed_hosts = [...]`); anything else throws an `HttpError` of kind
// "denied". The host never follows a redirect; this helper follows up to five (each hop is
// checked against the grant again, a 303, or a 301/302 after a POST, becomes a GET without a
// body, and `Authorization` and `Cookie` are dropped when the origin changes) unless
// `followRedirects: false`. Every request carries an `Idempotency-Key` the host derives from the
// message, the same on every retry and redelivery, so a receiver that deduplicates applies it
// once.
//
// A request that gets no response throws an `HttpError`; left uncaught it ends the call as a
// retry ("timeout", "connection": the dependency may be back on the next attempt) or a reject
// ("denied", "too-large", "invalid": it would fail the same way every time). A response with an
// error status is returned as it is; `errorForStatus()` turns it into the outcome.
//
// This is a module of its own, not part of "lockgate-sdk": a handler that imports
// "lockgate-sdk/http" is built against the `handler-http` world (with wasi:http), one that does
// not keeps the `handler` world. The QuickJS engine (the default) only; it has no `fetch`.

import { handle as witHandle } from "wasi:http/outgoing-handler@0.2.12";
import {
  Fields,
  IncomingBody,
  OutgoingBody,
  OutgoingRequest,
  RequestOptions,
  httpErrorCode,
} from "wasi:http/types@0.2.12";
import { HandlerError, Reject, Retry, utf8Decode, utf8Encode } from "./index.js";

/** Most redirects a request follows by default. */
export const MAX_REDIRECTS = 5;

const QUICKJS = globalThis.__cqjs !== undefined;
/** A WIT u64 as this engine's bindings take it (QuickJS: number, StarlingMonkey: BigInt). */
const u64 = (n) => (QUICKJS ? n : BigInt(n));

// ---- errors ----------------------------------------------------------------------------------

const PREFIX = {
  denied: "HTTP request denied",
  timeout: "HTTP request timed out",
  connection: "HTTP connection failed",
  "too-large": "HTTP message too large",
  invalid: "invalid HTTP request",
};

/**
 * Why a request got no response. `kind` is "denied" (the grant does not allow the URL),
 * "timeout" (no response in time), "connection" (refused, reset, DNS, TLS), "too-large" (over
 * the grant's limits) or "invalid" (a bad URL, method or header); `detail` is the reason without
 * the kind. Thrown out of the handler it is a retry for "timeout" and "connection", else a
 * reject.
 */
export class HttpError extends HandlerError {
  constructor(kind, detail) {
    super(`${PREFIX[kind] ?? "HTTP request failed"}: ${detail}`);
    this.kind = kind;
    this.detail = String(detail);
  }

  /** Whether another attempt may succeed ("timeout", "connection"). */
  get retryable() {
    return this.kind === "timeout" || this.kind === "connection";
  }

  /** The WIT `handler-error` value (`handler` returns it to the host). */
  get payload() {
    return this.retryable
      ? { tag: "retry", val: { reason: this.reason, afterMs: undefined } }
      : { tag: "reject", val: this.reason };
  }
}

// ---- the response ----------------------------------------------------------------------------

/**
 * A response, read to its end: `status` (number), `headers` (array of `{name, value}`, names
 * lower-cased, values strings, in order), `body` (Uint8Array).
 */
export class Response {
  constructor(status, headers, body) {
    this.status = status;
    this.headers = headers;
    this.body = body;
  }

  /** The first header called `name` (any case), or undefined. */
  header(name) {
    const want = String(name).toLowerCase();
    const h = this.headers.find((h) => h.name.toLowerCase() === want);
    return h === undefined ? undefined : h.value;
  }

  /** The body as text (invalid UTF-8 replaced). */
  text() {
    return utf8Decode(this.body, false);
  }

  /** The body parsed as JSON; a body that is not JSON throws `Reject`. */
  json() {
    try {
      return JSON.parse(this.text());
    } catch (e) {
      throw new Reject(`HTTP ${this.status}: the response is not the expected JSON: ${e.message}`);
    }
  }

  /**
   * The response if its status is below 400; otherwise throws the handler's error for it: a 5xx,
   * a 429 or a 408 throws `Retry` (not before `Retry-After` seconds when the server sends them),
   * any other 4xx `Reject`. So an outage of the dependency retries and opens the route's
   * breaker, and nothing is dead-lettered while it is down.
   */
  errorForStatus() {
    const s = this.status;
    if (s < 400) return this;
    const reason = `HTTP ${s}: ${this.text().slice(0, 200).trim()}`;
    if (s >= 500 || s === 429 || s === 408) {
      const after = (this.header("retry-after") ?? "").trim();
      throw new Retry(reason, /^[0-9]+$/.test(after) ? Number(after) * 1000 : undefined);
    }
    throw new Reject(reason);
  }
}

// ---- requests --------------------------------------------------------------------------------

function headerPairs(headers) {
  if (headers === undefined || headers === null) return [];
  const entries = Array.isArray(headers) ? headers : Object.entries(headers);
  return entries.map((h) => {
    const [name, value] = Array.isArray(h) ? h : [h.name, h.value];
    return [String(name), typeof value === "string" ? value : utf8Decode(bodyBytes(value), false)];
  });
}

function bodyBytes(value) {
  if (value === undefined || value === null) return new Uint8Array(0);
  if (value instanceof Uint8Array) return value;
  if (typeof value === "string") return utf8Encode(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  throw new TypeError(`a request body must be a string or bytes, got ${typeof value}`);
}

/**
 * Sends `method` to `url` (`http://` or `https://`) and reads the whole response. Options:
 * `headers` (an object, an array of `[name, value]` or of `{name, value}`), `body` (a string or
 * bytes), `json` (a value sent as JSON with `content-type: application/json`, instead of
 * `body`), `timeoutMs` (the wait for the response headers; the grant's `timeout_ms` and the
 * call's deadline bound it too), `followRedirects` (default true). Throws an `HttpError` when
 * there is no response; an error status is returned (see `Response.errorForStatus`).
 */
export function request(method, url, { headers, body, json, timeoutMs, followRedirects = true } = {}) {
  if (typeof method !== "string" || method === "") {
    throw new HttpError("invalid", `${url}: the method must be a non-empty string`);
  }
  url = String(url);
  let hs = headerPairs(headers);
  let data = bodyBytes(body);
  if (json !== undefined) {
    if (body !== undefined && body !== null) throw new TypeError("give a request body or json, not both");
    data = utf8Encode(JSON.stringify(json));
    hs = hs.filter(([n]) => n.toLowerCase() !== "content-type");
    hs.push(["content-type", "application/json"]);
  }
  if (timeoutMs !== undefined && timeoutMs !== null && !(Number(timeoutMs) >= 0)) {
    throw new RangeError(`timeoutMs must be a non-negative number, got ${timeoutMs}`);
  }
  method = method.toUpperCase();
  let redirects = followRedirects ? MAX_REDIRECTS : 0;
  for (;;) {
    const response = send(method, url, hs, data, timeoutMs);
    if (![301, 302, 303, 307, 308].includes(response.status) || redirects === 0) return response;
    const location = response.header("location");
    if (location === undefined) return response;
    redirects--;
    const next = resolve(url, location);
    if (response.status === 303 || (response.status !== 307 && response.status !== 308 && method === "POST")) {
      method = "GET";
      data = new Uint8Array(0);
      hs = hs.filter(([n]) => n.toLowerCase() !== "content-type");
    }
    const [a, b] = [origin(next), origin(url)];
    if (a === undefined || b === undefined || a !== b) {
      // Credentials are for the host they were written for.
      hs = hs.filter(([n]) => !["authorization", "cookie"].includes(n.toLowerCase()));
    }
    url = next;
  }
}

/** A `GET` of `url`; options as for `request`. */
export const get = (url, options) => request("GET", url, options);
/** A `POST` to `url`; options as for `request` (`body` or `json`). */
export const post = (url, options) => request("POST", url, options);
/** A `PUT` to `url`; options as for `request`. */
export const put = (url, options) => request("PUT", url, options);
/** A `DELETE` of `url`; options as for `request`. */
const del = (url, options) => request("DELETE", url, options);
export { del as delete };

/** The helpers as one object: `http.get(url)`, `http.post(url, { json })`, ... */
export const http = { get, post, put, delete: del, request, Response, HttpError, MAX_REDIRECTS };

// ---- URLs ------------------------------------------------------------------------------------

function authorityEnd(rest) {
  const m = /[/?#]/.exec(rest);
  return m === null ? rest.length : m.index;
}

/** [https, authority, path with query] of an absolute http(s) URL, without its fragment. */
function splitUrl(url) {
  const i = url.indexOf("://");
  if (i < 0) throw new HttpError("invalid", `\`${url}\`: not an absolute http:// or https:// URL`);
  const scheme = url.slice(0, i).toLowerCase();
  if (scheme !== "http" && scheme !== "https") {
    throw new HttpError("invalid", `\`${url}\`: the scheme must be http or https`);
  }
  const rest = url.slice(i + 3);
  const end = authorityEnd(rest);
  const authority = rest.slice(0, end);
  if (authority === "") throw new HttpError("invalid", `\`${url}\`: the host is missing`);
  let path = rest.slice(end).split("#")[0];
  if (path === "") path = "/";
  else if (path.startsWith("?")) path = `/${path}`;
  return [scheme === "https", authority, path];
}

function origin(url) {
  const i = url.indexOf("://");
  if (i < 0) return undefined;
  const rest = url.slice(i + 3);
  return `${url.slice(0, i)}://${rest.slice(0, authorityEnd(rest))}`.toLowerCase();
}

/** `location` against `base`: absolute as it is, `//host/..` with the base's scheme, `/path` on
 * the same origin, anything else relative to the base's directory. */
function resolve(base, location) {
  if (location.includes("://")) return location;
  const i = base.indexOf("://");
  if (i < 0) throw new HttpError("invalid", `bad URL \`${base}\``);
  const scheme = base.slice(0, i);
  if (location.startsWith("//")) return `${scheme}:${location}`;
  const [, authority, path] = splitUrl(base);
  if (location.startsWith("/")) return `${scheme}://${authority}${location}`;
  const p = path.split("?")[0];
  return `${scheme}://${authority}${p.slice(0, p.lastIndexOf("/") + 1) || "/"}${location}`;
}

// ---- the host --------------------------------------------------------------------------------

const METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

// Resources are dropped as soon as they are done with: wasi:http wants a body's stream dropped
// before the body is finished, and a child (headers, body) before its parent.
const DISPOSE = [typeof Symbol.dispose === "symbol" ? Symbol.dispose : undefined, Symbol.for("dispose")];

function dispose(resource) {
  if (!resource) return;
  for (const s of DISPOSE) {
    if (s !== undefined && typeof resource[s] === "function") {
      resource[s]();
      return;
    }
  }
}

/** The error a call into the bindings threw, unwrapped (engines differ in how they throw). */
const errValue = (e) => (e && e.payload !== undefined ? e.payload : e);

/** The `HttpError` for a wasi:http `error-code` variant. */
function httpError(code, url) {
  const tag = String(code && code.tag).toLowerCase();
  const limit = code && code.val !== undefined && code.val !== null ? String(code.val) : "?";
  switch (tag) {
    case "http-request-denied":
      return new HttpError("denied", `${url} is not allowed by the handler's grant (allowed_hosts)`);
    case "destination-ip-prohibited":
      return new HttpError("denied", `${url} resolves to an internal address its allowed_hosts entry does not name`);
    case "connection-timeout":
    case "connection-read-timeout":
    case "http-response-timeout":
      return new HttpError("timeout", url);
    case "http-request-body-size":
      return new HttpError("too-large", `the request body is over the grant's max_request_bytes (${limit})`);
    case "http-response-body-size":
      return new HttpError("too-large", `the response of ${url} is over the grant's max_response_bytes (${limit})`);
    case "http-request-method-invalid":
    case "http-request-uri-invalid":
      return new HttpError("invalid", `${url}: ${code.tag}`);
    default:
      return new HttpError("connection", `${url}: ${code && code.tag !== undefined ? code.tag : String(code)}`);
  }
}

/** One request and its whole response, through wasi:http (no redirects). */
function send(method, url, headers, data, timeoutMs) {
  const [https, authority, path] = splitUrl(url);
  const fields = new Fields();
  for (const [name, value] of headers) {
    try {
      fields.append(name, utf8Encode(value));
    } catch (e) {
      throw new HttpError("invalid", `${url}: header \`${name}\`: ${JSON.stringify(errValue(e))}`);
    }
  }
  if (data.length > 0 && !headers.some(([n]) => n.toLowerCase() === "content-length")) {
    fields.append("content-length", utf8Encode(String(data.length)));
  }
  const out = new OutgoingRequest(fields);
  const set = (what, f) => {
    try {
      f();
    } catch {
      throw new HttpError("invalid", `${url}: bad ${what}`);
    }
  };
  set("method", () =>
    out.setMethod(METHODS.includes(method) ? { tag: method.toLowerCase() } : { tag: "other", val: method }),
  );
  set("scheme", () => out.setScheme({ tag: https ? "HTTPS" : "HTTP" }));
  set("host", () => out.setAuthority(authority));
  set("path", () => out.setPathWithQuery(path));
  const body = out.body();
  let options = null;
  if (timeoutMs !== undefined && timeoutMs !== null) {
    options = new RequestOptions();
    options.setFirstByteTimeout(u64(Math.ceil(Number(timeoutMs) * 1_000_000)));
  }
  // Sent first, written after: the host reads the body while it is written.
  let future;
  try {
    future = witHandle(out, options);
  } catch (e) {
    throw httpError(errValue(e), url);
  }
  let result;
  try {
    const stream = body.write();
    try {
      for (let i = 0; i < data.length; i += 4096) {
        stream.blockingWriteAndFlush(data.subarray(i, i + 4096));
      }
    } catch {
      // the response says why (too large, the connection)
    } finally {
      dispose(stream);
    }
    try {
      OutgoingBody.finish(body, null);
    } catch {
      // likewise
    }
    for (;;) {
      result = future.get();
      if (result !== null && result !== undefined) break;
      const ready = future.subscribe();
      ready.block();
      dispose(ready);
    }
  } finally {
    dispose(future);
  }
  if (result.tag === "err") throw new HttpError("connection", `${url}: response taken twice`);
  const inner = result.val;
  if (inner.tag === "err") throw httpError(inner.val, url);
  const response = inner.val;
  try {
    const status = response.status();
    const fieldsIn = response.headers();
    const entries = fieldsIn.entries().map(([n, v]) => ({ name: n.toLowerCase(), value: utf8Decode(v, false) }));
    dispose(fieldsIn);
    let incoming;
    try {
      incoming = response.consume();
    } catch {
      throw new HttpError("connection", `${url}: no body`);
    }
    const chunks = [];
    let total = 0;
    let failure;
    const stream = incoming.stream();
    try {
      for (;;) {
        let chunk;
        try {
          chunk = stream.blockingRead(u64(65536));
        } catch (e) {
          const err = errValue(e);
          if (err && err.tag === "last-operation-failed") {
            const code = httpErrorCode(err.val);
            failure =
              code !== null && code !== undefined
                ? httpError(code, url)
                : new HttpError("connection", `${url}: reading the response failed: ${err.val.toDebugString()}`);
            dispose(err.val);
          } else if (!err || err.tag !== "closed") {
            throw e;
          }
          break;
        }
        chunks.push(chunk);
        total += chunk.length;
      }
    } finally {
      dispose(stream);
    }
    if (failure !== undefined) {
      dispose(incoming);
      throw failure;
    }
    dispose(IncomingBody.finish(incoming));
    const all = new Uint8Array(total);
    let at = 0;
    for (const c of chunks) {
      all.set(c, at);
      at += c.length;
    }
    return new Response(status, entries, all);
  } finally {
    dispose(response);
  }
}
