// Package lockgate is the Go SDK for lockgate message handlers.
//
// A handler is a package named handler with one function:
//
//	package handler
//
//	import "lockgate"
//
//	// Handle publishes the payload to the topic configured as `target`.
//	func Handle(msg lockgate.Message) error {
//		target, ok := lockgate.Config("target")
//		if !ok {
//			return lockgate.Reject("`target` is not set")
//		}
//		return lockgate.Publish(target, msg.Payload(), msg.Key())
//	}
//
// scripts/build-guest-go.sh compiles it, this package and the bindings that `wit-bindgen go`
// generates for the world handler-all (wit/sql.wit: handler plus wasi:http and sql; at build
// time, into a build directory) into one Go module named lockgate, and makes a component of it.
//
// Return nil when the message is done (its outputs are then published), Retry/RetryAfter for a
// transient failure, Reject for a message that can never succeed. An *HTTPError (from
// HTTPRequest.Send) is a retry for a timeout or a connection failure and a reject otherwise. Any
// other error, wrapped or not, counts as a retry with err.Error() as the reason: the route's retry policy bounds it and
// then dead-letters the message. A panic traps the instance (outcome `trapped`), which the host
// also retries unless the route sets retry_traps = false.
package lockgate

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	witTypes "go.bytecodealliance.org/pkg/wit/types"

	"lockgate/bindings/imports/lockgate_handler_config"
	"lockgate/bindings/imports/lockgate_handler_emit"
	"lockgate/bindings/imports/lockgate_handler_kv"
	"lockgate/bindings/imports/lockgate_handler_log"
	types "lockgate/bindings/imports/lockgate_handler_types"
)

// Message is the message being handled. Its byte slices belong to the call: copy what you keep
// after Handle returns.
type Message struct{ m types.Message }

// Payload is the message body.
func (m Message) Payload() []byte { return m.m.Payload }

// JSON decodes the payload into v; a payload that does not decode is returned as a Reject.
func (m Message) JSON(v any) error {
	if err := json.Unmarshal(m.m.Payload, v); err != nil {
		return Reject("payload is not valid JSON: " + err.Error())
	}
	return nil
}

// Key is the message key, nil when the message has none.
func (m Message) Key() []byte {
	if m.m.Key.IsSome() {
		if k := m.m.Key.Some(); k != nil {
			return k
		}
		return []byte{}
	}
	return nil
}

// Header returns the first header named name (case-sensitive).
func (m Message) Header(name string) ([]byte, bool) {
	for _, h := range m.m.Headers {
		if h.Name == name {
			return h.Value, true
		}
	}
	return nil, false
}

// Headers are all headers in broker order; a name may repeat.
func (m Message) Headers() []Header {
	out := make([]Header, len(m.m.Headers))
	for i, h := range m.m.Headers {
		out[i] = Header{Name: h.Name, Value: h.Value}
	}
	return out
}

// ID is unique within the route and stable across redeliveries (e.g. `orders/2/1041`).
func (m Message) ID() string { return m.m.Id }

// Topic is the topic, subject or queue the message came from.
func (m Message) Topic() string { return m.m.Topic }

// Attempt is 1 for the first attempt, 2 for the first retry, and so on.
func (m Message) Attempt() uint32 { return m.m.Attempt }

// Partition is the broker partition, when the broker has partitions.
func (m Message) Partition() (uint32, bool) { return m.m.Partition.SomeOr(0), m.m.Partition.IsSome() }

// Offset is the offset or stream sequence, when the broker has one.
func (m Message) Offset() (uint64, bool) { return m.m.Offset.SomeOr(0), m.m.Offset.IsSome() }

// TimestampMs is the broker timestamp in milliseconds since the Unix epoch, when known.
func (m Message) TimestampMs() (uint64, bool) {
	return m.m.TimestampMs.SomeOr(0), m.m.TimestampMs.IsSome()
}

// ReplyTo is where a reply should go (NATS request-reply, RabbitMQ reply_to), when present.
func (m Message) ReplyTo() (string, bool) { return m.m.ReplyTo.SomeOr(""), m.m.ReplyTo.IsSome() }

// Header is one message header.
type Header struct {
	Name  string
	Value []byte
}

// Error is a handler failure that says what the host should do: retry (optionally not before
// a delay) or reject. Build one with Retry, RetryAfter or Reject.
type Error struct {
	reject   bool
	reason   string
	after    time.Duration
	hasAfter bool
}

func (e *Error) Error() string { return e.reason }

// IsReject tells whether the error rejects the message (else it asks for a retry).
func (e *Error) IsReject() bool { return e.reject }

// Reason is the human-readable reason recorded by the host.
func (e *Error) Reason() string { return e.reason }

// Retry asks the host to try the message again after its backoff.
func Retry(reason string) error { return &Error{reason: reason} }

// RetryAfter asks the host to try again, not before d (the route's max_backoff_ms caps it).
func RetryAfter(reason string, d time.Duration) error {
	return &Error{reason: reason, after: d, hasAfter: true}
}

// Reject refuses the message for good: no retry, it goes to the dead-letter destination.
func Reject(reason string) error { return &Error{reject: true, reason: reason} }

// Rejectf is Reject with a fmt format.
func Rejectf(format string, args ...any) error { return Reject(fmt.Sprintf(format, args...)) }

// Retryf is Retry with a fmt format.
func Retryf(format string, args ...any) error { return Retry(fmt.Sprintf(format, args...)) }

// Config returns the handler's config value key (runtime.toml `config` table,
// `lockgate test -c key=value`).
func Config(key string) (string, bool) {
	v := lockgate_handler_config.Get(key)
	return v.SomeOr(""), v.IsSome()
}

// Output is a message to publish; see Publish.
type Output struct {
	Topic   string
	Key     []byte // nil: no key
	Headers []Header
	Payload []byte
}

// Publish buffers o; outputs are released only if Handle returns nil. A refusal by the host
// (topic not in the route's outputs, too large, too many) is returned as a Reject.
func (o Output) Publish() error {
	out := types.Outgoing{Topic: o.Topic, Key: witTypes.None[[]uint8](), Payload: o.Payload}
	if o.Key != nil {
		out.Key = witTypes.Some[[]uint8](o.Key)
	}
	for _, h := range o.Headers {
		out.Headers = append(out.Headers, types.Header{Name: h.Name, Value: h.Value})
	}
	r := lockgate_handler_emit.Publish(out)
	if !r.IsErr() {
		return nil
	}
	switch e := r.Err(); e.Tag() {
	case lockgate_handler_emit.PublishError_NotAllowed:
		return Rejectf("publish failed: topic `%s` is not in the route's outputs", e.NotAllowed())
	case lockgate_handler_emit.PublishError_TooLarge:
		return Rejectf("publish failed: output exceeds the per-output limit of %d bytes", e.TooLarge())
	default:
		return Rejectf("publish failed: invocation already buffered the maximum of %d outputs", e.TooMany())
	}
}

// Publish buffers payload for topic with key (nil: no key). See Output.Publish.
func Publish(topic string, payload, key []byte) error {
	return Output{Topic: topic, Key: key, Payload: payload}.Publish()
}

// Level is a log severity.
type Level = lockgate_handler_log.Level

// Log levels.
const (
	LevelTrace Level = lockgate_handler_log.Level_Trace
	LevelDebug Level = lockgate_handler_log.Level_Debug
	LevelInfo  Level = lockgate_handler_log.Level_Info
	LevelWarn  Level = lockgate_handler_log.Level_Warn
	LevelError Level = lockgate_handler_log.Level_Error
)

// Log records message at level; the host attributes it to the route, handler and message.
func Log(level Level, message string) { lockgate_handler_log.Log(level, message) }

// Debugf logs at debug level with a fmt format.
func Debugf(format string, args ...any) { Log(LevelDebug, fmt.Sprintf(format, args...)) }

// Infof logs at info level with a fmt format.
func Infof(format string, args ...any) { Log(LevelInfo, fmt.Sprintf(format, args...)) }

// Warnf logs at warn level with a fmt format.
func Warnf(format string, args ...any) { Log(LevelWarn, fmt.Sprintf(format, args...)) }

// Errorf logs at error level with a fmt format.
func Errorf(format string, args ...any) { Log(LevelError, fmt.Sprintf(format, args...)) }

func kvError(e lockgate_handler_kv.KvError) error {
	switch e.Tag() {
	case lockgate_handler_kv.KvError_Unavailable:
		return Retry("kv store unavailable: " + e.Unavailable())
	case lockgate_handler_kv.KvError_InvalidKey:
		return Reject("invalid kv key: " + e.InvalidKey())
	default:
		return Rejectf("kv value exceeds the limit of %d bytes", e.TooLarge())
	}
}

// millis rounds d up to whole milliseconds, negative durations to 0.
func millis(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Millisecond - 1) / time.Millisecond)
}

func ttlOption(ttl time.Duration) witTypes.Option[uint64] {
	if ttl <= 0 {
		return witTypes.None[uint64]()
	}
	return witTypes.Some(millis(ttl))
}

func bytesOption(b []byte) witTypes.Option[[]uint8] {
	if b == nil {
		return witTypes.None[[]uint8]()
	}
	return witTypes.Some[[]uint8](b)
}

// KVGet returns the value under key in the handler's kv namespace and whether it is present
// (test the bool: a present empty value may be a nil slice). Errors: an unavailable store is a
// Retry, a bad key a Reject.
//
// On a route with an idempotency key, a message's kv writes are held back and applied together
// with its key when it succeeds (a failed call leaves no trace); elsewhere they take effect at
// once and are not undone when the call fails (docs/handlers/contract.md).
func KVGet(key string) ([]byte, bool, error) {
	r := lockgate_handler_kv.Get(key)
	if r.IsErr() {
		return nil, false, kvError(r.Err())
	}
	v := r.Ok()
	return v.SomeOr(nil), v.IsSome(), nil
}

// KVSet stores value under key; with ttl > 0 the entry expires after ttl (rounded up to ms), with
// ttl <= 0 never.
func KVSet(key string, value []byte, ttl time.Duration) error {
	if r := lockgate_handler_kv.Set(key, value, ttlOption(ttl)); r.IsErr() {
		return kvError(r.Err())
	}
	return nil
}

// KVDelete removes key and tells whether it was present.
func KVDelete(key string) (bool, error) {
	r := lockgate_handler_kv.Delete(key)
	if r.IsErr() {
		return false, kvError(r.Err())
	}
	return r.Ok(), nil
}

// KVCompareAndSwap replaces the value under key with new (nil: remove) if the current value
// equals expected (nil: absent or expired; []byte{}: present and empty), and tells whether it
// did; a differing value is (false, nil), not an error. ttl as in KVSet.
func KVCompareAndSwap(key string, expected, new []byte, ttl time.Duration) (bool, error) {
	r := lockgate_handler_kv.CompareAndSwap(key, bytesOption(expected), bytesOption(new), ttlOption(ttl))
	if r.IsErr() {
		return false, kvError(r.Err())
	}
	return r.Ok(), nil
}

// Dispatch runs handle on one message and turns its error into the WIT result. The export glue
// (bindings/exports/export_wit_world) calls it; handlers do not.
func Dispatch(handle func(Message) error, m types.Message) witTypes.Result[witTypes.Unit, types.HandlerError] {
	err := handle(Message{m})
	if err == nil {
		return witTypes.Ok[witTypes.Unit, types.HandlerError](witTypes.Unit{})
	}
	var e *Error
	if !errors.As(err, &e) {
		if e = httpOutcome(err); e == nil {
			e = &Error{reason: err.Error()}
		}
	} else if e != err {
		// Wrapped: keep the whole message ("context: reason") but the inner decision.
		e = &Error{reject: e.reject, reason: err.Error(), after: e.after, hasAfter: e.hasAfter}
	}
	if e.reject {
		return witTypes.Err[witTypes.Unit](types.MakeHandlerErrorReject(e.reason))
	}
	after := witTypes.None[uint64]()
	if e.hasAfter {
		after = witTypes.Some(millis(e.after))
	}
	return witTypes.Err[witTypes.Unit](types.MakeHandlerErrorRetry(types.RetryError{Reason: e.reason, AfterMs: after}))
}
