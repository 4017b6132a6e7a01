//! Positions in the configuration's YAML text, for errors found after parsing. serde_yaml
//! exposes no node positions, but it stamps an error raised while it deserialises a node with
//! that node's line and column; these walkers raise one at the node they look for.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The message of the error a walker raises on purpose; only its position is used.
const HERE: &str = "tally: position marker";

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// `outputs.targets[0].retry` → `outputs`, `targets`, `0`, `retry`.
fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, indexes) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            out.push(Segment::Key(name));
        }
        for index in indexes.split('[') {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

/// Line and column (1-based) of the value at `path` (`outputs.targets[1].name`), or of the
/// nearest enclosing node when the key is absent.
pub(super) fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let path = segments(path);
    let error = Find { path: &path }
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()?;
    error.location().map(|l| (l.line(), l.column()))
}

struct Find<'a> {
    path: &'a [Segment<'a>],
}

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    // A scalar is the node looked for, or the nearest one to it.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(HERE))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Segment::Key(wanted), rest)) = self.path.split_first() else {
            return Err(de::Error::custom(HERE));
        };
        while let Some(key) = map.next_key_seed(KeyText { seen: None })? {
            if key.as_deref() == Some(*wanted) {
                return map.next_value_seed(Find { path: rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        // Absent: this mapping is the nearest node.
        Err(de::Error::custom(HERE))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Segment::Index(wanted), rest)) = self.path.split_first() else {
            return Err(de::Error::custom(HERE));
        };
        for _ in 0..*wanted {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom(HERE));
            }
        }
        match seq.next_element_seed(Find { path: rest })? {
            Some(()) => Ok(()),
            None => Err(de::Error::custom(HERE)),
        }
    }
}

/// A mapping key as text (`None` for a key that is itself a mapping or a list). With `seen`,
/// a key already in it is refused from inside the key's own node, so the error carries the
/// position of the repeated key.
struct KeyText<'s> {
    /// The keys of this mapping so far, and where a repeated one is written.
    seen: Option<(&'s mut HashSet<String>, &'s RefCell<Option<String>>)>,
}

impl KeyText<'_> {
    fn key<E: de::Error>(self, key: String) -> Result<Option<String>, E> {
        match self.seen {
            Some((seen, repeated)) if seen.contains(&key) => {
                *repeated.borrow_mut() = Some(key);
                Err(E::custom(HERE))
            }
            Some((seen, _)) => {
                seen.insert(key.clone());
                Ok(Some(key))
            }
            None => Ok(Some(key)),
        }
    }
}

impl<'de> DeserializeSeed<'de> for KeyText<'_> {
    type Value = Option<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyText<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.key(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.key(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.key(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.key(v.to_string())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.key(v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.key("null".to_string())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

/// The first key that a mapping of the document repeats: its path, line and column.
/// `None` when there is none, or when the text is not valid YAML (the parser then reports
/// the syntax error itself).
pub(super) fn duplicate_key(text: &str) -> Option<(String, usize, usize)> {
    let found = RefCell::new(None);
    let error = Unique {
        path: String::new(),
        found: &found,
    }
    .deserialize(serde_yaml::Deserializer::from_str(text))
    .err()?;
    let path = found.into_inner()?;
    let location = error.location()?;
    Some((path, location.line(), location.column()))
}

struct Unique<'a> {
    path: String,
    found: &'a RefCell<Option<String>>,
}

impl Unique<'_> {
    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): its content may hold mappings too.
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        let repeated = RefCell::new(None);
        loop {
            let key = match map.next_key_seed(KeyText {
                seen: Some((&mut seen, &repeated)),
            }) {
                Ok(Some(key)) => key,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if let Some(key) = repeated.take() {
                        *self.found.borrow_mut() = Some(self.child(&key));
                    }
                    return Err(e);
                }
            };
            let path = match &key {
                Some(key) => self.child(key),
                None => self.path.clone(),
            };
            map.next_value_seed(Unique {
                path,
                found: self.found,
            })?;
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while seq
            .next_element_seed(Unique {
                path: format!("{}[{index}]", self.path),
                found: self.found,
            })?
            .is_some()
        {
            index += 1;
        }
        Ok(())
    }
}
