// Package handler keeps a number per message key in kv (`count/<key>`, stored as decimal text):
// it adds the payload (an integer; empty adds 1) and publishes the sum to config `target`, keyed
// like the message. The same handler exists in every SDK language; tests/fixtures/counter checks
// that they all store, read and add the same way.
package handler

import (
	"strconv"
	"strings"

	"lockgate"
)

// Handle adds one message's number to its key's count.
func Handle(msg lockgate.Message) error {
	key := msg.Key()
	if key == nil {
		return lockgate.Reject("no key: the count is kept per message key")
	}
	text := strings.TrimSpace(string(msg.Payload()))
	add := int64(1)
	if text != "" {
		n, err := strconv.ParseInt(text, 10, 64)
		if err != nil {
			return lockgate.Rejectf("payload %q is not an integer", text)
		}
		add = n
	}
	slot := "count/" + string(key)
	stored, found, err := lockgate.KVGet(slot)
	if err != nil {
		return err
	}
	current := int64(0)
	if found {
		if current, err = strconv.ParseInt(string(stored), 10, 64); err != nil {
			return lockgate.Rejectf("%s holds %q, not a number", slot, stored)
		}
	}
	sum := strconv.FormatInt(current+add, 10)
	if err := lockgate.KVSet(slot, []byte(sum), 0); err != nil {
		return err
	}
	target, ok := lockgate.Config("target")
	if !ok {
		return lockgate.Reject("config `target` is not set")
	}
	return lockgate.Publish(target, []byte(sum), key)
}
