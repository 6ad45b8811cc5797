//! The idempotent processor: each order (`{"order_id": "o-17", "customer": "c-3", "total":
//! "12.50"}`) becomes a row of the `orders` table (config `table`, default `orders`) and an
//! `order-accepted` event published to config `events` (key: the order id):
//!
//! ```sql
//! CREATE TABLE orders (
//!     order_id text          PRIMARY KEY,
//!     customer text          NOT NULL,
//!     total    numeric(12,2) NOT NULL CHECK (total > 0)
//! );
//! ```
//!
//! The textbook version of this consumer inserts the processed message id, the business row
//! and an outbox row in one transaction it opens itself. Here the host does it: the route's
//! idempotency key (`json:/order_id`, on the same PostgreSQL store as the handler's `sql` grant)
//! is the processed id, the statement runs in the message's transaction, and with `outputs = {
//! mode = "outbox" }` the published event is an outbox row in that same transaction. All three
//! commit together or not at all; a retry, a crash or a redelivery never inserts twice or
//! publishes an event without its row (docs/handlers/sql.md).
//!
//! An order that breaks the table's rules (a total of zero or less, an amount that is not a
//! number) is rejected with the server's reason. An order id that is already in the table
//! (placed by some other path) is left alone and publishes nothing.

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::sql::{self, Value};
use lockgate_sdk::{Error, Message, config, log};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Order {
    order_id: String,
    customer: String,
    total: String,
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let o: Order = msg.json()?;
    if o.order_id.is_empty() || o.customer.is_empty() {
        return Err(Error::reject("an order needs an order_id and a customer"));
    }
    let table = config::get("table").unwrap_or_else(|| "orders".to_owned());
    let inserted = sql::execute(
        &format!(
            "INSERT INTO {table} (order_id, customer, total) VALUES ($1, $2, $3)
             ON CONFLICT (order_id) DO NOTHING"
        ),
        &[
            o.order_id.as_str().into(),
            o.customer.as_str().into(),
            Value::Numeric(o.total.clone()),
        ],
    )?;
    if inserted == 0 {
        log::info(format!("order {} is already placed", o.order_id));
        return Ok(());
    }
    let topic = config::get("events").ok_or_else(|| Error::reject("config `events` is not set"))?;
    Outgoing::new(topic)
        .key(o.order_id.as_bytes())
        .payload(
            json!({"event": "order-accepted", "order_id": o.order_id, "customer": o.customer, "total": o.total})
                .to_string(),
        )
        .publish()?;
    Ok(())
}
