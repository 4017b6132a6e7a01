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

/// How a buffer spells its dedup keys. Fixed when the buffer is created and kept under
/// [`DEDUP_KEYS_KEY`] in its meta column family, so an index is always read the way it was
/// written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DedupKeys {
    /// Buffers created before [`DedupKeys::SourceHash`] (no meta key): the source's length (u32,
    /// big-endian), the source, the id.
    Spelled,
    /// The source's 64-bit FNV-1a hash (big-endian), then the id. Keys of one source still sort
    /// together by id, so a batch's lookups touch neighbouring blocks; they are 21 bytes
    /// shorter for a typical 25-byte source, which is a third of an index entry: more entries
    /// fit in each memtable, so there are fewer flushes and fewer rewrites by compaction (a
    /// quarter less compaction CPU in `make bench-peers`), and every comparison, WAL record and
    /// block is smaller. Two sources share a hash by accident with odds of about 2⁻⁶⁴, and then
    /// only their equal ids are taken for each other. A sender who makes a colliding source on
    /// purpose gains nothing it does not already have: any sender may send another's source.
    SourceHash,
}

/// The meta key that says how the buffer spells its dedup keys.
pub(super) const DEDUP_KEYS_KEY: &[u8] = b"dedup_keys";
/// Its value for [`DedupKeys::SourceHash`].
const SOURCE_HASH: &[u8] = b"source-fnv1a64";

impl DedupKeys {
    /// The spelling a meta value names; `None` for a value this build does not know.
    pub fn from_meta(value: Option<&[u8]>) -> Option<DedupKeys> {
        match value {
            None => Some(DedupKeys::Spelled),
            Some(SOURCE_HASH) => Some(DedupKeys::SourceHash),
            Some(_) => None,
        }
    }

    /// The meta value that names this spelling; `None` for the one without a meta key.
    pub fn meta_value(self) -> Option<&'static [u8]> {
        match self {
            DedupKeys::Spelled => None,
            DedupKeys::SourceHash => Some(SOURCE_HASH),
        }
    }

    /// The length of the key [`DedupKeys::push`] writes.
    pub fn len(self, source: &str, id: &str) -> usize {
        match self {
            DedupKeys::Spelled => 4 + source.len() + id.len(),
            DedupKeys::SourceHash => 8 + id.len(),
        }
    }

    /// Appends the dedup key of `(source, id)` to `out`.
    pub fn push(self, out: &mut Vec<u8>, source: &str, id: &str) {
        match self {
            DedupKeys::Spelled => {
                out.extend_from_slice(&(source.len() as u32).to_be_bytes());
                out.extend_from_slice(source.as_bytes());
            }
            DedupKeys::SourceHash => {
                out.extend_from_slice(&fnv1a64(source.as_bytes()).to_be_bytes())
            }
        }
        out.extend_from_slice(id.as_bytes());
    }
}

/// 64-bit FNV-1a: part of the on-disk format of [`DedupKeys::SourceHash`], so it must never
/// change.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
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

    /// Both spellings of a dedup key byte for byte: they are on disk, so neither may change.
    /// The hash is FNV-1a's published 64-bit test vectors ("" and "a").
    #[test]
    fn dedup_keys_are_spelled_as_stored() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut spelled = Vec::new();
        DedupKeys::Spelled.push(&mut spelled, "svc", "e1");
        assert_eq!(spelled, b"\0\0\0\x03svce1");
        assert_eq!(spelled.len(), DedupKeys::Spelled.len("svc", "e1"));
        let mut hashed = Vec::new();
        DedupKeys::SourceHash.push(&mut hashed, "a", "e1");
        assert_eq!(hashed, b"\xaf\x63\xdc\x4c\x86\x01\xec\x8ce1");
        assert_eq!(hashed.len(), DedupKeys::SourceHash.len("a", "e1"));
        for keys in [DedupKeys::Spelled, DedupKeys::SourceHash] {
            assert_eq!(DedupKeys::from_meta(keys.meta_value()), Some(keys));
        }
        assert_eq!(DedupKeys::from_meta(Some(b"source-md5")), None);
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
