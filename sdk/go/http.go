package lockgate

// Outbound HTTP from a handler, synchronous like Handle (docs/handlers/http.md).
//
// What a request may reach is the handler's grant in runtime.toml
// (`[handlers.<name>.http] allowed_hosts = [...]`); anything else fails with an *HTTPError of
// kind HTTPDenied. The host never follows a redirect; Send follows up to MaxRedirects (each hop
// is checked against the grant again) unless NoRedirects is set. Every request carries an
// `Idempotency-Key` the host derives from the message, the same on every retry and redelivery.

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	witTypes "go.bytecodealliance.org/pkg/wit/types"

	handler "lockgate/bindings/imports/wasi_http_outgoing_handler"
	ht "lockgate/bindings/imports/wasi_http_types"
	"lockgate/bindings/imports/wasi_io_streams"
)

// MaxRedirects is how many redirects Send follows by default.
const MaxRedirects = 5

// HTTPHeader is one request or response header.
type HTTPHeader struct {
	Name  string
	Value string
}

// HTTPRequest is a request to send with Send. The zero Method is GET.
type HTTPRequest struct {
	Method  string // GET, HEAD, POST, PUT, PATCH, DELETE or any other token; "" is GET
	URL     string // absolute http:// or https:// URL
	Headers []HTTPHeader
	Body    []byte
	// Timeout bounds the wait for the response headers; 0 leaves it to the grant's timeout_ms
	// (the call's deadline bounds it in any case).
	Timeout time.Duration
	// NoRedirects returns a 3xx as it is instead of following it.
	NoRedirects bool
}

// NewHTTPRequest is a request with method to url.
func NewHTTPRequest(method, url string) *HTTPRequest {
	return &HTTPRequest{Method: method, URL: url}
}

// HTTPGet is a GET of url.
func HTTPGet(url string) *HTTPRequest { return NewHTTPRequest("GET", url) }

// HTTPPost is a POST of body to url.
func HTTPPost(url string, body []byte) *HTTPRequest {
	return &HTTPRequest{Method: "POST", URL: url, Body: body}
}

// HTTPPut is a PUT of body to url.
func HTTPPut(url string, body []byte) *HTTPRequest {
	return &HTTPRequest{Method: "PUT", URL: url, Body: body}
}

// HTTPDelete is a DELETE of url.
func HTTPDelete(url string) *HTTPRequest { return NewHTTPRequest("DELETE", url) }

// WithHeader adds a header and returns r.
func (r *HTTPRequest) WithHeader(name, value string) *HTTPRequest {
	r.Headers = append(r.Headers, HTTPHeader{Name: name, Value: value})
	return r
}

// WithBody sets the body and returns r.
func (r *HTTPRequest) WithBody(body []byte) *HTTPRequest {
	r.Body = body
	return r
}

// WithJSON sets the body to v encoded as JSON, with `content-type: application/json`, and
// returns r. A value encoding/json cannot encode (a channel, a func) leaves the body empty.
func (r *HTTPRequest) WithJSON(v any) *HTTPRequest {
	b, err := json.Marshal(v)
	if err != nil {
		b = nil
	}
	r.Body = b
	r.Headers = withoutHeader(r.Headers, "content-type")
	return r.WithHeader("content-type", "application/json")
}

// WithTimeout sets Timeout and returns r.
func (r *HTTPRequest) WithTimeout(d time.Duration) *HTTPRequest {
	r.Timeout = d
	return r
}

// WithoutRedirects sets NoRedirects and returns r.
func (r *HTTPRequest) WithoutRedirects() *HTTPRequest {
	r.NoRedirects = true
	return r
}

// HTTPResponse is a response, read to its end.
type HTTPResponse struct {
	Status  int
	Headers []HTTPHeader // names lower-cased, in order
	Body    []byte
}

// Header returns the first header called name (any case).
func (r *HTTPResponse) Header(name string) (string, bool) {
	for _, h := range r.Headers {
		if strings.EqualFold(h.Name, name) {
			return h.Value, true
		}
	}
	return "", false
}

// Text is the body as a string.
func (r *HTTPResponse) Text() string { return string(r.Body) }

// JSON decodes the body into v; a body that does not decode is returned as a Reject.
func (r *HTTPResponse) JSON(v any) error {
	if err := json.Unmarshal(r.Body, v); err != nil {
		return Rejectf("HTTP %d: the response is not the expected JSON: %v", r.Status, err)
	}
	return nil
}

// ErrorForStatus is nil for a status below 400, else the handler's error for it: a 5xx, a 429 or
// a 408 is a Retry (a RetryAfter when the server sends `Retry-After: <seconds>`), any other 4xx
// a Reject. So an outage of the dependency retries and opens the route's breaker, and nothing is
// dead-lettered while it is down.
func (r *HTTPResponse) ErrorForStatus() error {
	s := r.Status
	if s < 400 {
		return nil
	}
	snippet := r.Body
	if len(snippet) > 200 {
		snippet = snippet[:200]
	}
	reason := fmt.Sprintf("HTTP %d: %s", s, strings.TrimSpace(strings.ToValidUTF8(string(snippet), "")))
	if s >= 500 || s == 429 || s == 408 {
		if v, ok := r.Header("retry-after"); ok {
			if secs, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32); err == nil {
				return RetryAfter(reason, time.Duration(secs)*time.Second)
			}
		}
		return Retry(reason)
	}
	return Reject(reason)
}

// HTTPErrorKind is why a request got no response.
type HTTPErrorKind int

const (
	// HTTPDenied: the handler's grant does not allow the URL (or it resolves to an internal
	// address a wildcard entry may not reach).
	HTTPDenied HTTPErrorKind = iota
	// HTTPTimeout: no response in time (Timeout, the grant's timeout_ms, the call's deadline).
	HTTPTimeout
	// HTTPConnection: the connection failed: refused, reset, DNS, TLS.
	HTTPConnection
	// HTTPTooLarge: the request or the response is larger than the grant allows.
	HTTPTooLarge
	// HTTPInvalid: the request is malformed (a bad URL, method or header).
	HTTPInvalid
)

func (k HTTPErrorKind) String() string {
	switch k {
	case HTTPDenied:
		return "denied"
	case HTTPTimeout:
		return "timeout"
	case HTTPConnection:
		return "connection"
	case HTTPTooLarge:
		return "too_large"
	default:
		return "invalid"
	}
}

// HTTPError is a request that got no response. Returned from Handle (wrapped or not), a
// timeout or a connection failure is a Retry; a denial, a size limit or a malformed request
// fails the same way every time and is a Reject.
type HTTPError struct {
	Kind    HTTPErrorKind
	Message string
}

func (e *HTTPError) Error() string {
	switch e.Kind {
	case HTTPDenied:
		return "HTTP request denied: " + e.Message
	case HTTPTimeout:
		return "HTTP request timed out: " + e.Message
	case HTTPConnection:
		return "HTTP connection failed: " + e.Message
	case HTTPTooLarge:
		return "HTTP message too large: " + e.Message
	default:
		return "invalid HTTP request: " + e.Message
	}
}

// IsRetry tells whether the failure is transient (a timeout or a connection failure).
func (e *HTTPError) IsRetry() bool { return e.Kind == HTTPTimeout || e.Kind == HTTPConnection }

// asError is the handler outcome of e (see HTTPError).
func (e *HTTPError) asError() *Error {
	return &Error{reject: !e.IsRetry(), reason: e.Error()}
}

// Send sends the request, follows redirects (unless NoRedirects) and reads the whole response.
// The error is an *HTTPError; return it from Handle as it is (or wrapped) to retry or reject.
func (r *HTTPRequest) Send() (*HTTPResponse, error) {
	req := *r
	req.Headers = append([]HTTPHeader(nil), r.Headers...)
	left := MaxRedirects
	if r.NoRedirects {
		left = 0
	}
	for {
		resp, err := send(&req)
		if err != nil {
			return nil, err
		}
		next, err := req.redirected(resp, left)
		if err != nil || next == nil {
			return resp, err
		}
		req = *next
		left--
	}
}

// redirected is the request a redirect resp leads to, or nil when it is not one to follow.
func (r *HTTPRequest) redirected(resp *HTTPResponse, left int) (*HTTPRequest, error) {
	switch resp.Status {
	case 301, 302, 303, 307, 308:
	default:
		return nil, nil
	}
	location, ok := resp.Header("location")
	if left <= 0 || !ok {
		return nil, nil
	}
	url, err := resolveURL(r.URL, location)
	if err != nil {
		return nil, err
	}
	next := *r
	next.URL = url
	next.Headers = append([]HTTPHeader(nil), r.Headers...)
	if resp.Status == 303 || (resp.Status != 307 && resp.Status != 308 && strings.EqualFold(r.method(), "POST")) {
		next.Method = "GET"
		next.Body = nil
		next.Headers = withoutHeader(next.Headers, "content-type")
	}
	if origin(url) != origin(r.URL) {
		// Credentials are for the host they were written for.
		next.Headers = withoutHeader(withoutHeader(next.Headers, "authorization"), "cookie")
	}
	return &next, nil
}

func (r *HTTPRequest) method() string {
	if r.Method == "" {
		return "GET"
	}
	return r.Method
}

func withoutHeader(hs []HTTPHeader, name string) []HTTPHeader {
	out := hs[:0:0]
	for _, h := range hs {
		if !strings.EqualFold(h.Name, name) {
			out = append(out, h)
		}
	}
	return out
}

// origin is `scheme://authority` of url ("" when it has none).
func origin(url string) string {
	scheme, rest, ok := strings.Cut(url, "://")
	if !ok {
		return ""
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	return strings.ToLower(scheme) + "://" + rest
}

// resolveURL resolves location against base: absolute URLs as they are, `//host/...` with the
// base's scheme, `/path` on the same origin, anything else relative to the base's directory.
func resolveURL(base, location string) (string, error) {
	if strings.Contains(location, "://") {
		return location, nil
	}
	o := origin(base)
	if o == "" {
		return "", &HTTPError{Kind: HTTPInvalid, Message: fmt.Sprintf("bad URL `%s`", base)}
	}
	if rest, ok := strings.CutPrefix(location, "//"); ok {
		scheme, _, _ := strings.Cut(o, "://")
		return scheme + "://" + rest, nil
	}
	if strings.HasPrefix(location, "/") {
		return o + location, nil
	}
	_, path, _, err := splitURL(base)
	if err != nil {
		return "", err
	}
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	dir := "/"
	if i := strings.LastIndexByte(path, '/'); i >= 0 {
		dir = path[:i+1]
	}
	return o + dir + location, nil
}

// splitURL is the scheme (https or not), authority and path-with-query of an absolute URL.
func splitURL(url string) (https bool, authority, path string, err error) {
	bad := func(why string) error {
		return &HTTPError{Kind: HTTPInvalid, Message: fmt.Sprintf("`%s`: %s", url, why)}
	}
	scheme, rest, ok := strings.Cut(url, "://")
	if !ok {
		return false, "", "", bad("not an absolute http:// or https:// URL")
	}
	switch strings.ToLower(scheme) {
	case "http":
	case "https":
		https = true
	default:
		return false, "", "", bad("the scheme must be http or https")
	}
	end := len(rest)
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		end = i
	}
	authority, path = rest[:end], rest[end:]
	if authority == "" {
		return false, "", "", bad("the host is missing")
	}
	path, _, _ = strings.Cut(path, "#")
	if path == "" {
		path = "/"
	} else if path[0] == '?' {
		path = "/" + path
	}
	return https, authority, path, nil
}

// httpError maps the host's error code to an HTTPError for url.
func httpError(e ht.ErrorCode, url string) *HTTPError {
	switch e.Tag() {
	case ht.ErrorCode_HttpRequestDenied:
		return &HTTPError{HTTPDenied, url + " is not allowed by the handler's grant (allowed_hosts)"}
	case ht.ErrorCode_DestinationIpProhibited:
		return &HTTPError{HTTPDenied, url + " resolves to an internal address its allowed_hosts entry does not name"}
	case ht.ErrorCode_ConnectionTimeout, ht.ErrorCode_ConnectionReadTimeout, ht.ErrorCode_HttpResponseTimeout:
		return &HTTPError{HTTPTimeout, url}
	case ht.ErrorCode_HttpRequestBodySize:
		return &HTTPError{HTTPTooLarge, "the request body is over the grant's max_request_bytes" + sizeOf(e.HttpRequestBodySize())}
	case ht.ErrorCode_HttpResponseBodySize:
		return &HTTPError{HTTPTooLarge, "the response of " + url + " is over the grant's max_response_bytes" + sizeOf(e.HttpResponseBodySize())}
	case ht.ErrorCode_HttpRequestMethodInvalid:
		return &HTTPError{HTTPInvalid, url + ": invalid method"}
	case ht.ErrorCode_HttpRequestUriInvalid:
		return &HTTPError{HTTPInvalid, url + ": invalid URI"}
	default:
		return &HTTPError{HTTPConnection, fmt.Sprintf("%s: %s", url, errorCodeName(e))}
	}
}

func sizeOf(n witTypes.Option[uint64]) string {
	if n.IsSome() {
		return fmt.Sprintf(" (%d)", n.Some())
	}
	return ""
}

// errorCodeName names the wasi:http error codes a connection failure shows.
func errorCodeName(e ht.ErrorCode) string {
	switch e.Tag() {
	case ht.ErrorCode_DnsTimeout:
		return "DNS timeout"
	case ht.ErrorCode_DnsError:
		return "DNS error"
	case ht.ErrorCode_DestinationNotFound:
		return "destination not found"
	case ht.ErrorCode_DestinationUnavailable:
		return "destination unavailable"
	case ht.ErrorCode_DestinationIpUnroutable:
		return "destination IP unroutable"
	case ht.ErrorCode_ConnectionRefused:
		return "connection refused"
	case ht.ErrorCode_ConnectionTerminated:
		return "connection terminated"
	case ht.ErrorCode_ConnectionLimitReached:
		return "connection limit reached"
	case ht.ErrorCode_TlsProtocolError:
		return "TLS protocol error"
	case ht.ErrorCode_TlsCertificateError:
		return "TLS certificate error"
	case ht.ErrorCode_TlsAlertReceived:
		return "TLS alert received"
	case ht.ErrorCode_HttpResponseIncomplete:
		return "response incomplete"
	case ht.ErrorCode_HttpProtocolError:
		return "HTTP protocol error"
	case ht.ErrorCode_InternalError:
		if m := e.InternalError(); m.IsSome() {
			return "internal error: " + m.Some()
		}
		return "internal error"
	default:
		return fmt.Sprintf("error code %d", e.Tag())
	}
}

func wasiMethod(m string) ht.Method {
	switch strings.ToUpper(m) {
	case "", "GET":
		return ht.MakeMethodGet()
	case "HEAD":
		return ht.MakeMethodHead()
	case "POST":
		return ht.MakeMethodPost()
	case "PUT":
		return ht.MakeMethodPut()
	case "PATCH":
		return ht.MakeMethodPatch()
	case "DELETE":
		return ht.MakeMethodDelete()
	case "OPTIONS":
		return ht.MakeMethodOptions()
	default:
		return ht.MakeMethodOther(m)
	}
}

// send is one request and its whole response, through wasi:http/outgoing-handler.
func send(r *HTTPRequest) (*HTTPResponse, error) {
	url := r.URL
	https, authority, path, err := splitURL(url)
	if err != nil {
		return nil, err
	}
	invalid := func(what string) error {
		return &HTTPError{HTTPInvalid, fmt.Sprintf("%s: bad %s", url, what)}
	}
	fields := ht.MakeFields()
	hasLength := false
	for _, h := range r.Headers {
		if res := fields.Append(h.Name, []byte(h.Value)); res.IsErr() {
			fields.Drop()
			return nil, invalid(fmt.Sprintf("header `%s`", h.Name))
		}
		hasLength = hasLength || strings.EqualFold(h.Name, "content-length")
	}
	if len(r.Body) > 0 && !hasLength {
		fields.Append("content-length", []byte(strconv.Itoa(len(r.Body))))
	}
	req := ht.MakeOutgoingRequest(fields)
	if req.SetMethod(wasiMethod(r.Method)).IsErr() {
		req.Drop()
		return nil, invalid("method")
	}
	scheme := ht.MakeSchemeHttp()
	if https {
		scheme = ht.MakeSchemeHttps()
	}
	if req.SetScheme(witTypes.Some(scheme)).IsErr() {
		req.Drop()
		return nil, invalid("scheme")
	}
	if req.SetAuthority(witTypes.Some(authority)).IsErr() {
		req.Drop()
		return nil, invalid("host")
	}
	if req.SetPathWithQuery(witTypes.Some(path)).IsErr() {
		req.Drop()
		return nil, invalid("path")
	}
	bodyRes := req.Body()
	if bodyRes.IsErr() {
		req.Drop()
		return nil, invalid("body")
	}
	body := bodyRes.Ok()
	options := witTypes.None[*ht.RequestOptions]()
	if r.Timeout > 0 {
		o := ht.MakeRequestOptions()
		o.SetFirstByteTimeout(witTypes.Some(uint64(r.Timeout.Nanoseconds())))
		options = witTypes.Some(o)
	}
	// Sent first, written after: the host reads the body while it is written.
	handled := handler.Handle(req, options)
	if handled.IsErr() {
		body.Drop()
		return nil, httpError(handled.Err(), url)
	}
	future := handled.Ok()
	defer future.Drop()
	if w := body.Write(); w.IsOk() {
		stream := w.Ok()
		for rest := r.Body; len(rest) > 0; {
			n := min(len(rest), 4096)
			if stream.BlockingWriteAndFlush(rest[:n]).IsErr() {
				break
			}
			rest = rest[n:]
		}
		stream.Drop()
	}
	ht.OutgoingBodyFinish(body, witTypes.None[*ht.Fields]())
	var got witTypes.Result[witTypes.Result[*ht.IncomingResponse, ht.ErrorCode], witTypes.Unit]
	for {
		o := future.Get()
		if o.IsSome() {
			got = o.Some()
			break
		}
		p := future.Subscribe()
		p.Block()
		p.Drop()
	}
	if got.IsErr() {
		return nil, &HTTPError{HTTPConnection, url + ": response taken twice"}
	}
	if got.Ok().IsErr() {
		return nil, httpError(got.Ok().Err(), url)
	}
	incoming := got.Ok().Ok()
	defer incoming.Drop()
	out := &HTTPResponse{Status: int(incoming.Status())}
	headers := incoming.Headers()
	for _, e := range headers.Entries() {
		out.Headers = append(out.Headers, HTTPHeader{Name: strings.ToLower(e.F0), Value: string(e.F1)})
	}
	headers.Drop()
	consumed := incoming.Consume()
	if consumed.IsErr() {
		return nil, &HTTPError{HTTPConnection, url + ": no body"}
	}
	inBody := consumed.Ok()
	streamRes := inBody.Stream()
	if streamRes.IsErr() {
		inBody.Drop()
		return nil, &HTTPError{HTTPConnection, url + ": no body stream"}
	}
	stream := streamRes.Ok()
	var readErr error
	for {
		chunk := stream.BlockingRead(64 * 1024)
		if chunk.IsOk() {
			out.Body = append(out.Body, chunk.Ok()...)
			continue
		}
		if e := chunk.Err(); e.Tag() == wasi_io_streams.StreamError_LastOperationFailed {
			ioErr := e.LastOperationFailed()
			if code := ht.HttpErrorCode(ioErr); code.IsSome() {
				readErr = httpError(code.Some(), url)
			} else {
				readErr = &HTTPError{HTTPConnection, url + ": reading the response failed: " + ioErr.ToDebugString()}
			}
			ioErr.Drop()
		}
		break
	}
	// Children before parents: the stream, then the body (finished), then the response.
	stream.Drop()
	trailers := ht.IncomingBodyFinish(inBody)
	trailers.Drop()
	if readErr != nil {
		return nil, readErr
	}
	return out, nil
}

// httpOutcome turns an *HTTPError anywhere in err's chain into the handler's decision (see
// HTTPError), keeping err's whole text as the reason; nil when there is none.
func httpOutcome(err error) *Error {
	var he *HTTPError
	if !errors.As(err, &he) {
		return nil
	}
	e := he.asError()
	e.reason = err.Error()
	return e
}
