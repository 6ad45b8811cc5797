//! The record frame of a segment: `u32 LE body length`, `u32 LE crc32(body)`, then the body.
//! The same length-and-crc framing holds the entries of the dedup file (see [`super::dedup`]).

use std::io::{self, Read};

use super::super::{BrokerError, OutRecord};

/// Bytes before a frame's body: length and crc.
pub(super) const FRAME_HEADER: u64 = 8;
/// Largest record body accepted; a longer length field is treated as corruption.
pub(super) const MAX_BODY: usize = 64 << 20;
/// Smallest valid record body: timestamp, key flag, header count, payload length.
const MIN_BODY: usize = 8 + 1 + 4 + 4;

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), BrokerError> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| BrokerError::Invalid("record field larger than 4 GiB".to_owned()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Header (length, crc) and body of one record. The body: `u64 LE timestamp_ms`, `u8` key flag
/// (0 = none, 1 = `u32 LE length` + key), `u32 LE header count`, per header `u32 LE length` +
/// UTF-8 name and `u32 LE length` + value, then `u32 LE length` + payload.
pub(super) fn encode_frame(timestamp_ms: u64, r: &OutRecord) -> Result<Vec<u8>, BrokerError> {
    let mut f = vec![0u8; FRAME_HEADER as usize];
    f.extend_from_slice(&timestamp_ms.to_le_bytes());
    match &r.key {
        None => f.push(0),
        Some(key) => {
            f.push(1);
            put_bytes(&mut f, key)?;
        }
    }
    let headers = u32::try_from(r.headers.len())
        .map_err(|_| BrokerError::Invalid("too many headers".to_owned()))?;
    f.extend_from_slice(&headers.to_le_bytes());
    for (name, value) in &r.headers {
        put_bytes(&mut f, name.as_bytes())?;
        put_bytes(&mut f, value)?;
    }
    put_bytes(&mut f, &r.payload)?;
    let body_len = f.len() - FRAME_HEADER as usize;
    if body_len > MAX_BODY {
        return Err(BrokerError::Invalid(format!(
            "record for topic {} is {body_len} bytes encoded; the local broker takes at most {MAX_BODY}",
            r.topic
        )));
    }
    seal(&mut f);
    Ok(f)
}

/// Fills in the length and crc of a frame whose body follows `FRAME_HEADER` zero bytes. The
/// caller keeps the body under 4 GiB.
pub(super) fn seal(f: &mut [u8]) {
    let header = FRAME_HEADER as usize;
    let crc = crc32fast::hash(&f[header..]);
    let len = u32::try_from(f.len() - header).unwrap_or(u32::MAX);
    f[..4].copy_from_slice(&len.to_le_bytes());
    f[4..header].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded frame body.
pub(super) struct Body {
    pub(super) timestamp_ms: u64,
    pub(super) key: Option<Vec<u8>>,
    pub(super) headers: Vec<(String, Vec<u8>)>,
    pub(super) payload: Vec<u8>,
}

/// Reads little-endian fields off a byte slice.
pub(super) struct Fields<'a>(pub(super) &'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(super) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A `u32 LE` length and that many bytes.
    pub(super) fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
}

fn decode_body(body: &[u8]) -> Option<Body> {
    let mut c = Fields(body);
    let timestamp_ms = c.u64()?;
    let key = match c.u8()? {
        0 => None,
        1 => Some(c.bytes()?.to_vec()),
        _ => return None,
    };
    let n = c.u32()?;
    let mut headers = Vec::new();
    for _ in 0..n {
        let name = std::str::from_utf8(c.bytes()?).ok()?.to_owned();
        headers.push((name, c.bytes()?.to_vec()));
    }
    let payload = c.bytes()?.to_vec();
    c.0.is_empty().then_some(Body {
        timestamp_ms,
        key,
        headers,
        payload,
    })
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The next complete frame whose body is `min..=max` bytes and matches its crc, as its raw
/// body; `None` at the end of the valid data (end of file, a frame still being written, or a
/// torn or corrupt frame). The caller re-positions the reader after `None`.
pub(super) fn read_raw(r: &mut impl Read, min: usize, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; FRAME_HEADER as usize];
    if read_full(r, &mut header)? < header.len() {
        return Ok(None);
    }
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    let Ok(len_usize) = usize::try_from(len) else {
        return Ok(None);
    };
    if !(min..=max).contains(&len_usize) {
        return Ok(None);
    }
    // Room for bodies up to 1 MiB at once; a longer one grows with the data actually present,
    // so a garbage length does not allocate it all.
    let mut body = Vec::with_capacity(len_usize.min(1 << 20));
    r.take(u64::from(len)).read_to_end(&mut body)?;
    if body.len() < len_usize || crc32fast::hash(&body) != crc {
        return Ok(None);
    }
    Ok(Some(body))
}

/// The next valid record frame and its size in bytes, or `None` at the end of the valid data
/// (see [`read_raw`]).
pub(super) fn read_frame(r: &mut impl Read) -> io::Result<Option<(Body, u64)>> {
    let Some(body) = read_raw(r, MIN_BODY, MAX_BODY)? else {
        return Ok(None);
    };
    let size = FRAME_HEADER + body.len() as u64;
    Ok(decode_body(&body).map(|b| (b, size)))
}
