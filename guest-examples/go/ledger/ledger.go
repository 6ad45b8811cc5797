// Package handler is a SQL projection, the Go twin of guest-examples/ledger (Rust): each deposit
// (`{"deposit_id": "...", "account": "a7", "amount": 42}`) adds its amount to its account's row
// of the `account_balances` table (config `table`, default `account_balances`) and counts it:
//
//	CREATE TABLE account_balances (
//	    account text PRIMARY KEY,
//	    balance bigint NOT NULL,
//	    deposits bigint NOT NULL
//	);
//
// The statement is a plain `balance = balance + $2`: not idempotent by itself. It is applied once
// per message because it runs in the message's transaction, which lockgate commits with the
// message's idempotency key (the route's `idempotency = { key = "json:/deposit_id" }` on the same
// PostgreSQL store); a retry, a crash or a redelivery never applies it twice
// (docs/handlers/sql.md). A deposit without an account or with a zero amount is rejected.
//
// It calls the generated bindings of `lockgate:handler/sql` directly, and lockgate.SQLError turns
// a failed statement into a retry (database unreachable, serialization failure, deadlock, ...)
// or a rejection (anything else), with the SQLSTATE in the reason.
package handler

import (
	"lockgate"
	sql "lockgate/bindings/imports/lockgate_handler_sql"
)

type deposit struct {
	Account string `json:"account"`
	Amount  int64  `json:"amount"`
}

// Handle applies one deposit.
func Handle(msg lockgate.Message) error {
	var d deposit
	if err := msg.JSON(&d); err != nil {
		return err
	}
	if d.Account == "" || d.Amount == 0 {
		return lockgate.Reject("a deposit needs an account and a non-zero amount")
	}
	table, ok := lockgate.Config("table")
	if !ok {
		table = "account_balances"
	}
	r := sql.Execute(
		"INSERT INTO "+table+" AS b (account, balance, deposits) VALUES ($1, $2, 1)\n"+
			"ON CONFLICT (account) DO UPDATE SET balance = b.balance + $2, deposits = b.deposits + 1",
		[]sql.Value{sql.MakeValueText(d.Account), sql.MakeValueInt64(d.Amount)},
	)
	if r.IsErr() {
		return lockgate.SQLError(r.Err())
	}
	return nil
}
