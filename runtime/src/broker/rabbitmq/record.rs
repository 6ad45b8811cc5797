//! An AMQP message as the pipeline sees it: headers carried as bytes, the key from its
//! header, the `lockgate-id` and correlation id from the message properties, and the attempts
//! already made (from the quorum queue's delivery count and the retry queues' header).

use lapin::types::AMQPValue;

use crate::message::{CORRELATION_HEADER, LOCKGATE_ID_HEADER, Record};

use super::{ATTEMPTS_HEADER, KEY_HEADER};

/// A header value as bytes: strings as they are, numbers and booleans as text; other types
/// (tables, arrays) are not carried.
fn value_bytes(v: &AMQPValue) -> Option<Vec<u8>> {
    Some(match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::ShortShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongLongInt(n) => n.to_string().into_bytes(),
        AMQPValue::Timestamp(n) => n.to_string().into_bytes(),
        _ => return None,
    })
}

fn value_u32(v: &AMQPValue) -> Option<u32> {
    match v {
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// A delivery as the pipeline sees it, and the attempts already made.
pub(super) fn record(queue: &str, d: &lapin::message::Delivery) -> (Record, u32) {
    let props = &d.properties;
    let mut headers = Vec::new();
    let mut key = None;
    let mut delivered_before = None;
    let mut retried = 0;
    if let Some(table) = props.headers() {
        for (name, value) in table {
            match name.as_str() {
                "x-delivery-count" => delivered_before = value_u32(value),
                ATTEMPTS_HEADER => {
                    retried = value_bytes(value)
                        .and_then(|v| String::from_utf8(v).ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                }
                // The broker's record of the retry queues it passed through.
                "x-death"
                | "x-first-death-exchange"
                | "x-first-death-queue"
                | "x-first-death-reason" => {}
                KEY_HEADER => key = value_bytes(value),
                n => {
                    if let Some(v) = value_bytes(value) {
                        headers.push((n.to_owned(), v));
                    }
                }
            }
        }
    }
    if let Some(id) = props.message_id()
        && !headers.iter().any(|(n, _)| n == LOCKGATE_ID_HEADER)
    {
        headers.push((
            LOCKGATE_ID_HEADER.to_owned(),
            id.as_str().as_bytes().to_vec(),
        ));
    }
    // The request's correlation id: the pipeline copies it onto the answers.
    if let Some(c) = props.correlation_id()
        && !headers.iter().any(|(n, _)| n == CORRELATION_HEADER)
    {
        headers.push((
            CORRELATION_HEADER.to_owned(),
            c.as_str().as_bytes().to_vec(),
        ));
    }
    // Classic queues only say "redelivered", not how often. A copy put back through a retry
    // queue is a new message: its header counts the attempts before it.
    let previous = retried + delivered_before.unwrap_or(u32::from(d.redelivered));
    let record = Record {
        topic: queue.to_owned(),
        partition: None,
        offset: None,
        key,
        headers,
        payload: d.data.clone(),
        timestamp_ms: props.timestamp().map(|s| s.saturating_mul(1000)),
        reply_to: props.reply_to().as_ref().map(|r| r.as_str().to_owned()),
        delivery: None,
    };
    (record, previous)
}
