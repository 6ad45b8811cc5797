// Package handler is a test instrument for the SDK's HTTP helper (tests/tests/guests_go.rs):
// each message is a JSON request description, `{"method": "POST", "url": "...", "auth":
// "secret", "body_bytes": 10000, "redirects": false}`, sent with the headers `x-keep: 1`,
// `authorization: <auth>` when given, and `content-type: text/plain` with a body of body_bytes
// bytes (`a` to `z`, repeating). It publishes what came back to `probe.out`: the status and the
// error kind (or "") in headers `status` and `error`, the response body as the payload.
package handler

import (
	"errors"
	"strconv"

	"lockgate"
)

// Handle sends one described request.
func Handle(msg lockgate.Message) error {
	var spec struct {
		Method    string `json:"method"`
		URL       string `json:"url"`
		Auth      string `json:"auth"`
		BodyBytes int    `json:"body_bytes"`
		Redirects *bool  `json:"redirects"`
	}
	if err := msg.JSON(&spec); err != nil {
		return err
	}
	req := lockgate.NewHTTPRequest(spec.Method, spec.URL).WithHeader("x-keep", "1")
	if spec.Auth != "" {
		req.WithHeader("authorization", spec.Auth)
	}
	if spec.BodyBytes > 0 {
		body := make([]byte, spec.BodyBytes)
		for i := range body {
			body[i] = byte('a' + i%26)
		}
		req.WithBody(body).WithHeader("content-type", "text/plain")
	}
	if spec.Redirects != nil && !*spec.Redirects {
		req.WithoutRedirects()
	}
	status, kind, payload := 0, "", []byte(nil)
	resp, err := req.Send()
	var he *lockgate.HTTPError
	switch {
	case errors.As(err, &he):
		kind, payload = he.Kind.String(), []byte(he.Error())
	case err != nil:
		return err
	default:
		status, payload = resp.Status, resp.Body
	}
	return lockgate.Output{
		Topic: "probe.out",
		Headers: []lockgate.Header{
			{Name: "status", Value: []byte(strconv.Itoa(status))},
			{Name: "error", Value: []byte(kind)},
		},
		Payload: payload,
	}.Publish()
}
