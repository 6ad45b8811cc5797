//! The outputs kept with an applied idempotency key: a holder that committed a message's kv
//! effects keeps its outputs with the key, so whoever finishes the message after a crash
//! publishes them instead of running the handler again. A version byte, then per record its
//! topic, key, headers and payload, each length-prefixed (u32, big-endian).

use crate::message::OutRecord;

/// Version byte of [`encode_outputs`].
const OUTPUTS_V1: u8 = 1;

/// Encodes outputs to keep them with a committed key: a version byte, then per record its
/// topic, key, headers and payload, each length-prefixed (u32, big-endian).
pub fn encode_outputs(records: &[OutRecord]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = vec![OUTPUTS_V1];
    out.extend_from_slice(
        &u32::try_from(records.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for r in records {
        put(&mut out, r.topic.as_bytes());
        match &r.key {
            Some(k) => {
                out.push(1);
                put(&mut out, k);
            }
            None => out.push(0),
        }
        out.extend_from_slice(
            &u32::try_from(r.headers.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        for (name, value) in &r.headers {
            put(&mut out, name.as_bytes());
            put(&mut out, value);
        }
        put(&mut out, &r.payload);
    }
    out
}

/// Decodes what [`encode_outputs`] wrote.
pub fn decode_outputs(bytes: &[u8]) -> Result<Vec<OutRecord>, String> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("truncated".into());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn u32(&mut self) -> Result<usize, String> {
            let b = self.take(4)?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        }
        fn bytes(&mut self) -> Result<Vec<u8>, String> {
            let n = self.u32()?;
            Ok(self.take(n)?.to_vec())
        }
        fn string(&mut self) -> Result<String, String> {
            String::from_utf8(self.bytes()?).map_err(|_| "a name is not UTF-8".to_owned())
        }
    }
    let mut r = Reader(bytes);
    if r.take(1)? != [OUTPUTS_V1] {
        return Err("unknown outputs encoding".into());
    }
    let n = r.u32()?;
    let mut records = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let topic = r.string()?;
        let key = match r.take(1)? {
            [0] => None,
            _ => Some(r.bytes()?),
        };
        let headers = (0..r.u32()?)
            .map(|_| Ok((r.string()?, r.bytes()?)))
            .collect::<Result<Vec<_>, String>>()?;
        let payload = r.bytes()?;
        records.push(OutRecord {
            topic,
            key,
            headers,
            payload,
        });
    }
    if !r.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(records)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn outputs_round_trip() {
        let records = vec![
            OutRecord {
                topic: "a".into(),
                key: Some(vec![0, 1, 255]),
                headers: vec![("h".into(), b"v".to_vec()), ("e".into(), vec![])],
                payload: b"payload".to_vec(),
            },
            OutRecord {
                topic: "b".into(),
                key: None,
                headers: vec![],
                payload: vec![],
            },
        ];
        let bytes = encode_outputs(&records);
        assert_eq!(decode_outputs(&bytes).unwrap(), records);
        assert_eq!(decode_outputs(&encode_outputs(&[])).unwrap(), vec![]);
        assert!(decode_outputs(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_outputs(b"").is_err());
        assert!(decode_outputs(&[9, 0, 0, 0, 0]).is_err());
    }
}
