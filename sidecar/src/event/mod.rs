//! CloudEvents as OpenMeter accepts them: parsing of structured, batch and binary-mode requests,
//! and OpenMeter's validation rules. An accepted event is kept as its compact JSON text, with its
//! attributes (extensions included) in the order the sender wrote them.

use std::borrow::Cow;
use std::cell::RefCell;

use http::HeaderMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::PodIdentity;

mod scan;

/// A validated event, ready to be buffered.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's JSON text, forwarded unchanged but for [`Event::stamp`], which only appends.
    json: String,
    source: Attribute,
    id: Attribute,
    /// The `k8snamespace` extension attribute, used to drop events of excluded namespaces.
    pub namespace: Option<String>,
    /// Whether the event carries a `k8snamespace` attribute (of any type).
    pub has_namespace: bool,
    /// Whether the event carries a `k8spod` attribute (of any type).
    pub has_pod: bool,
}

/// Where a string attribute's value is. Most are written without escapes, and then their value
/// is a part of the event's text and needs no allocation of its own: at full load that was two
/// of the three allocations per event (each made by an ingest thread and freed by the buffer's
/// writer).
#[derive(Debug, Clone, PartialEq)]
enum Attribute {
    /// Bytes `start..end` of the text.
    InText { start: usize, end: usize },
    /// Decoded from escapes, or not in the text at all (binary mode's headers).
    Decoded(Box<str>),
}

impl Attribute {
    /// `value` as a part of `text` when it is one, else a copy.
    fn of(value: &str, text: &str) -> Attribute {
        let start = (value.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
        let end = start.wrapping_add(value.len());
        if text.get(start..end).is_some() {
            Attribute::InText { start, end }
        } else {
            Attribute::Decoded(value.into())
        }
    }

    fn get<'a>(&'a self, text: &'a str) -> &'a str {
        match self {
            // In bounds and on character boundaries: taken from `text` as a `&str`, and the
            // text is only ever appended to.
            Attribute::InText { start, end } => text.get(*start..*end).unwrap_or_default(),
            Attribute::Decoded(value) => value,
        }
    }
}

/// What is wrong with a request body, naming the event and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct InvalidEvent {
    /// `event.subject`, `events[3].time` or `body`.
    pub location: String,
    pub message: String,
    /// How many events the rejected body held (1 when it could not be told).
    pub events: usize,
}

/// The shape a content type announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyShape {
    /// `application/cloudevents+json`: exactly one event.
    Single,
    /// `application/cloudevents-batch+json`: an array of events.
    Batch,
    /// `application/json`: either.
    Either,
}

/// Parses a structured-mode body (one event or an array of events) and validates every event.
/// A batch is all-or-nothing: the first invalid event fails the whole body. Each event is kept
/// as the exact JSON text it was sent as, so numbers like `1.50` or 20-digit integers reach the
/// outputs unchanged.
pub fn parse_structured(body: &[u8], shape: BodyShape) -> Result<Vec<Event>, InvalidEvent> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let batch = match (first, shape) {
        (Some(b'['), BodyShape::Batch | BodyShape::Either) => true,
        (Some(b'{'), BodyShape::Single | BodyShape::Either) => false,
        _ => return parse_with_serde(body, shape),
    };
    let Some(items) = scan::scan(body, batch) else {
        return parse_with_serde(body, shape);
    };
    let count = items.len();
    // Sized at once: collecting `Result`s grows the list from nothing.
    let mut events = Vec::with_capacity(count);
    for (i, item) in items.into_iter().enumerate() {
        let at = if batch { At::Item(i) } else { At::Event };
        events.push(
            validate(ScannedEvent::Object(item.attributes), at, item.text)
                .map_err(|e| InvalidEvent { events: count, ..e })?,
        );
    }
    Ok(events)
}

/// [`parse_structured`] by serde_json, for the bodies [`scan`] gives up on; it writes every
/// error message about the JSON itself.
fn parse_with_serde(body: &[u8], shape: BodyShape) -> Result<Vec<Event>, InvalidEvent> {
    let not_json = |e: serde_json::Error| InvalidEvent {
        location: "body".into(),
        message: format!("not valid JSON: {e}"),
        events: 1,
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') && shape != BodyShape::Single {
        // The common case, in one pass over the body: the array's items as text, then each item.
        let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(not_json)?;
        if items.is_empty() {
            return Err(InvalidEvent {
                location: "body".into(),
                message: "the batch is empty; send at least one event".into(),
                events: 1,
            });
        }
        let count = items.len();
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| validate_text(item.get(), At::Item(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InvalidEvent { events: count, ..e });
    }
    let raw: &RawValue = serde_json::from_slice(body).map_err(not_json)?;
    let text = raw.get().trim();
    let body_error = |message: String, events: usize| InvalidEvent {
        location: "body".into(),
        message,
        events,
    };
    match (first, shape) {
        (Some(b'{'), BodyShape::Single | BodyShape::Either) => {
            Ok(vec![validate_text(text, At::Event)?])
        }
        (Some(b'['), _) => {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(not_json)?;
            Err(body_error(
                "application/cloudevents+json carries one event, but the body is an array; \
                 send batches as application/cloudevents-batch+json"
                    .into(),
                items.len().max(1),
            ))
        }
        (_, BodyShape::Batch) => Err(body_error(
            "application/cloudevents-batch+json must be a JSON array of events".into(),
            1,
        )),
        (first, _) => Err(body_error(
            format!(
                "expected a JSON object (one event) or an array of events, got {}",
                match first {
                    Some(b'n') => "null",
                    Some(b't' | b'f') => "a boolean",
                    Some(b'"') => "a string",
                    _ => "a number",
                }
            ),
            1,
        )),
    }
}

/// Validates one event given as JSON text, keeping that text. One pass over the text, which
/// builds nothing but the event: the attributes the rules need are borrowed from the text, and
/// the rest is only checked (valid JSON, no key twice in any object).
///
/// An object with a key twice is refused: serde_json would keep the last one, while the text,
/// forwarded as is, still holds both; receivers differ on which one counts (two `id`s could be
/// deduplicated under one and billed under the other). `at` names the event in errors
/// (`events[3]`).
fn validate_text(text: &str, at: At) -> Result<Event, InvalidEvent> {
    use serde::de::DeserializeSeed;
    let text = text.trim();
    let repeated = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let scanned = EventSeed {
        repeated: &repeated,
    }
    .deserialize(&mut de)
    .and_then(|event| de.end().map(|()| event));
    let attributes = scanned.map_err(|e| match repeated.into_inner() {
        Some((path, key)) => InvalidEvent {
            location: format!("{at}{path}"),
            message: format!(
                "has the key {key:?} twice; each key may appear once in an object, so send one {key:?}"
            ),
            events: 1,
        },
        None => InvalidEvent {
            location: at.to_string(),
            message: format!("not valid JSON: {e}"),
            events: 1,
        },
    })?;
    validate(attributes, at, text)
}

/// Which event of a request an error is about: `event` or `events[3]`. Written out only when
/// there is an error to name it in.
#[derive(Clone, Copy)]
enum At {
    Event,
    Item(usize),
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Event => f.write_str("event"),
            At::Item(i) => write!(f, "events[{i}]"),
        }
    }
}

/// Where a JSON node is, built only when an error names it.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

/// The first repeated key met: the path of its object, and the key.
type Repeated = RefCell<Option<(String, String)>>;

/// A JSON value as the rules see it: its kind, and a string's text (borrowed from the event's
/// text unless it holds escapes).
enum Scanned<'de> {
    Null,
    Bool,
    Number,
    Str(Cow<'de, str>),
    Array,
    Object,
}

impl Scanned<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scanned::Null => "null",
            Scanned::Bool => "a boolean",
            Scanned::Number => "a number",
            Scanned::Str(_) => "a string",
            Scanned::Array => "an array",
            Scanned::Object => "an object",
        }
    }
}

/// Walks one JSON value without building it, failing at the first object that has a key twice.
struct Scan<'a> {
    path: Path<'a>,
    repeated: &'a Repeated,
}

impl<'de> serde::de::DeserializeSeed<'de> for Scan<'_> {
    type Value = Scanned<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Scanned<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Scan<'_> {
    type Value = Scanned<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Bool)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Number)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Number)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Number)
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Null)
    }
    fn visit_none<E>(self) -> Result<Scanned<'de>, E> {
        Ok(Scanned::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Scanned<'de>, A::Error> {
        let mut index = 0;
        while seq
            .next_element_seed(Scan {
                path: Path::Index(&self.path, index),
                repeated: self.repeated,
            })?
            .is_some()
        {
            index += 1;
        }
        Ok(Scanned::Array)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Scanned<'de>, A::Error> {
        let mut keys = Keys::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            keys.insert::<A::Error>(key.clone(), &self.path, self.repeated)?;
            map.next_value_seed(Scan {
                path: Path::Key(&self.path, &key),
                repeated: self.repeated,
            })?;
        }
        Ok(Scanned::Object)
    }
}

/// An object's key, borrowed from the text unless it holds escapes.
struct KeySeed;

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

/// The keys of one object seen so far: a short list while the object is small (events have about
/// ten attributes), a hash set beyond, so that a huge object costs linear time.
#[derive(Default)]
struct Keys<'de> {
    few: Vec<Cow<'de, str>>,
    many: std::collections::HashSet<Cow<'de, str>>,
}

impl<'de> Keys<'de> {
    const FEW: usize = 16;

    /// Records `key`, or fails (recording where) when the object already had it.
    fn insert<E: serde::de::Error>(
        &mut self,
        key: Cow<'de, str>,
        path: &Path<'_>,
        repeated: &Repeated,
    ) -> Result<(), E> {
        let seen = if self.many.is_empty() && self.few.len() < Self::FEW {
            self.few.contains(&key)
        } else {
            if self.many.is_empty() {
                self.many.extend(self.few.drain(..));
            }
            self.many.contains(&key)
        };
        if seen {
            *repeated.borrow_mut() = Some((path.to_string(), key.to_string()));
            return Err(E::custom(format!("duplicate key {key:?}")));
        }
        if self.many.is_empty() {
            self.few.push(key);
        } else {
            self.many.insert(key);
        }
        Ok(())
    }
}

/// The attributes the rules read, as scanned.
#[derive(Default)]
struct Attributes<'de> {
    id: Option<Scanned<'de>>,
    source: Option<Scanned<'de>>,
    specversion: Option<Scanned<'de>>,
    kind: Option<Scanned<'de>>,
    subject: Option<Scanned<'de>>,
    time: Option<Scanned<'de>>,
    data: Option<Scanned<'de>>,
    datacontenttype: Option<Scanned<'de>>,
    dataschema: Option<Scanned<'de>>,
    k8snamespace: Option<Scanned<'de>>,
    has_pod: bool,
}

impl<'de> Attributes<'de> {
    /// Where the value of the event's key `key` goes, when the rules read it. `k8spod` is only
    /// noted as present.
    fn slot(&mut self, key: &str) -> Option<&mut Option<Scanned<'de>>> {
        Some(match key {
            "id" => &mut self.id,
            "source" => &mut self.source,
            "specversion" => &mut self.specversion,
            "type" => &mut self.kind,
            "subject" => &mut self.subject,
            "time" => &mut self.time,
            "data" => &mut self.data,
            "datacontenttype" => &mut self.datacontenttype,
            "dataschema" => &mut self.dataschema,
            "k8snamespace" => &mut self.k8snamespace,
            "k8spod" => {
                self.has_pod = true;
                return None;
            }
            _ => return None,
        })
    }
}

/// An event: its attributes when it is an object, or what it is instead.
#[expect(
    clippy::large_enum_variant,
    reason = "made once per event and read at once; boxing it would cost an allocation per event"
)]
enum ScannedEvent<'de> {
    Object(Attributes<'de>),
    Other(&'static str),
}

/// Scans an event's text into [`Attributes`], checking all of it like [`Scan`].
struct EventSeed<'a> {
    repeated: &'a Repeated,
}

impl<'de> serde::de::DeserializeSeed<'de> for EventSeed<'_> {
    type Value = ScannedEvent<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<ScannedEvent<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EventSeed<'_> {
    type Value = ScannedEvent<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an event")
    }

    fn visit_bool<E>(self, _: bool) -> Result<ScannedEvent<'de>, E> {
        Ok(ScannedEvent::Other("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<ScannedEvent<'de>, E> {
        Ok(ScannedEvent::Other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<ScannedEvent<'de>, E> {
        Ok(ScannedEvent::Other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<ScannedEvent<'de>, E> {
        Ok(ScannedEvent::Other("a number"))
    }
    fn visit_str<E>(self, _: &str) -> Result<ScannedEvent<'de>, E> {
        Ok(ScannedEvent::Other("a string"))
    }
    fn visit_unit<E>(self) -> Result<ScannedEvent<'de>, E> {
        Ok(ScannedEvent::Other("null"))
    }
    /// An array is walked like any value (a key twice inside it is named first), then refused.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        seq: A,
    ) -> Result<ScannedEvent<'de>, A::Error> {
        Scan {
            path: Path::Root,
            repeated: self.repeated,
        }
        .visit_seq(seq)
        .map(|_| ScannedEvent::Other("an array"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<ScannedEvent<'de>, A::Error> {
        let mut attributes = Attributes::default();
        let mut keys = Keys::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            keys.insert::<A::Error>(key.clone(), &Path::Root, self.repeated)?;
            let value = map.next_value_seed(Scan {
                path: Path::Key(&Path::Root, &key),
                repeated: self.repeated,
            })?;
            if let Some(slot) = attributes.slot(&key) {
                *slot = Some(value);
            }
        }
        Ok(ScannedEvent::Object(attributes))
    }
}

/// Parses a CloudEvents binary-mode request: attributes in `ce-*` headers, the body is `data`
/// (kept as the exact JSON text sent).
pub fn parse_binary(headers: &HeaderMap, body: &[u8]) -> Result<Vec<Event>, InvalidEvent> {
    let mut map = Map::new();
    // Required attributes first so the stored event reads like a structured one.
    for name in ["specversion", "id", "source", "type", "subject", "time"] {
        let header = format!("ce-{name}");
        if headers.contains_key(&header) {
            map.insert(
                name.to_string(),
                Value::String(header_text(headers, &header, name)?),
            );
        }
    }
    for name in headers.keys() {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if !map.contains_key(attr) {
            map.insert(
                attr.to_string(),
                Value::String(header_text(headers, name.as_str(), attr)?),
            );
        }
    }
    map.insert(
        "datacontenttype".into(),
        Value::String("application/json".into()),
    );
    let mut text = Value::Object(map).to_string();
    if !body.iter().all(u8::is_ascii_whitespace) {
        let data: &RawValue = serde_json::from_slice(body).map_err(|e| InvalidEvent {
            location: "event.data".into(),
            message: format!("the body (the event's data) is not valid JSON: {e}"),
            events: 1,
        })?;
        // The attributes are a non-empty object, so the text ends with `}`.
        text.pop();
        text.push_str(",\"data\":");
        text.push_str(data.get().trim());
        text.push('}');
    }
    // The same rules as a structured event's, on the text that is stored: a key twice in the
    // data is named as `event.data...`, and a `ce-data` header beside a body is `data` twice.
    Ok(vec![validate_text(&text, At::Event)?])
}

/// The attribute value of a `ce-*` header. The CloudEvents HTTP binding (3.1.3.2) has senders
/// percent-encode space, `"`, `%` and everything outside printable ASCII, as UTF-8, and
/// receivers decode it; a `%` that starts no valid escape is refused rather than guessed at.
fn header_text(headers: &HeaderMap, name: &str, attr: &str) -> Result<String, InvalidEvent> {
    let fail = |message: String| InvalidEvent {
        location: format!("event.{attr}"),
        message,
        events: 1,
    };
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Err(fail(format!("header {name} is missing")));
    };
    if values.next().is_some() {
        return Err(fail(format!(
            "header {name} is sent more than once; send each attribute once"
        )));
    }
    let bytes = value.as_bytes();
    if bytes
        .iter()
        .any(|b| !(0x20..0x7f).contains(b) && *b != b'\t')
    {
        return Err(fail(format!(
            "header {name} holds bytes outside printable ASCII; percent-encode them as UTF-8 (%C3%A9 for é), as the CloudEvents HTTP binding says"
        )));
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&byte, tail)) = rest.split_first() {
        if byte != b'%' {
            decoded.push(byte);
            rest = tail;
            continue;
        }
        let escape = tail
            .get(..2)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        let Some(escaped) = escape else {
            return Err(fail(format!(
                "header {name} has a % that does not start a percent-encoded byte (%XX with two hex digits); write a literal % as %25"
            )));
        };
        decoded.push(escaped);
        rest = &tail[2..];
    }
    String::from_utf8(decoded).map_err(|_| {
        fail(format!(
            "header {name} does not decode to UTF-8 text; percent-encode the attribute's UTF-8 bytes"
        ))
    })
}

/// Applies OpenMeter's rules to one scanned event, whose JSON text is `text`.
fn validate(event: ScannedEvent<'_>, at: At, text: &str) -> Result<Event, InvalidEvent> {
    let fail = |field: &str, message: String| InvalidEvent {
        location: if field.is_empty() {
            at.to_string()
        } else {
            format!("{at}.{field}")
        },
        message,
        events: 1,
    };
    let attributes = match event {
        ScannedEvent::Object(attributes) => attributes,
        ScannedEvent::Other(kind) => {
            return Err(fail(
                "",
                format!("an event must be a JSON object, got {kind}"),
            ));
        }
    };
    fn required<'v>(
        value: &'v Option<Scanned<'_>>,
        field: &str,
        fail: impl Fn(&str, String) -> InvalidEvent,
    ) -> Result<&'v str, InvalidEvent> {
        match value {
            Some(Scanned::Str(s)) if !s.is_empty() => Ok(s),
            Some(Scanned::Str(_)) => Err(fail(field, "must be a non-empty string".into())),
            None | Some(Scanned::Null) => Err(fail(
                field,
                "is required and must be a non-empty string".into(),
            )),
            Some(other) => Err(fail(
                field,
                format!("must be a non-empty string, got {}", other.kind()),
            )),
        }
    }
    let id = required(&attributes.id, "id", fail)?;
    let source = required(&attributes.source, "source", fail)?;
    let specversion = required(&attributes.specversion, "specversion", fail)?;
    if specversion != "1.0" {
        return Err(fail(
            "specversion",
            format!("must be \"1.0\", got {specversion:?}"),
        ));
    }
    required(&attributes.kind, "type", fail)?;
    required(&attributes.subject, "subject", fail)?;
    match &attributes.time {
        None | Some(Scanned::Null) => {}
        Some(Scanned::Str(t)) => {
            OffsetDateTime::parse(t, &Rfc3339).map_err(|e| {
                fail(
                    "time",
                    format!("{t:?} is not an RFC 3339 timestamp ({e}); write it like 2024-01-31T12:00:00Z"),
                )
            })?;
        }
        Some(other) => {
            return Err(fail(
                "time",
                format!("must be an RFC 3339 timestamp string, got {}", other.kind()),
            ));
        }
    }
    match &attributes.data {
        None | Some(Scanned::Null) | Some(Scanned::Object) => {}
        Some(other) => {
            return Err(fail(
                "data",
                format!("must be a JSON object or null, got {}", other.kind()),
            ));
        }
    }
    match &attributes.datacontenttype {
        None | Some(Scanned::Null) => {}
        Some(Scanned::Str(s)) if s == "application/json" => {}
        Some(Scanned::Str(s)) => {
            return Err(fail(
                "datacontenttype",
                format!(
                    "only \"application/json\" is allowed, got {}",
                    Value::String(s.to_string())
                ),
            ));
        }
        Some(other) => {
            return Err(fail(
                "datacontenttype",
                format!("only \"application/json\" is allowed, got {}", other.kind()),
            ));
        }
    }
    match &attributes.dataschema {
        None | Some(Scanned::Null) => {}
        Some(Scanned::Str(s)) if !s.is_empty() => {}
        Some(_) => {
            return Err(fail(
                "dataschema",
                "must be a non-empty URI string or null".into(),
            ));
        }
    }
    let namespace = match &attributes.k8snamespace {
        Some(Scanned::Str(ns)) => Some(ns.to_string()),
        _ => None,
    };
    Ok(Event {
        source: Attribute::of(source, text),
        id: Attribute::of(id, text),
        namespace,
        has_namespace: attributes.k8snamespace.is_some(),
        has_pod: attributes.has_pod,
        json: text.to_string(),
    })
}

impl Event {
    /// An event of `(source, id)` whose text is `json`, without extension attributes; the
    /// caller vouches that `json` says the same.
    pub fn new(json: String, source: &str, id: &str) -> Event {
        Event {
            json,
            source: Attribute::Decoded(source.into()),
            id: Attribute::Decoded(id.into()),
            namespace: None,
            has_namespace: false,
            has_pod: false,
        }
    }

    /// The event's JSON text.
    pub fn json(&self) -> &[u8] {
        self.json.as_bytes()
    }

    /// The `source` attribute.
    pub fn source(&self) -> &str {
        self.source.get(&self.json)
    }

    /// The `id` attribute.
    pub fn id(&self) -> &str {
        self.id.get(&self.json)
    }

    /// Adds the `k8snamespace` and `k8spod` extension attributes the event lacks, after its other
    /// attributes; attributes the sender set are never changed.
    pub fn stamp(&mut self, identity: &PodIdentity) {
        let mut added = String::new();
        if let Some(namespace) = identity
            .namespace
            .as_deref()
            .filter(|_| !self.has_namespace)
        {
            added.push_str(",\"k8snamespace\":");
            added.push_str(&Value::String(namespace.to_string()).to_string());
            self.namespace = Some(namespace.to_string());
            self.has_namespace = true;
        }
        if let Some(pod) = identity.name.as_deref().filter(|_| !self.has_pod) {
            added.push_str(",\"k8spod\":");
            added.push_str(&Value::String(pod.to_string()).to_string());
            self.has_pod = true;
        }
        if added.is_empty() {
            return;
        }
        // A validated event is a JSON object with at least its required attributes, so its text
        // ends with `}` and the added members follow a member.
        if self.json.ends_with('}') {
            self.json.pop();
            self.json.push_str(&added);
            self.json.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"specversion":"1.0","id":"e1","source":"svc","type":"api-calls","subject":"cust-1","time":"2024-01-01T00:00:00+02:00","data":{"n":1},"tenant":"t9"}"#;

    fn identity(namespace: Option<&str>, name: Option<&str>) -> PodIdentity {
        PodIdentity {
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
        }
    }

    #[test]
    fn stamping_appends_missing_pod_attributes_and_keeps_the_rest() {
        let mut events = parse_structured(GOOD.as_bytes(), BodyShape::Single).expect("valid");
        events[0].stamp(&identity(Some("shop"), Some("api-7f9c")));
        let text = String::from_utf8(events[0].json().to_vec()).expect("utf-8");
        assert_eq!(
            text,
            format!(
                "{},\"k8snamespace\":\"shop\",\"k8spod\":\"api-7f9c\"}}",
                &GOOD[..GOOD.len() - 1]
            )
        );
        assert_eq!(events[0].namespace.as_deref(), Some("shop"));
        assert_eq!((events[0].source(), events[0].id()), ("svc", "e1"));
        // Stamping again changes nothing.
        events[0].stamp(&identity(Some("other"), Some("other")));
        assert_eq!(String::from_utf8_lossy(events[0].json()), text);
    }

    #[test]
    fn stamping_never_overrides_what_the_sender_set() {
        let sent = r#"{"specversion":"1.0","id":"e1","source":"svc","type":"t","subject":"s","k8snamespace":"team-a", "k8spod":7 }"#;
        let mut events = parse_structured(sent.as_bytes(), BodyShape::Single).expect("valid");
        events[0].stamp(&identity(Some("shop"), Some("api")));
        assert_eq!(String::from_utf8_lossy(events[0].json()), sent);
        assert_eq!(events[0].namespace.as_deref(), Some("team-a"));

        let only_pod = r#"{"specversion":"1.0","id":"e1","source":"svc","type":"t","subject":"s"}"#;
        let mut events = parse_structured(only_pod.as_bytes(), BodyShape::Single).expect("valid");
        events[0].stamp(&identity(None, Some("a\"b")));
        let text = String::from_utf8(events[0].json().to_vec()).expect("utf-8");
        let value: Value = serde_json::from_str(&text).expect("still JSON");
        assert_eq!(value["k8spod"], "a\"b");
        assert!(value.get("k8snamespace").is_none());
    }

    #[test]
    fn stamping_binary_mode_events_keeps_their_data_text() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "b1"),
            ("ce-source", "svc"),
            ("ce-type", "t"),
            ("ce-subject", "s"),
        ] {
            headers.insert(name, http::HeaderValue::from_static(value));
        }
        let mut events = parse_binary(&headers, br#"{"tokens": 1.50}"#).expect("valid");
        events[0].stamp(&identity(Some("shop"), Some("api")));
        let text = String::from_utf8(events[0].json().to_vec()).expect("utf-8");
        assert!(
            text.ends_with(r#""data":{"tokens": 1.50},"k8snamespace":"shop","k8spod":"api"}"#),
            "{text}"
        );
    }

    #[test]
    fn keeps_attributes_and_their_order() {
        let events = parse_structured(GOOD.as_bytes(), BodyShape::Single).expect("valid");
        assert_eq!(events.len(), 1);
        assert_eq!(String::from_utf8_lossy(events[0].json()), GOOD);
        assert_eq!(events[0].source(), "svc");
        assert_eq!(events[0].id(), "e1");
    }

    #[test]
    fn numbers_and_spacing_are_kept_as_sent() {
        let body = r#"[ {"specversion":"1.0","id":"n","source":"s","type":"t","subject":"c","data":{"gb":1.50,"calls":123456789012345678901234567890}} ]"#;
        let events = parse_structured(body.as_bytes(), BodyShape::Batch).expect("valid");
        assert_eq!(
            String::from_utf8_lossy(events[0].json()),
            r#"{"specversion":"1.0","id":"n","source":"s","type":"t","subject":"c","data":{"gb":1.50,"calls":123456789012345678901234567890}}"#
        );
    }

    #[test]
    fn batch_errors_name_index_and_field() {
        let body = format!(
            r#"[{GOOD},{{"specversion":"1.0","id":"e2","source":"svc","type":"t","subject":""}}]"#
        );
        let err = parse_structured(body.as_bytes(), BodyShape::Batch).expect_err("invalid");
        assert_eq!(err.location, "events[1].subject");
        assert_eq!(err.message, "must be a non-empty string");
    }

    #[test]
    fn shapes_follow_the_content_type() {
        let array = format!("[{GOOD}]");
        assert!(parse_structured(array.as_bytes(), BodyShape::Single).is_err());
        assert!(parse_structured(GOOD.as_bytes(), BodyShape::Batch).is_err());
        assert!(parse_structured(array.as_bytes(), BodyShape::Either).is_ok());
        assert!(parse_structured(GOOD.as_bytes(), BodyShape::Either).is_ok());
        assert!(parse_structured(b"[]", BodyShape::Either).is_err());
    }

    #[test]
    fn rules() {
        let cases = [
            (r#""specversion":"0.3""#, "specversion"),
            (r#""time":"yesterday""#, "time"),
            (r#""time":12"#, "time"),
            (r#""data":[1]"#, "data"),
            (r#""data":"x""#, "data"),
            (r#""datacontenttype":"text/plain""#, "datacontenttype"),
            (r#""dataschema":"""#, "dataschema"),
            (r#""type":5"#, "type"),
            (r#""id":null"#, "id"),
        ];
        for (attr, field) in cases {
            let key = attr.split(':').next().unwrap_or_default();
            let mut map: Map<String, Value> = serde_json::from_str(GOOD).expect("json");
            let patch: Map<String, Value> =
                serde_json::from_str(&format!("{{{attr}}}")).expect("patch");
            map.extend(patch);
            let body = serde_json::to_vec(&map).expect("encode");
            let err = parse_structured(&body, BodyShape::Single).expect_err(key);
            assert_eq!(err.location, format!("event.{field}"), "{attr}");
        }
    }

    #[test]
    fn a_repeated_key_is_refused_naming_event_and_key() {
        let twice =
            r#"{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","id":"b"}"#;
        let body = format!("[{GOOD},{twice}]");
        let err = parse_structured(body.as_bytes(), BodyShape::Batch).expect_err("two ids");
        assert_eq!(err.location, "events[1]");
        assert!(err.message.contains(r#""id" twice"#), "{}", err.message);
        assert_eq!(err.events, 2);

        let nested = r#"{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","data":{"m":[{"x":1,"x":2}]}}"#;
        let err = parse_structured(nested.as_bytes(), BodyShape::Single).expect_err("nested");
        assert_eq!(err.location, "event.data.m[0]");
        assert!(err.message.contains(r#""x" twice"#), "{}", err.message);

        // The same key in different objects is fine.
        let apart = r#"{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","data":{"id":1,"o":{"id":2}}}"#;
        assert!(parse_structured(apart.as_bytes(), BodyShape::Single).is_ok());
    }

    #[test]
    fn a_repeated_key_is_found_in_large_objects_and_behind_escapes() {
        let many: String = (0..40).map(|i| format!("\"k{i}\":{i},")).collect();
        let wide = format!(
            r#"{{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","data":{{{many}"k33":0}}}}"#
        );
        let err = parse_structured(wide.as_bytes(), BodyShape::Single).expect_err("k33 twice");
        assert_eq!(err.location, "event.data");
        assert!(err.message.contains(r#""k33" twice"#), "{}", err.message);
        let fine = format!(
            r#"{{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","data":{{{many}"k40":0}}}}"#
        );
        assert!(parse_structured(fine.as_bytes(), BodyShape::Single).is_ok());

        // `\u0069d` is `id`: the same key, however it is written.
        let escaped =
            r#"{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","\u0069d":"b"}"#;
        let err = parse_structured(escaped.as_bytes(), BodyShape::Single).expect_err("id twice");
        assert_eq!(err.location, "event");
        assert!(err.message.contains(r#""id" twice"#), "{}", err.message);
    }

    #[test]
    fn escaped_attributes_are_read_unescaped_and_kept_as_sent() {
        let sent = r#"{"specversion":"1.0","id":"a\"1","source":"s\u00e9","type":"t","subject":"c","k8snamespace":"t\u0065am"}"#;
        let events = parse_structured(sent.as_bytes(), BodyShape::Single).expect("valid");
        assert_eq!(events[0].id(), "a\"1");
        assert_eq!(events[0].source(), "s\u{e9}");
        assert_eq!(events[0].namespace.as_deref(), Some("team"));
        assert_eq!(String::from_utf8_lossy(events[0].json()), sent);
    }

    #[test]
    fn an_event_that_is_not_an_object_is_named_by_its_kind() {
        for (body, kind) in [
            ("[1]", "a number"),
            ("[\"x\"]", "a string"),
            ("[null]", "null"),
            ("[[1]]", "an array"),
            ("[true]", "a boolean"),
        ] {
            let err = parse_structured(body.as_bytes(), BodyShape::Batch).expect_err(body);
            assert_eq!(err.location, "events[0]", "{body}");
            assert_eq!(
                err.message,
                format!("an event must be a JSON object, got {kind}"),
                "{body}"
            );
        }
        let err = parse_structured(b"[[{\"a\":1,\"a\":2}]]", BodyShape::Batch).expect_err("dup");
        assert_eq!(err.location, "events[0][0]");
    }

    #[test]
    fn datacontenttype_errors_show_what_was_sent() {
        let with = |value: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","datacontenttype":{value}}}"#
            )
        };
        let err = parse_structured(with("\"text/plain\"").as_bytes(), BodyShape::Single)
            .expect_err("text/plain");
        assert_eq!(
            err.message,
            r#"only "application/json" is allowed, got "text/plain""#
        );
        let err = parse_structured(with("5").as_bytes(), BodyShape::Single).expect_err("a number");
        assert_eq!(
            err.message,
            r#"only "application/json" is allowed, got a number"#
        );
        assert!(
            parse_structured(with("null").as_bytes(), BodyShape::Single).is_ok(),
            "null is allowed"
        );
    }

    #[test]
    fn a_broken_batch_is_refused_as_a_body() {
        let err = parse_structured(br#"[{"id":1},"#, BodyShape::Batch).expect_err("cut short");
        assert_eq!(err.location, "body");
        assert!(
            err.message.starts_with("not valid JSON: "),
            "{}",
            err.message
        );
    }

    #[test]
    fn binary_mode_headers_are_percent_decoded() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "b%2F1"),
            ("ce-source", "svc%20%22x%22"),
            ("ce-type", "t"),
            ("ce-subject", "caf%C3%A9 100%25"),
        ] {
            headers.insert(name, http::HeaderValue::from_static(value));
        }
        let events = parse_binary(&headers, b"").expect("valid");
        let value: Value = serde_json::from_slice(events[0].json()).expect("json");
        assert_eq!(value["id"], "b/1");
        assert_eq!(value["source"], "svc \"x\"");
        assert_eq!(value["subject"], "café 100%");
        assert_eq!(events[0].id(), "b/1");

        for (bad, why) in [
            ("100%", "% at the end"),
            ("%zz", "not hex"),
            ("%C3", "not UTF-8"),
        ] {
            let mut broken = headers.clone();
            broken.insert("ce-subject", http::HeaderValue::from_static(bad));
            let err = parse_binary(&broken, b"").expect_err(why);
            assert_eq!(err.location, "event.subject", "{why}");
            assert!(err.message.contains("ce-subject"), "{why}: {}", err.message);
        }
        let mut twice = headers.clone();
        twice.append("ce-id", http::HeaderValue::from_static("other"));
        let err = parse_binary(&twice, b"").expect_err("two ce-id headers");
        assert_eq!(err.location, "event.id");
    }

    #[test]
    fn binary_mode() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "b1"),
            ("ce-source", "svc"),
            ("ce-type", "t"),
            ("ce-subject", "s"),
            ("ce-k8snamespace", "team-a"),
            ("content-type", "application/json"),
        ] {
            headers.insert(k, http::HeaderValue::from_static(v));
        }
        let events = parse_binary(&headers, br#"{"tokens":12.50}"#).expect("valid");
        assert!(
            String::from_utf8_lossy(events[0].json()).ends_with(r#","data":{"tokens":12.50}}"#)
        );
        let value: Value = serde_json::from_slice(events[0].json()).expect("json");
        assert_eq!(value["data"]["tokens"], 12.5);
        assert_eq!(value["k8snamespace"], "team-a");
        assert_eq!(events[0].namespace.as_deref(), Some("team-a"));
        headers.remove("ce-subject");
        let err = parse_binary(&headers, b"{}").expect_err("no subject");
        assert_eq!(err.location, "event.subject");

        // The data travels in the body: a ce-data header beside one would store `data` twice.
        headers.insert("ce-subject", http::HeaderValue::from_static("s"));
        headers.insert("ce-data", http::HeaderValue::from_static("x"));
        let err = parse_binary(&headers, b"{}").expect_err("data twice");
        assert_eq!(err.location, "event");
        assert!(err.message.contains(r#""data" twice"#), "{}", err.message);
        let err = parse_binary(&headers, b"").expect_err("a string as data");
        assert_eq!(err.location, "event.data");
    }
}
