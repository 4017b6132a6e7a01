//! The fast path of structured-mode parsing: one pass over a request body that checks its JSON
//! and reads the attributes OpenMeter's rules need, for the bodies senders send.
//!
//! It accepts only what the serde_json path of the parent module accepts, and reads the same
//! attributes from it. On anything else (a syntax error, a key twice, an escaped key, deep
//! nesting, a large object, a number near the edge of f64's range, an event that is not an
//! object) it gives up, and the caller parses the body again with serde_json, which accepts it
//! or writes the precise error. So no error message depends on this module, and a body it gives
//! up on costs one more pass. The parent's tests compare the two paths on generated bodies.

use std::borrow::Cow;

use super::{Attributes, Scanned};

/// One event of a scanned body: its text, without the whitespace around it, and the attributes
/// the rules read.
pub(super) struct Item<'a> {
    pub text: &'a str,
    pub attributes: Attributes<'a>,
}

/// The deepest nesting taken here, counting the event object as 1; serde_json's limit is 128.
const MAX_DEPTH: usize = 32;
/// The most keys one object may have here; serde_json's path takes larger objects.
const MAX_KEYS: usize = 32;
/// Numbers below `10^MAX_MAGNITUDE` are in f64's range (which ends near `1.8e308`) whichever way
/// they round; serde_json's path judges the others.
const MAX_MAGNITUDE: i64 = 300;

/// Scans a body that is one event object (`batch` false) or a non-empty array of event objects
/// (`batch` true), with only JSON whitespace around it. `None` when the body is anything else or
/// this scanner is not sure of it.
pub(super) fn scan(body: &[u8], batch: bool) -> Option<Vec<Item<'_>>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut scanner = Scanner { text, pos: 0 };
    scanner.skip_whitespace();
    let mut items = Vec::new();
    if batch {
        scanner.eat(b'[')?;
        loop {
            scanner.skip_whitespace();
            items.push(scanner.event()?);
            scanner.skip_whitespace();
            match scanner.next()? {
                b',' => {}
                b']' => break,
                _ => return None,
            }
        }
    } else {
        items.push(scanner.event()?);
    }
    scanner.skip_whitespace();
    (scanner.pos == text.len()).then_some(items)
}

/// What a value is, and a string's text between its quotes (still escaped when `escaped`).
enum Value<'a> {
    Null,
    Bool,
    Number,
    Str { raw: &'a str, escaped: bool },
    Array,
    Object,
}

impl<'a> Value<'a> {
    /// The value as the rules see it; an escaped string is unescaped by serde_json itself.
    fn scanned(self) -> Option<Scanned<'a>> {
        Some(match self {
            Value::Null => Scanned::Null,
            Value::Bool => Scanned::Bool,
            Value::Number => Scanned::Number,
            Value::Str {
                raw,
                escaped: false,
            } => Scanned::Str(Cow::Borrowed(raw)),
            Value::Str { raw, escaped: true } => Scanned::Str(Cow::Owned(
                serde_json::from_str(&format!("\"{raw}\"")).ok()?,
            )),
            Value::Array => Scanned::Array,
            Value::Object => Scanned::Object,
        })
    }
}

struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek() == Some(byte)).then(|| self.pos += 1)
    }

    /// Skips JSON's four whitespace bytes (and nothing else: no form feed, no Unicode spaces).
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// An event object, with its attributes.
    fn event(&mut self) -> Option<Item<'a>> {
        let start = self.pos;
        let mut attributes = Attributes::default();
        self.object(1, |key, value| {
            if let Some(slot) = attributes.slot(key) {
                *slot = Some(value.scanned()?);
            }
            Some(())
        })?;
        Some(Item {
            text: &self.text[start..self.pos],
            attributes,
        })
    }

    /// An object at `depth`, handing each member to `member`. Gives up on an escaped key (its
    /// unescaped text would be needed to compare it) and on a key twice.
    fn object(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&'a str, Value<'a>) -> Option<()>,
    ) -> Option<()> {
        self.eat(b'{')?;
        self.skip_whitespace();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        let mut keys = [""; MAX_KEYS];
        let mut count = 0;
        loop {
            let (key, escaped) = self.string()?;
            if escaped || count == MAX_KEYS || keys[..count].contains(&key) {
                return None;
            }
            keys[count] = key;
            count += 1;
            self.skip_whitespace();
            self.eat(b':')?;
            self.skip_whitespace();
            let value = self.value(depth)?;
            member(key, value)?;
            self.skip_whitespace();
            match self.next()? {
                b',' => self.skip_whitespace(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.eat(b'[')?;
        self.skip_whitespace();
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            self.value(depth)?;
            self.skip_whitespace();
            match self.next()? {
                b',' => self.skip_whitespace(),
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A value inside an object or array at `depth`.
    fn value(&mut self, depth: usize) -> Option<Value<'a>> {
        Some(match self.peek()? {
            b'"' => {
                let (raw, escaped) = self.string()?;
                Value::Str { raw, escaped }
            }
            b'{' if depth < MAX_DEPTH => {
                self.object(depth + 1, |_, _| Some(()))?;
                Value::Object
            }
            b'[' if depth < MAX_DEPTH => {
                self.array(depth + 1)?;
                Value::Array
            }
            b'n' => self.literal(b"null", Value::Null)?,
            b't' => self.literal(b"true", Value::Bool)?,
            b'f' => self.literal(b"false", Value::Bool)?,
            b'-' | b'0'..=b'9' => {
                self.number()?;
                Value::Number
            }
            _ => return None,
        })
    }

    fn literal(&mut self, word: &[u8], value: Value<'a>) -> Option<Value<'a>> {
        let end = self.pos + word.len();
        (self.bytes().get(self.pos..end)? == word).then(|| {
            self.pos = end;
            value
        })
    }

    /// A number as JSON writes it (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`), taken only
    /// when its magnitude is clearly within f64's range: serde_json refuses the ones beyond.
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        let integer = match self.next()? {
            b'0' => 1,
            b'1'..=b'9' => 1 + self.digits(),
            _ => return None,
        };
        if self.eat(b'.').is_some() && self.digits() == 0 {
            return None;
        }
        let mut exponent = 0;
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            let sign = match self.peek() {
                Some(b'-') => -1,
                Some(b'+') => 1,
                _ => 0,
            };
            if sign != 0 {
                self.pos += 1;
            }
            let start = self.pos;
            let length = self.digits();
            if length == 0 || length > 4 {
                return None;
            }
            let value: i64 = self.text[start..self.pos].parse().ok()?;
            exponent = if sign < 0 { -value } else { value };
        }
        (i64::try_from(integer).ok()? + exponent <= MAX_MAGNITUDE).then_some(())
    }

    /// Skips decimal digits, returning how many.
    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    /// A string: its text between the quotes, and whether it holds escapes. Gives up on a control
    /// character, an escape JSON does not have and a UTF-16 surrogate that is not half of a
    /// pair, all of which serde_json refuses.
    fn string(&mut self) -> Option<(&'a str, bool)> {
        self.eat(b'"')?;
        let bytes = self.bytes();
        let start = self.pos;
        let mut at = start;
        let mut escaped = false;
        loop {
            // Plain bytes, eight at a time, then straight to the first special one.
            while let Some(word) = bytes.get(at..).and_then(<[u8]>::first_chunk::<8>) {
                let found = special(u64::from_le_bytes(*word));
                if found != 0 {
                    at += (found.trailing_zeros() / 8) as usize;
                    break;
                }
                at += 8;
            }
            match *bytes.get(at)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    at = escape(bytes, at + 1)?;
                }
                0..=0x1f => return None,
                _ => at += 1,
            }
        }
        self.pos = at + 1;
        Some((&self.text[start..at], escaped))
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The bytes of `word` (read little-endian) that are `"`, `\\` or a control character (below
/// 0x20), as a mask of their high bits; 0 if there are none. A term can also flag a byte after a
/// special one (its subtraction borrows from the special byte), but never one before: no byte
/// below the first special one borrows (`x - 1` borrows only from a zero byte, `x - 0x20` only
/// from one below 0x20, and bytes from 0x80 up are masked out by `!x`). So the mask's lowest
/// bit marks the first special byte exactly.
fn special(word: u64) -> u64 {
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let found = (quote.wrapping_sub(ONES) & !quote)
        | (backslash.wrapping_sub(ONES) & !backslash)
        | (word.wrapping_sub(ONES * 0x20) & !word);
    found & HIGH
}

/// The end of the escape whose letter is at `at` (just after its `\`).
fn escape(bytes: &[u8], at: usize) -> Option<usize> {
    match *bytes.get(at)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(at + 1),
        b'u' => match hex4(bytes, at + 1)? {
            0xD800..=0xDBFF => {
                // A leading surrogate, which must be followed by an escaped trailing one.
                if bytes.get(at + 5..at + 7)? != b"\\u" {
                    return None;
                }
                (0xDC00..=0xDFFF)
                    .contains(&hex4(bytes, at + 7)?)
                    .then_some(at + 11)
            }
            0xDC00..=0xDFFF => None,
            _ => Some(at + 5),
        },
        _ => None,
    }
}

/// The four hex digits at `at`.
fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    bytes.get(at..at + 4)?.iter().try_fold(0, |code, &digit| {
        Some(code * 16 + char::from(digit).to_digit(16)?)
    })
}

#[cfg(test)]
mod tests {
    use super::super::{BodyShape, parse_structured, parse_with_serde};
    use super::*;

    /// `special` finds the first `"`, `\\` or control byte of a word exactly, whatever comes
    /// before it (plain ASCII, the bytes around the thresholds, UTF-8 continuation bytes) and
    /// after it (other special bytes included), and nothing in a word without one.
    #[test]
    fn special_marks_the_first_special_byte_exactly() {
        let plain = [
            b'a', b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xa0, 0xc3, 0xff,
        ];
        let specials: Vec<u8> = (0..0x20).chain([b'"', b'\\']).collect();
        for &fill in &plain {
            assert_eq!(special(u64::from_le_bytes([fill; 8])), 0, "{fill:#x}");
            for at in 0..8 {
                for &first in &specials {
                    for &after in specials.iter().chain(&plain) {
                        let mut word = [fill; 8];
                        word[at] = first;
                        for byte in &mut word[at + 1..] {
                            *byte = after;
                        }
                        let found = special(u64::from_le_bytes(word));
                        assert_eq!(found.trailing_zeros() / 8, at as u32, "{word:02x?}");
                    }
                }
            }
        }
    }

    /// Bodies as senders write them: SDK output, hand-written JSON, escapes, numbers, nesting.
    const SEEDS: &[&str] = &[
        r#"{"specversion":"1.0","id":"a1","source":"svc","type":"api-calls","subject":"cust-1","time":"2024-01-31T12:00:00Z","data":{"method":"GET","path":"/v1","duration_ms":12.5,"n":[1,-2,3e2,0.5E-3,null,true,false,{}]}}"#,
        r#"[{"specversion":"1.0","id":"b1","source":"s","type":"t","subject":"c"},
            {"specversion":"1.0","id":"b2","source":"s","type":"t","subject":"c","data":null,"k8snamespace":"shop","k8spod":"p-1"}]"#,
        " \t\r\n[ { \"specversion\" : \"1.0\" , \"id\" : \"c\\u00e9\\ud83d\\ude00\" , \"source\" : \"s\\/x\\\\y\\\"z\" , \"type\" : \"t\" , \"subject\" : \"\u{e9}t\u{e9}\" , \"data\" : { \"a\" : [ [ ] , { } , \"\\b\\f\\n\\r\\t\" ] } } ] \n",
        r#"{"specversion":"1.0","id":"d","source":"s","type":"t","subject":"c","datacontenttype":"application/json","dataschema":"https://x/y","data":{"big":12345678901234567890123,"tiny":1e-999,"neg":-0,"exp":1E+298}}"#,
        r#"[{"specversion":"1.0","id":"e","source":"s","type":"t","subject":"c","time":"not a time"}]"#,
        r#"[{"specversion":"1.0","id":"","source":"s","type":"t","subject":"c"}]"#,
        r#"{"specversion":"0.3","id":"f","source":"s","type":"t","subject":7,"data":"text"}"#,
    ];

    /// Bytes a mutation writes: JSON's punctuation, escapes, digits, UTF-8 lead bytes, controls.
    const BYTES: &[u8] = b"\"\\{}[],: \t\n\r\x0c\x01u0189aAdDeE+-.ntfl\xc3\xa9\xed\xa0\x80\xff";

    /// A small deterministic generator (xorshift64*), so that a failure can be replayed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
        }
    }

    fn mutate(body: &mut Vec<u8>, rng: &mut Rng) {
        let at = rng.below(body.len() + 1);
        match rng.below(5) {
            0 if at < body.len() => body[at] = BYTES[rng.below(BYTES.len())],
            1 => body.insert(at, BYTES[rng.below(BYTES.len())]),
            2 if at < body.len() => {
                body.remove(at);
            }
            3 => {
                // A piece of the body again elsewhere: repeated keys, members and nesting.
                let from = rng.below(body.len());
                let to = (from + 1 + rng.below(40)).min(body.len());
                let piece = body[from..to].to_vec();
                body.splice(at..at, piece);
            }
            _ => {
                let from = rng.below(body.len());
                body.truncate(from.max(1));
            }
        }
    }

    /// The fast path and serde_json's path give the same result (the same events, or the same
    /// error with the same message) on bodies that are one to three byte edits away from what
    /// senders send, and the fast path both takes and gives up on a fair share of them, so both
    /// sides of every comparison are exercised.
    #[test]
    fn agrees_with_serde_json_on_generated_bodies() {
        for seed in SEEDS {
            assert!(
                scan(seed.as_bytes(), seed.trim_start().starts_with('[')).is_some(),
                "{seed}"
            );
        }
        let shapes = [BodyShape::Single, BodyShape::Batch, BodyShape::Either];
        let mut rng = Rng(0x7a11_7a11_7a11_7a11);
        let (mut taken, mut given_up) = (0, 0);
        for round in 0..200_000 {
            let mut body = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
            for _ in 0..=rng.below(3) {
                mutate(&mut body, &mut rng);
            }
            let shape = shapes[rng.below(shapes.len())];
            let fast = parse_structured(&body, shape);
            let slow = parse_with_serde(&body, shape);
            assert_eq!(
                fast,
                slow,
                "round {round}, {shape:?}: {}",
                String::from_utf8_lossy(&body)
            );
            let batch = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            if scan(&body, batch).is_some() {
                taken += 1;
            } else {
                given_up += 1;
            }
        }
        assert!(
            taken > 20_000 && given_up > 20_000,
            "taken {taken}, given up {given_up}"
        );
    }

    /// What the fast path leaves to serde_json: what serde_json refuses, and what it accepts but
    /// the fast path cannot judge cheaply.
    #[test]
    fn gives_up_on_what_it_is_not_sure_of() {
        let event = |member: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"i","source":"s","type":"t","subject":"c",{member}}}"#
            )
        };
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        let cases = [
            event(r#""x":"\ud800""#),
            event(r#""x":"\udc00\ud800""#),
            event(r#""x":"\ud800\u0041""#),
            event(r#""x":"\u+123""#),
            event(r#""x":"\x""#),
            event("\"x\":\"a\u{1}b\""),
            event(r#""\u0078":1"#),
            event(r#""id":"again""#),
            event(r#""data":{"a":1,"a":2}"#),
            event(r#""x":1e400"#),
            event(r#""x":1e300"#),
            event(r#""x":100e298"#),
            event(r#""x":1e-99999"#),
            event(r#""x":01"#),
            event(r#""x":1."#),
            event(r#""x":-"#),
            event(r#""x":.5"#),
            event(r#""x":nul"#),
            event(&format!("\"x\":{deep}")),
            event(&format!("\"x\":{{{}}}", many.join(","))),
            event(r#""x":[1,]"#),
            event(r#""x":{"a":1,}"#),
            format!("\x0c{}", event(r#""x":1"#)),
            format!("{} x", event(r#""x":1"#)),
        ];
        for body in &cases {
            assert!(scan(body.as_bytes(), false).is_none(), "{body}");
            let batch = format!("[{body}]");
            assert!(scan(batch.as_bytes(), true).is_none(), "{batch}");
        }
        for batch in ["[]", "[1]", r#"[{"id":"a"},]"#, "[\"x\"]", "[{}] ]"] {
            assert!(scan(batch.as_bytes(), true).is_none(), "{batch}");
        }
        assert!(scan(b"{\"x\":\"\xff\"}", false).is_none());
        // The same shapes, one step inside the edge, are taken.
        for member in [
            r#""x":1e299"#,
            r#""x":10e298"#,
            r#""x":1e-9999"#,
            r#""x":"\ud83d\ude00""#,
        ] {
            let body = event(member);
            assert!(scan(body.as_bytes(), false).is_some(), "{body}");
        }
    }
}
