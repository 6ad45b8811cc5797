// Package handler routes a JSON message by its `kind` field to config `route.<kind>`, else to
// config `default`; the payload and key are forwarded unchanged.
package handler

import "lockgate"

// Handle routes one message. Invalid JSON and a missing `kind` are rejected.
func Handle(msg lockgate.Message) error {
	var envelope struct {
		Kind *string `json:"kind"`
	}
	if err := msg.JSON(&envelope); err != nil {
		return err
	}
	if envelope.Kind == nil {
		return lockgate.Reject("missing `kind` field")
	}
	kind := *envelope.Kind
	topic, ok := lockgate.Config("route." + kind)
	if !ok {
		if topic, ok = lockgate.Config("default"); !ok {
			return lockgate.Rejectf("no route for kind `%s` and no `default`", kind)
		}
	}
	lockgate.Debugf("routing %s (kind `%s`) to %s", msg.ID(), kind, topic)
	return lockgate.Publish(topic, msg.Payload(), msg.Key())
}
