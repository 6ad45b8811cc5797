//! Values of the `sql` interface to and from PostgreSQL's binary format.
//!
//! A parameter is encoded for the type the server inferred for it (the statement is prepared
//! first), converting where nothing is lost: an int32 for a bigint, a text for a uuid, an int64
//! for a numeric. A column is decoded by its type; a type the interface does not carry is an
//! error that says how to cast it.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::types as pg;
use tokio_postgres::types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};

use crate::engine::bindings::sql::Value;

/// Days from 1970-01-01 (the interface's epoch) to 2000-01-01 (PostgreSQL's).
const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01T00:00:00 to 2000-01-01T00:00:00.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

type BoxError = Box<dyn Error + Sync + Send>;

/// One parameter, encoded for whatever type the statement needs.
#[derive(Debug)]
pub(crate) struct Param<'a>(pub &'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        encode(self.0, ty, out).map_err(Into::into)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A column's raw bytes, decoded by [`decode`].
pub(crate) struct Raw<'a>(pub Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Raw(Some(raw)))
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Raw(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A scalar of a parameter, borrowed from its [`Value`].
#[derive(Clone, Copy, Debug)]
enum Scalar<'a> {
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Text of a kind: `text`, `json`, `uuid` or `numeric`.
    Str(&'static str, &'a str),
    Bytes(&'a [u8]),
    Date(i32),
    Time(i64),
    Ts(i64),
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Bool(_) => "boolean",
            Scalar::Int(_) => "integer",
            Scalar::Float(_) => "float",
            Scalar::Str(k, _) => k,
            Scalar::Bytes(_) => "bytes",
            Scalar::Date(_) => "date",
            Scalar::Time(_) => "time",
            Scalar::Ts(_) => "timestamp",
        }
    }
}

/// The base type of a domain (a domain over `text` takes text).
fn base(ty: &Type) -> &Type {
    match ty.kind() {
        Kind::Domain(b) => base(b),
        _ => ty,
    }
}

fn scalar(v: &Value) -> Option<Scalar<'_>> {
    Some(match v {
        Value::Boolean(b) => Scalar::Bool(*b),
        Value::Int16(i) => Scalar::Int(i64::from(*i)),
        Value::Int32(i) => Scalar::Int(i64::from(*i)),
        Value::Int64(i) => Scalar::Int(*i),
        Value::Float32(f) => Scalar::Float(f64::from(*f)),
        Value::Float64(f) => Scalar::Float(*f),
        Value::Text(s) => Scalar::Str("text", s),
        Value::Json(s) => Scalar::Str("json", s),
        Value::Uuid(s) => Scalar::Str("uuid", s),
        Value::Numeric(s) => Scalar::Str("numeric", s),
        Value::Bytes(b) => Scalar::Bytes(b),
        Value::Date(d) => Scalar::Date(*d),
        Value::Time(t) => Scalar::Time(*t),
        Value::Timestamp(t) | Value::Timestamptz(t) => Scalar::Ts(*t),
        _ => return None,
    })
}

/// The elements of an array parameter.
fn elements(v: &Value) -> Option<Vec<Option<Scalar<'_>>>> {
    fn map<T>(xs: &[Option<T>], f: impl Fn(&T) -> Scalar<'_>) -> Vec<Option<Scalar<'_>>> {
        xs.iter().map(|x| x.as_ref().map(&f)).collect()
    }
    Some(match v {
        Value::BooleanArray(xs) => map(xs, |b| Scalar::Bool(*b)),
        Value::Int16Array(xs) => map(xs, |i| Scalar::Int(i64::from(*i))),
        Value::Int32Array(xs) => map(xs, |i| Scalar::Int(i64::from(*i))),
        Value::Int64Array(xs) => map(xs, |i| Scalar::Int(*i)),
        Value::Float32Array(xs) => map(xs, |f| Scalar::Float(f64::from(*f))),
        Value::Float64Array(xs) => map(xs, |f| Scalar::Float(*f)),
        Value::TextArray(xs) => map(xs, |s| Scalar::Str("text", s)),
        Value::BytesArray(xs) => map(xs, |b| Scalar::Bytes(b)),
        Value::UuidArray(xs) => map(xs, |s| Scalar::Str("uuid", s)),
        Value::NumericArray(xs) => map(xs, |s| Scalar::Str("numeric", s)),
        Value::JsonArray(xs) => map(xs, |s| Scalar::Str("json", s)),
        Value::DateArray(xs) => map(xs, |d| Scalar::Date(*d)),
        Value::TimestamptzArray(xs) => map(xs, |t| Scalar::Ts(*t)),
        _ => return None,
    })
}

/// Encodes `v` as a value of `ty`.
pub(crate) fn encode(v: &Value, ty: &Type, out: &mut BytesMut) -> Result<IsNull, String> {
    if matches!(v, Value::Null) {
        return Ok(IsNull::Yes);
    }
    let ty = base(ty);
    if let Some(s) = scalar(v) {
        encode_scalar(s, ty, out)?;
        return Ok(IsNull::No);
    }
    let Some(items) = elements(v) else {
        return Err("a value of an unknown kind".into());
    };
    let Kind::Array(elem) = ty.kind() else {
        return Err(format!("an array cannot be converted to {}", ty.name()));
    };
    let elem = base(elem);
    let len = i32::try_from(items.len()).map_err(|_| "the array is too long".to_owned())?;
    pg::array_to_sql(
        Some(pg::ArrayDimension {
            len,
            lower_bound: 1,
        }),
        elem.oid(),
        items,
        |item, buf| match item {
            None => Ok(postgres_protocol::IsNull::Yes),
            Some(s) => encode_scalar(s, elem, buf)
                .map(|()| postgres_protocol::IsNull::No)
                .map_err(Into::into),
        },
        out,
    )
    .map_err(|e| e.to_string())?;
    Ok(IsNull::No)
}

fn encode_scalar(s: Scalar<'_>, ty: &Type, out: &mut BytesMut) -> Result<(), String> {
    let no = || format!("a {} value cannot be converted to {}", s.kind(), ty.name());
    let range = |i: i64| format!("{i} is out of range for {}", ty.name());
    match (s, ty) {
        (Scalar::Bool(b), &Type::BOOL) => pg::bool_to_sql(b, out),
        (Scalar::Int(i), &Type::INT2) => {
            pg::int2_to_sql(i16::try_from(i).map_err(|_| range(i))?, out);
        }
        (Scalar::Int(i), &Type::INT4) => {
            pg::int4_to_sql(i32::try_from(i).map_err(|_| range(i))?, out);
        }
        (Scalar::Int(i), &Type::INT8) => pg::int8_to_sql(i, out),
        (Scalar::Int(i), &Type::OID) => {
            pg::oid_to_sql(u32::try_from(i).map_err(|_| range(i))?, out);
        }
        (Scalar::Float(f), &Type::FLOAT4) => pg::float4_to_sql(f as f32, out),
        (Scalar::Int(i), &Type::FLOAT4) => pg::float4_to_sql(i as f32, out),
        (Scalar::Float(f), &Type::FLOAT8) => pg::float8_to_sql(f, out),
        (Scalar::Int(i), &Type::FLOAT8) => pg::float8_to_sql(i as f64, out),
        (Scalar::Str("numeric" | "text", t), &Type::NUMERIC) => numeric_to_sql(t, out)?,
        (Scalar::Int(i), &Type::NUMERIC) => numeric_to_sql(&i.to_string(), out)?,
        (Scalar::Float(f), &Type::NUMERIC) if f.is_finite() => {
            numeric_to_sql(&f.to_string(), out)?;
        }
        (Scalar::Str(_, t), &Type::TEXT | &Type::VARCHAR | &Type::BPCHAR | &Type::NAME) => {
            pg::text_to_sql(t, out);
        }
        (Scalar::Str(_, t), &Type::UNKNOWN) => pg::text_to_sql(t, out),
        (Scalar::Str(_, t), ty) if ty.name() == "citext" || matches!(ty.kind(), Kind::Enum(_)) => {
            pg::text_to_sql(t, out);
        }
        (Scalar::Bytes(b), &Type::BYTEA) => pg::bytea_to_sql(b, out),
        (Scalar::Str("json" | "text", t), &Type::JSON) => pg::text_to_sql(t, out),
        (Scalar::Str("json" | "text", t), &Type::JSONB) => {
            out.put_u8(1);
            pg::text_to_sql(t, out);
        }
        (Scalar::Str("uuid" | "text", t), &Type::UUID) => pg::uuid_to_sql(parse_uuid(t)?, out),
        (Scalar::Date(d), &Type::DATE) => pg::date_to_sql(
            d.checked_sub(PG_EPOCH_DAYS)
                .ok_or_else(|| range(i64::from(d)))?,
            out,
        ),
        (Scalar::Time(t), &Type::TIME) => pg::time_to_sql(t, out),
        (Scalar::Ts(t), &Type::TIMESTAMP | &Type::TIMESTAMPTZ) => {
            pg::timestamp_to_sql(t.checked_sub(PG_EPOCH_US).ok_or_else(|| range(t))?, out);
        }
        _ => return Err(no()),
    }
    Ok(())
}

fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let bad = || format!("{s:?} is not a UUID");
    if hex.len() != 32 {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

fn format_uuid(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `NUMERIC` in PostgreSQL's binary format: base-10000 digits with a weight, a sign and the
/// number of decimal digits after the point.
fn numeric_to_sql(text: &str, out: &mut BytesMut) -> Result<(), String> {
    let bad = || format!("{text:?} is not a decimal number");
    let t = text.trim();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if t.eq_ignore_ascii_case("nan") {
        for v in [0u16, 0, 0xC000, 0] {
            out.put_u16(v);
        }
        return Ok(());
    }
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let dscale = u16::try_from(frac.len()).map_err(|_| bad())?;
    let int = int.trim_start_matches('0');
    // Integer digits grouped by four from the point leftwards, fraction digits rightwards.
    let pad = (4 - int.len() % 4) % 4;
    let int_padded = format!("{}{int}", "0".repeat(pad));
    let frac_pad = (4 - frac.len() % 4) % 4;
    let frac_padded = format!("{frac}{}", "0".repeat(frac_pad));
    let group = |s: &str| -> Vec<i16> {
        s.as_bytes()
            .chunks(4)
            .map(|c| {
                c.iter()
                    .fold(0i16, |acc, d| acc * 10 + i16::from(*d - b'0'))
            })
            .collect()
    };
    let int_groups = group(&int_padded);
    let mut digits = int_groups.clone();
    digits.extend(group(&frac_padded));
    let mut weight = i32::try_from(int_groups.len()).map_err(|_| bad())? - 1;
    let lead = digits.iter().take_while(|d| **d == 0).count();
    digits.drain(..lead);
    weight -= i32::try_from(lead).map_err(|_| bad())?;
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    out.put_i16(i16::try_from(digits.len()).map_err(|_| bad())?);
    out.put_i16(i16::try_from(weight).map_err(|_| bad())?);
    out.put_u16(if neg && !digits.is_empty() { 0x4000 } else { 0 });
    out.put_u16(dscale);
    for d in digits {
        out.put_i16(d);
    }
    Ok(())
}

fn numeric_from_sql(raw: &[u8]) -> Result<String, String> {
    let bad = || "a malformed numeric".to_owned();
    let word = |i: usize| -> Result<i16, String> {
        raw.get(i..i + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(bad)
    };
    let ndigits = usize::try_from(word(0)?).map_err(|_| bad())?;
    let weight = i32::from(word(2)?);
    let sign = word(4)? as u16;
    let dscale = usize::try_from(word(6)?).map_err(|_| bad())?;
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    let digits = (0..ndigits)
        .map(|i| word(8 + 2 * i))
        .collect::<Result<Vec<_>, _>>()?;
    let at = |pos: i32| -> i16 {
        usize::try_from(pos)
            .ok()
            .and_then(|p| digits.get(p).copied())
            .unwrap_or(0)
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for g in 0..=weight {
            if g == 0 {
                s.push_str(&at(g).to_string());
            } else {
                s.push_str(&format!("{:04}", at(g)));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut pos = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", at(pos)));
            pos += 1;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Ok(s)
}

/// Decodes a column of type `ty` (`None`: SQL NULL). `column` names it in the error.
pub(crate) fn decode(ty: &Type, raw: Option<&[u8]>, column: &str) -> Result<Value, String> {
    let Some(raw) = raw else {
        return Ok(Value::Null);
    };
    let ty = base(ty);
    if let Kind::Array(elem) = ty.kind() {
        return decode_array(base(elem), raw, column);
    }
    decode_scalar(ty, raw).unwrap_or_else(|| {
        Err(format!(
            "column \"{column}\" is of type {}, which the sql interface does not carry: cast it in the statement (\"{column}\"::text)",
            ty.name()
        ))
    })
}

/// `None`: a type the interface does not carry.
fn decode_scalar(ty: &Type, raw: &[u8]) -> Option<Result<Value, String>> {
    let e = |e: BoxError| e.to_string();
    Some(match *ty {
        Type::BOOL => pg::bool_from_sql(raw).map(Value::Boolean).map_err(e),
        Type::INT2 => pg::int2_from_sql(raw).map(Value::Int16).map_err(e),
        Type::INT4 => pg::int4_from_sql(raw).map(Value::Int32).map_err(e),
        Type::INT8 => pg::int8_from_sql(raw).map(Value::Int64).map_err(e),
        Type::OID => pg::oid_from_sql(raw)
            .map(|o| Value::Int64(i64::from(o)))
            .map_err(e),
        Type::FLOAT4 => pg::float4_from_sql(raw).map(Value::Float32).map_err(e),
        Type::FLOAT8 => pg::float8_from_sql(raw).map(Value::Float64).map_err(e),
        Type::NUMERIC => numeric_from_sql(raw).map(Value::Numeric),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            pg::text_from_sql(raw)
                .map(|s| Value::Text(s.to_owned()))
                .map_err(e)
        }
        Type::BYTEA => Ok(Value::Bytes(pg::bytea_from_sql(raw).to_vec())),
        Type::JSON => pg::text_from_sql(raw)
            .map(|s| Value::Json(s.to_owned()))
            .map_err(e),
        Type::JSONB => match raw.split_first() {
            Some((1, rest)) => pg::text_from_sql(rest)
                .map(|s| Value::Json(s.to_owned()))
                .map_err(e),
            _ => Err("an unknown jsonb format".into()),
        },
        Type::UUID => pg::uuid_from_sql(raw)
            .map(|b| Value::Uuid(format_uuid(&b)))
            .map_err(e),
        Type::DATE => pg::date_from_sql(raw)
            .map(|d| Value::Date(d.saturating_add(PG_EPOCH_DAYS)))
            .map_err(e),
        Type::TIME => pg::time_from_sql(raw).map(Value::Time).map_err(e),
        Type::TIMESTAMP => pg::timestamp_from_sql(raw)
            .map(|t| Value::Timestamp(t.saturating_add(PG_EPOCH_US)))
            .map_err(e),
        Type::TIMESTAMPTZ => pg::timestamp_from_sql(raw)
            .map(|t| Value::Timestamptz(t.saturating_add(PG_EPOCH_US)))
            .map_err(e),
        _ if ty.name() == "citext" || matches!(ty.kind(), Kind::Enum(_)) => pg::text_from_sql(raw)
            .map(|s| Value::Text(s.to_owned()))
            .map_err(e),
        _ => return None,
    })
}

fn decode_array(elem: &Type, raw: &[u8], column: &str) -> Result<Value, String> {
    let unsupported = || {
        format!(
            "column \"{column}\" is an array of {}, which the sql interface does not carry: cast it in the statement (\"{column}\"::text[])",
            elem.name()
        )
    };
    let array = pg::array_from_sql(raw).map_err(|e| e.to_string())?;
    let dims = array.dimensions().count().map_err(|e| e.to_string())?;
    if dims > 1 {
        return Err(format!(
            "column \"{column}\" is a {dims}-dimensional array; the sql interface carries one dimension"
        ));
    }
    let mut items = Vec::new();
    let mut values = array.values();
    while let Some(v) = values.next().map_err(|e| e.to_string())? {
        items.push(match v {
            None => None,
            Some(raw) => Some(decode_scalar(elem, raw).ok_or_else(unsupported)??),
        });
    }
    macro_rules! collect {
        ($variant:ident, $inner:ident) => {
            Value::$variant(
                items
                    .into_iter()
                    .map(|v| match v {
                        Some(Value::$inner(x)) => Some(x),
                        _ => None,
                    })
                    .collect(),
            )
        };
    }
    Ok(match *elem {
        Type::BOOL => collect!(BooleanArray, Boolean),
        Type::INT2 => collect!(Int16Array, Int16),
        Type::INT4 => collect!(Int32Array, Int32),
        Type::INT8 => collect!(Int64Array, Int64),
        Type::FLOAT4 => collect!(Float32Array, Float32),
        Type::FLOAT8 => collect!(Float64Array, Float64),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => collect!(TextArray, Text),
        Type::BYTEA => collect!(BytesArray, Bytes),
        Type::UUID => collect!(UuidArray, Uuid),
        Type::NUMERIC => collect!(NumericArray, Numeric),
        Type::JSON | Type::JSONB => collect!(JsonArray, Json),
        Type::DATE => collect!(DateArray, Date),
        Type::TIMESTAMPTZ => collect!(TimestamptzArray, Timestamptz),
        Type::TIMESTAMP => Value::TimestamptzArray(
            items
                .into_iter()
                .map(|v| match v {
                    Some(Value::Timestamp(x)) => Some(x),
                    _ => None,
                })
                .collect(),
        ),
        _ if elem.name() == "citext" || matches!(elem.kind(), Kind::Enum(_)) => {
            collect!(TextArray, Text)
        }
        _ => return Err(unsupported()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_numeric(s: &str) -> String {
        let mut buf = BytesMut::new();
        numeric_to_sql(s, &mut buf).expect(s);
        numeric_from_sql(&buf).expect(s)
    }

    #[test]
    fn numerics_keep_their_digits_and_scale() {
        for (given, back) in [
            ("0", "0"),
            ("12.50", "12.50"),
            ("-12.5", "-12.5"),
            ("0.0001", "0.0001"),
            ("123456789.000000001", "123456789.000000001"),
            ("10000", "10000"),
            ("-0.00", "0.00"),
            ("007", "7"),
            ("NaN", "NaN"),
            ("99999999999999999999.99", "99999999999999999999.99"),
        ] {
            assert_eq!(roundtrip_numeric(given), back, "{given}");
        }
        let mut buf = BytesMut::new();
        assert!(numeric_to_sql("1e5", &mut buf).is_err());
        assert!(numeric_to_sql("12,5", &mut buf).is_err());
        assert!(numeric_to_sql(".", &mut buf).is_err());
    }

    #[test]
    fn uuids_parse_and_print_hyphenated() {
        let b = parse_uuid("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11").expect("uuid");
        assert_eq!(format_uuid(&b), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert!(parse_uuid("not-a-uuid").is_err());
    }

    #[test]
    fn a_parameter_converts_only_where_nothing_is_lost() {
        let mut buf = BytesMut::new();
        assert!(encode(&Value::Int32(7), &Type::INT8, &mut buf).is_ok());
        assert!(encode(&Value::Int64(1 << 40), &Type::INT4, &mut buf).is_err());
        assert!(encode(&Value::Text("x".into()), &Type::INT4, &mut buf).is_err());
        assert!(encode(&Value::Boolean(true), &Type::TEXT, &mut buf).is_err());
        assert!(matches!(
            encode(&Value::Null, &Type::INT4, &mut buf),
            Ok(IsNull::Yes)
        ));
        let mut buf = BytesMut::new();
        encode(&Value::Date(0), &Type::DATE, &mut buf).expect("date");
        assert_eq!(
            decode(&Type::DATE, Some(&buf), "d").expect("decode"),
            Value::Date(0)
        );
        let mut buf = BytesMut::new();
        encode(
            &Value::Int64Array(vec![Some(1), None, Some(3)]),
            &Type::INT8_ARRAY,
            &mut buf,
        )
        .expect("array");
        assert_eq!(
            decode(&Type::INT8_ARRAY, Some(&buf), "a").expect("decode"),
            Value::Int64Array(vec![Some(1), None, Some(3)])
        );
    }
}
