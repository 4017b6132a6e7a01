//! The on-disk encoding of records and keys.
//!
//! An event record is `[version=2][crc32c of the rest, u32][appended_ms u64][target len u8]
//! [target][json]`. Version 1 records (no checksum) written by earlier releases are still read.
//! The checksum catches damage RocksDB's own block checksums cannot see (a bad write that
//! reached the memtable, a tool that edited the database), so a damaged record is quarantined
//! instead of being forwarded or failing the whole buffer.

use super::BufferError;

/// Which outputs a stored record is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    All,
    Only(String),
}

const V1: u8 = 1;
const V2: u8 = 2;
/// version + crc + appended_ms + target length.
const V2_HEADER: usize = 1 + 4 + 8 + 1;

/// The length of a stored event's record.
pub(super) fn record_len(target: &Target, json_len: usize) -> usize {
    V2_HEADER + target_name(target).len() + json_len
}

fn target_name(target: &Target) -> &[u8] {
    match target {
        Target::All => &[],
        // Output names are validated to at most 63 bytes; the length must fit in a byte.
        Target::Only(name) => &name.as_bytes()[..name.len().min(u8::MAX as usize)],
    }
}

/// Encodes a stored event.
pub(super) fn encode_record(target: &Target, appended_ms: u64, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(record_len(target, json.len()));
    encode_record_into(&mut out, target, appended_ms, json);
    out
}

/// Encodes a stored event into `out`, replacing what it held.
pub(super) fn encode_record_into(
    out: &mut Vec<u8>,
    target: &Target,
    appended_ms: u64,
    json: &[u8],
) {
    let name = target_name(target);
    out.clear();
    out.push(V2);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&appended_ms.to_be_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(json);
    let crc = crc32c::crc32c(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_be_bytes());
}

/// A decoded record, borrowing from the stored value.
pub(super) struct DecodedRecord<'a> {
    pub appended_ms: u64,
    pub target: Option<&'a [u8]>,
    pub json: &'a [u8],
}

/// Why a stored record cannot be used; the label of `tally_buffer_quarantined_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The header names a version this build does not know, or is cut short.
    Header,
    /// The checksum does not match the content.
    Checksum,
    /// The key is not a sequence number.
    Key,
}

impl Damage {
    pub fn as_str(self) -> &'static str {
        match self {
            Damage::Header => "bad_header",
            Damage::Checksum => "bad_checksum",
            Damage::Key => "bad_key",
        }
    }
}

pub(super) fn decode_record(value: &[u8]) -> Result<DecodedRecord<'_>, Damage> {
    let (body, appended_at) = match value.first() {
        Some(&V1) => (value, 1),
        Some(&V2) if value.len() >= V2_HEADER => {
            let stored = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
            if crc32c::crc32c(&value[5..]) != stored {
                return Err(Damage::Checksum);
            }
            (value, 5)
        }
        _ => return Err(Damage::Header),
    };
    let name_at = appended_at + 8;
    if body.len() <= name_at {
        return Err(Damage::Header);
    }
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&body[appended_at..name_at]);
    let name_len = body[name_at] as usize;
    let json_at = name_at + 1 + name_len;
    if body.len() < json_at {
        return Err(Damage::Header);
    }
    Ok(DecodedRecord {
        appended_ms: u64::from_be_bytes(ms),
        target: (name_len > 0).then(|| &body[name_at + 1..json_at]),
        json: &body[json_at..],
    })
}

pub(super) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(super) fn key_seq(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

pub(super) fn cursor_key(consumer: &str) -> Vec<u8> {
    format!("cursor/{consumer}").into_bytes()
}

/// The length of the key [`push_dedup_key`] writes.
pub(super) fn dedup_key_len(source: &str, id: &str) -> usize {
    4 + source.len() + id.len()
}

/// Appends the dedup key of `(source, id)` to `out`: the source's length, the source, the id.
pub(super) fn push_dedup_key(out: &mut Vec<u8>, source: &str, id: &str) {
    out.extend_from_slice(&(source.len() as u32).to_be_bytes());
    out.extend_from_slice(source.as_bytes());
    out.extend_from_slice(id.as_bytes());
}

/// Dead letters of one output sort together: output name, NUL, sequence.
pub(super) fn dead_letter_prefix(output: &str) -> Vec<u8> {
    let mut key = output.as_bytes().to_vec();
    key.push(0);
    key
}

pub(super) fn dead_letter_key(output: &str, seq: u64) -> Vec<u8> {
    let mut key = dead_letter_prefix(output);
    key.extend_from_slice(&seq_key(seq));
    key
}

/// The output a dead-letter key belongs to.
pub(super) fn dead_letter_output(key: &[u8]) -> &[u8] {
    let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    &key[..end]
}

pub(super) fn u64_value(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or_default()
}

pub(super) fn corrupt(key: impl Into<String>, reason: impl Into<String>) -> BufferError {
    BufferError::Corrupt {
        key: key.into(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let value = encode_record(&Target::Only("b".into()), 42, br#"{"id":"1"}"#);
        let record = decode_record(&value).expect("decodes");
        assert_eq!(record.appended_ms, 42);
        assert_eq!(record.target, Some(&b"b"[..]));
        assert_eq!(record.json, br#"{"id":"1"}"#);
        assert_eq!(value.len(), record_len(&Target::Only("b".into()), 10));

        let mut flipped = value.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        assert_eq!(decode_record(&flipped).err(), Some(Damage::Checksum));
        assert_eq!(decode_record(&value[..7]).err(), Some(Damage::Header));
        assert_eq!(decode_record(b"\x09garbage").err(), Some(Damage::Header));
        assert_eq!(decode_record(b"").err(), Some(Damage::Header));
    }

    #[test]
    fn version_one_records_are_still_read() {
        let mut v1 = vec![1];
        v1.extend_from_slice(&7u64.to_be_bytes());
        v1.push(0);
        v1.extend_from_slice(b"{}");
        let record = decode_record(&v1).expect("decodes");
        assert_eq!(
            (record.appended_ms, record.target, record.json),
            (7, None, &b"{}"[..])
        );
    }
}
