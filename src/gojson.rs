//! JSON read the way the registry (Go's `encoding/json`) reads it.
//!
//! The registry, containerd, skopeo and docker all decode manifests with Go's
//! `encoding/json`, whose rules differ from serde's derive in ways an attacker
//! can use to show regguard one manifest and the registry another:
//!
//! - object keys match struct fields **case-insensitively** (`"Size"` fills
//!   `size`; so do the Kelvin sign and the long s, which fold to `k` and `s`);
//! - when a field is named twice, the **last** occurrence wins;
//! - a JSON `null` leaves a string, number or struct field as it was, and
//!   empties a slice;
//! - an object decodes **into** the existing struct value (a repeated object
//!   merges with the earlier one), and an array decodes element by element into
//!   the existing elements.
//!
//! This module holds the generic machinery: a struct type lists its field
//! names ([`GoStruct::FIELDS`]) and decodes one field at a time; the map walk,
//! the key matching and the null rules live here once. It also notes every
//! object in which one field was named more than once, so the push gate can
//! refuse such a manifest outright (it reads differently in other tools).
//! It knows nothing about manifests.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Keys that named a field already named in the same object (`"size"` then `"Size"`).
#[derive(Debug, Default)]
pub struct Ambiguity {
    /// The later key and the earlier one, first occurrence only.
    pub first: Option<(String, String)>,
}

/// Shared by every seed of one decode.
pub type Notes = RefCell<Ambiguity>;

/// A struct decoded with Go's rules.
pub trait GoStruct: Default {
    /// The JSON names of the fields, in declaration order.
    const FIELDS: &'static [&'static str];
    /// Decodes the value of field `index` (an index into [`GoStruct::FIELDS`]) into `self`.
    fn decode_field<'de, A: MapAccess<'de>>(
        &mut self,
        index: usize,
        map: &mut A,
        notes: &Notes,
    ) -> Result<(), A::Error>;
}

/// Go's key folding for struct fields (`encoding/json` folds each rune to the
/// smallest rune of its Unicode simple-fold orbit): ASCII letters ignore case,
/// and `U+212A KELVIN SIGN` and `U+017F LATIN SMALL LETTER LONG S` fold to `k` and `s`.
/// No other non-ASCII rune folds onto an ASCII letter.
fn fold(c: char) -> char {
    match c {
        '\u{212A}' => 'k',
        '\u{017F}' => 's',
        c => c.to_ascii_lowercase(),
    }
}

fn fold_eq(key: &str, field: &str) -> bool {
    let mut k = key.chars().map(fold);
    let mut f = field.chars().map(fold);
    loop {
        match (k.next(), f.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Which field a key fills: an exact match first, else the first case-folded match.
pub fn field_index(fields: &[&str], key: &str) -> Option<usize> {
    fields
        .iter()
        .position(|f| *f == key)
        .or_else(|| fields.iter().position(|f| fold_eq(key, f)))
}

/// Decodes a JSON value into an existing struct value, Go-style.
pub struct InPlace<'a, T> {
    pub target: &'a mut T,
    pub notes: &'a Notes,
}

impl<'de, T: GoStruct> DeserializeSeed<'de> for InPlace<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(StructVisitor {
            target: self.target,
            notes: self.notes,
        })
    }
}

/// Decodes into an optional struct: `null` leaves it as it was; an object fills
/// (or creates) it. Used for struct fields whose presence matters to the caller.
pub struct IntoOption<'a, T> {
    pub target: &'a mut Option<T>,
    pub notes: &'a Notes,
}

impl<'de, T: GoStruct> DeserializeSeed<'de> for IntoOption<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(OptionVisitor {
            target: self.target,
            notes: self.notes,
        })
    }
}

struct StructVisitor<'a, T> {
    target: &'a mut T,
    notes: &'a Notes,
}

impl<'de, T: GoStruct> Visitor<'de> for StructVisitor<'_, T> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(()) // Go: null into a struct has no effect
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        walk_map(self.target, map, self.notes)
    }
}

struct OptionVisitor<'a, T> {
    target: &'a mut Option<T>,
    notes: &'a Notes,
}

impl<'de, T: GoStruct> Visitor<'de> for OptionVisitor<'_, T> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        walk_map(self.target.get_or_insert_with(T::default), map, self.notes)
    }
}

fn walk_map<'de, T: GoStruct, A: MapAccess<'de>>(
    target: &mut T,
    mut map: A,
    notes: &Notes,
) -> Result<(), A::Error> {
    // Which key last filled each field, to notice a field named twice.
    let mut named: Vec<Option<String>> = vec![None; T::FIELDS.len()];
    while let Some(key) = map.next_key::<String>()? {
        match field_index(T::FIELDS, &key) {
            Some(i) => {
                if let Some(slot) = named.get_mut(i) {
                    if let Some(earlier) = slot.as_ref() {
                        let mut n = notes.borrow_mut();
                        if n.first.is_none() {
                            n.first = Some((key.clone(), earlier.clone()));
                        }
                    }
                    *slot = Some(key);
                }
                target.decode_field(i, &mut map, notes)?;
            }
            None => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
    Ok(())
}

/// Reads a scalar field: `null` keeps the old value, anything else replaces it.
pub fn scalar<'de, A, T>(map: &mut A, slot: &mut T) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    T: serde::Deserialize<'de>,
{
    if let Some(v) = map.next_value::<Option<T>>()? {
        *slot = v;
    }
    Ok(())
}

/// Decodes a JSON array into an existing slice, Go-style: `null` empties it,
/// element `i` decodes into the existing element `i` (if any), and the slice
/// ends up as long as the array.
pub struct IntoSlice<'a, T> {
    pub target: &'a mut Vec<T>,
    pub notes: &'a Notes,
}

impl<'de, T: GoElement> DeserializeSeed<'de> for IntoSlice<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(SliceVisitor {
            target: self.target,
            notes: self.notes,
        })
    }
}

struct SliceVisitor<'a, T> {
    target: &'a mut Vec<T>,
    notes: &'a Notes,
}

impl<'de, T: GoElement> Visitor<'de> for SliceVisitor<'_, T> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.target.clear();
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq
            .next_element_seed(Element {
                target: self.target,
                index: i,
                notes: self.notes,
            })?
            .is_some()
        {
            i += 1;
        }
        self.target.truncate(i);
        Ok(())
    }
}

struct Element<'a, T> {
    target: &'a mut Vec<T>,
    index: usize,
    notes: &'a Notes,
}

impl<'de, T: GoElement> DeserializeSeed<'de> for Element<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.index >= self.target.len() {
            self.target.push(T::default());
        }
        match self.target.get_mut(self.index) {
            Some(slot) => T::decode_into(slot, d, self.notes),
            None => Err(de::Error::custom("slice index out of range")),
        }
    }
}

/// What a slice can hold: a struct (decoded in place) or a string.
pub trait GoElement: Default {
    fn decode_into<'de, D: Deserializer<'de>>(
        slot: &mut Self,
        d: D,
        notes: &Notes,
    ) -> Result<(), D::Error>;
}

/// Struct elements decode in place.
impl<T: GoStruct> GoElement for T {
    fn decode_into<'de, D: Deserializer<'de>>(
        slot: &mut Self,
        d: D,
        notes: &Notes,
    ) -> Result<(), D::Error> {
        InPlace {
            target: slot,
            notes,
        }
        .deserialize(d)
    }
}

/// A string element (`urls`): `null` keeps the old value.
impl GoElement for String {
    fn decode_into<'de, D: Deserializer<'de>>(
        slot: &mut Self,
        d: D,
        _: &Notes,
    ) -> Result<(), D::Error> {
        if let Some(s) = <Option<String> as serde::Deserialize>::deserialize(d)? {
            *slot = s;
        }
        Ok(())
    }
}

/// Decodes a whole document into `T`, returning it and the first ambiguous key pair.
pub fn from_slice<T: GoStruct>(
    body: &[u8],
) -> Result<(T, Option<(String, String)>), serde_json::Error> {
    let notes = Notes::default();
    let mut value = T::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    InPlace {
        target: &mut value,
        notes: &notes,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((value, notes.into_inner().first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    struct Pair {
        size: u64,
        name: String,
        inner: Option<Box<Pair>>,
        list: Vec<String>,
    }

    impl GoStruct for Pair {
        const FIELDS: &'static [&'static str] = &["size", "name", "inner", "list"];
        fn decode_field<'de, A: MapAccess<'de>>(
            &mut self,
            index: usize,
            map: &mut A,
            notes: &Notes,
        ) -> Result<(), A::Error> {
            match index {
                0 => scalar(map, &mut self.size),
                1 => scalar(map, &mut self.name),
                2 => {
                    let mut inner = self.inner.take().map(|b| *b);
                    map.next_value_seed(IntoOption {
                        target: &mut inner,
                        notes,
                    })?;
                    self.inner = inner.map(Box::new);
                    Ok(())
                }
                _ => map.next_value_seed(IntoSlice {
                    target: &mut self.list,
                    notes,
                }),
            }
        }
    }

    fn parse(s: &str) -> (Pair, Option<(String, String)>) {
        from_slice::<Pair>(s.as_bytes()).unwrap()
    }

    #[test]
    fn keys_fold_case_and_the_last_one_wins() {
        let (p, amb) = parse(r#"{"size":418,"Size":1418}"#);
        assert_eq!(p.size, 1418);
        assert_eq!(amb, Some(("Size".into(), "size".into())));
        let (p, _) = parse(r#"{"SIZE":1,"size":2}"#);
        assert_eq!(p.size, 2);
        // The long s folds onto s, as in Go.
        let (p, amb) = parse("{\"\u{017F}ize\":7}");
        assert_eq!(p.size, 7);
        assert_eq!(amb, None);
        let (p, _) = parse(r#"{"size":5,"size":6}"#);
        assert_eq!(p.size, 6);
    }

    #[test]
    fn null_keeps_scalars_and_empties_slices() {
        let (p, _) = parse(r#"{"size":3,"Size":null,"list":["a"],"list":null}"#);
        assert_eq!(p.size, 3);
        assert!(p.list.is_empty());
    }

    #[test]
    fn repeated_objects_merge_and_arrays_decode_into_existing_elements() {
        let (p, _) = parse(r#"{"inner":{"size":1,"name":"a"},"Inner":{"size":2}}"#);
        let inner = p.inner.unwrap();
        assert_eq!((inner.size, inner.name.as_str()), (2, "a"));
        let (p, _) = parse(r#"{"list":["a","b","c"],"list":[null,"x"]}"#);
        assert_eq!(p.list, vec!["a".to_string(), "x".to_string()]);
    }

    #[test]
    fn unknown_keys_are_skipped_and_trailing_garbage_refused() {
        let (p, amb) = parse(r#"{"x":{"size":9},"X":1,"size":4}"#);
        assert_eq!(p.size, 4);
        assert_eq!(amb, None);
        assert!(from_slice::<Pair>(br#"{"size":1} x"#).is_err());
        assert!(from_slice::<Pair>(br#"{"size":"1"}"#).is_err());
    }
}
