package lockgate

// SQL in the message's own transaction (docs/handlers/sql.md) goes through the bindings the
// build generates, package lockgate/bindings/imports/lockgate_handler_sql: Execute and Query take
// the statement and its parameters ($1, $2, ... as a []Value built with MakeValueText,
// MakeValueInt64, MakeValueNumeric, ...) and return a witTypes.Result whose error is a SqlError.
// SQLError turns that error into the handler's outcome.

import (
	"fmt"
	"strings"

	sql "lockgate/bindings/imports/lockgate_handler_sql"
)

// SQLError is the handler's outcome for a statement's error e, decided as the Rust SDK's `?`
// decides it: a Retry when the database cannot be reached or the SQLSTATE's class is transient
// (40 transaction rollback, such as a serialization failure 40001 or a deadlock 40P01; 08
// connection; 53 resources; 57 operator intervention), a Reject for anything else (a unique
// violation, a syntax error, a refused statement, a result over the grant's limits, an aborted
// transaction, a bad parameter). The reason names the SQLSTATE: `SQL statement failed (23505):
// duplicate key value ... (Key (id)=(7) already exists.)`. Test the code before calling it to
// handle one case yourself (e.Tag() == sql.SqlError_Failed && e.Failed().Code == "23505").
func SQLError(e sql.SqlError) error {
	switch e.Tag() {
	case sql.SqlError_Failed:
		d := e.Failed()
		reason := fmt.Sprintf("SQL statement failed (%s): %s", d.Code, d.Message)
		if d.Detail.IsSome() {
			reason += " (" + d.Detail.Some() + ")"
		}
		for _, class := range []string{"40", "08", "53", "57"} {
			if strings.HasPrefix(d.Code, class) {
				return Retry(reason)
			}
		}
		return Reject(reason)
	case sql.SqlError_Unavailable:
		return Retry("database unavailable: " + e.Unavailable())
	case sql.SqlError_Refused:
		return Reject("SQL statement refused: " + e.Refused())
	case sql.SqlError_TooLarge:
		return Reject("SQL result too large: " + e.TooLarge())
	case sql.SqlError_Aborted:
		return Reject("SQL transaction aborted: " + e.Aborted())
	default:
		return Reject("bad SQL parameter: " + e.BadParameter())
	}
}
