// Routes a JSON message by its `kind` field to config `route.<kind>`, else to config `default`.
// The payload is forwarded unchanged, with the message's key.

import { handler, publish, config, log, Reject } from "lockgate-sdk";

export const handle = handler((msg) => {
  const data = msg.json(); // invalid JSON: rejected, never retried
  const kind = data !== null && typeof data === "object" && !Array.isArray(data) ? data.kind : undefined;
  if (kind === undefined || kind === null) throw new Reject("missing `kind` field");
  if (typeof kind !== "string") throw new Reject(`\`kind\` must be a string, got ${typeof kind}`);
  const topic = config.get(`route.${kind}`) ?? config.get("default");
  if (topic === undefined) throw new Reject(`no route for kind \`${kind}\` and no \`default\``);
  log.debug(`routing ${msg.id} (kind \`${kind}\`) to ${topic}`);
  publish(topic, msg.payload, { key: msg.key });
});
