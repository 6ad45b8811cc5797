// Keeps a number per message key in kv (`count/<key>`, stored as decimal text): adds the payload
// (an integer; empty adds 1) and publishes the sum to config `target`, keyed like the message.
// The same handler exists in every SDK language; tests/fixtures/counter checks that they all
// store, read and add the same way.

import { handler, publish, config, kv, Reject } from "lockgate-sdk";

const INTEGER = /^[+-]?\d+$/;

export const handle = handler((msg) => {
  const key = msg.keyText();
  if (key === undefined) throw new Reject("no key: the count is kept per message key");
  const text = msg.text().trim();
  if (text !== "" && !INTEGER.test(text)) throw new Reject(`payload "${text}" is not an integer`);
  const add = text === "" ? 1 : Number(text);
  const slot = `count/${key}`;
  const stored = kv.getText(slot);
  if (stored !== undefined && !INTEGER.test(stored)) throw new Reject(`${slot} holds "${stored}", not a number`);
  const total = Number(stored ?? 0) + add;
  kv.set(slot, total); // an integer is stored as its decimal digits
  const target = config.get("target");
  if (target === undefined) throw new Reject("config `target` is not set");
  publish(target, total, { key });
});
