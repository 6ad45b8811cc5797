// Package export_wit_world connects the generated `handle` export to the handler package. It is
// the one hand-written file under bindings/: scripts/build-guest-go.sh generates the rest of
// bindings/ with `wit-bindgen go --pkg-name lockgate/bindings` and puts the handler's sources in
// handler/.
package export_wit_world

import (
	witTypes "go.bytecodealliance.org/pkg/wit/types"

	"lockgate"
	types "lockgate/bindings/imports/lockgate_handler_types"
	"lockgate/handler"
)

// Handle is called by the generated export for every message.
func Handle(m types.Message) witTypes.Result[witTypes.Unit, types.HandlerError] {
	return lockgate.Dispatch(handler.Handle, m)
}
