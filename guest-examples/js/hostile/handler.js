// Tries what the sandbox must deny and publishes what happened, to topic `out`.
//
// Payload `file`: reads /etc/passwd. `socket`: connects to 127.0.0.1:22. `env`: counts environment
// variables. `fetch`: fetches http://127.0.0.1:22/ (QuickJS has no fetch; StarlingMonkey has one
// whose wasi:http imports the build removed, so the call traps). `bug`: throws an exception the SDK
// does not map (the call traps). `async`: returns a promise, which the SDK refuses (a trap). Each probe
// publishes `denied: <why>` (or `env: <n> vars`); anything that got through publishes
// `ALLOWED: ...`, which the sandbox fixture would catch.
//
// Neither JS runtime lockgate builds with (QuickJS, StarlingMonkey) has a file, socket or
// environment API: those exist only as Node builtins, which jco implements with host interfaces
// (`jco:node/*`) that lockgate does not provide, so scripts/build-guest-js.sh refuses a guest that
// imports them. This guest looks for every global such an API could hide behind and uses what it
// finds.

import { handler, publish, Reject } from "lockgate-sdk";

const g = globalThis;
const present = (names) => names.filter((n) => g[n] !== undefined);

function tryFile() {
  if (typeof g.require === "function") {
    try {
      return `ALLOWED: read ${g.require("fs").readFileSync("/etc/passwd").length} bytes`;
    } catch (e) {
      return `denied: ${e}`;
    }
  }
  if (g.std && typeof g.std.loadFile === "function") {
    const text = g.std.loadFile("/etc/passwd");
    return text === null ? "denied: std.loadFile returned null" : `ALLOWED: read ${text.length} chars`;
  }
  const apis = present(["require", "process", "Deno", "Bun", "std", "os", "fetch"]);
  return `denied: no file API in this JS runtime (globals present: ${apis.join(", ") || "none"})`;
}

function trySocket() {
  if (typeof g.require === "function") {
    try {
      g.require("net").createConnection({ host: "127.0.0.1", port: 22 });
      return "ALLOWED: connecting";
    } catch (e) {
      return `denied: ${e}`;
    }
  }
  const apis = present(["require", "Deno", "Bun", "os", "fetch", "WebSocket", "XMLHttpRequest"]);
  return `denied: no socket API in this JS runtime (globals present: ${apis.join(", ") || "none"})`;
}

function tryEnv() {
  const env = g.process && g.process.env ? g.process.env : g.std && g.std.getenviron ? g.std.getenviron() : {};
  const names = Object.keys(env).sort();
  const source = g.process ? "process.env" : g.std ? "std.getenviron()" : "no environment API";
  return `env: ${names.length} vars [${names.join(", ")}] (${source})`;
}

function tryFetch() {
  if (typeof g.fetch !== "function") return "denied: no fetch in this JS runtime";
  // StarlingMonkey defines fetch, but the build disables wasi:http (-d http): the call traps.
  g.fetch("http://127.0.0.1:22/");
  return "ALLOWED: fetch started";
}

const probes = {
  file: tryFile,
  fetch: tryFetch,
  socket: trySocket,
  env: tryEnv,
  bug: () => {
    throw new Error("a bug in the handler");
  },
};

export const handle = handler((msg) => {
  const what = msg.text();
  // An async handler: the SDK must trap it rather than acknowledge work that never ran.
  if (what === "async") return Promise.resolve().then(() => publish("out", "ALLOWED: an async handler ran"));
  const probe = probes[what];
  if (probe === undefined) throw new Reject(`unknown probe \`${what}\`; expected one of ${Object.keys(probes)}`);
  publish("out", probe());
});
