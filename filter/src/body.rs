//! A JSON object read one level deep: each top-level field as its raw text
//! in the body (nothing below it is built), and the body rewritten by
//! splicing those texts, so that what the gateway does not touch reaches the
//! upstream byte for byte. A 36 KB agent request is lexed once instead of
//! being built into a tree and written out again.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A field's name as the body spells it, unescaped (borrowed when it has no escapes).
pub struct Name<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The top-level fields of a JSON object, in the body's order.
pub struct Fields<'a> {
    text: &'a str,
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some((name, raw)) = map.next_entry::<Name<'de>, &'de RawValue>()? {
                    fields.push((name.0, raw));
                }
                Ok(fields)
            }
        }
        Ok(Fields { text: "", fields: d.deserialize_map(V)? })
    }
}

/// Why a body is not an object the gateway can read.
#[derive(Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// Not JSON at all (serde's words).
    Syntax(String),
    /// JSON, but not an object.
    NotAnObject,
    /// A field named twice: which one the upstream would read is not ours to guess.
    Duplicate(String),
}

impl<'a> Fields<'a> {
    pub fn parse(text: &'a str) -> Result<Fields<'a>, Unreadable> {
        if !text.trim_start().starts_with('{') {
            return match serde_json::from_str::<IgnoredAny>(text) {
                Ok(_) => Err(Unreadable::NotAnObject),
                Err(e) => Err(Unreadable::Syntax(e.to_string())),
            };
        }
        let mut fields: Fields<'a> = serde_json::from_str(text).map_err(|e| Unreadable::Syntax(e.to_string()))?;
        fields.text = text;
        for (i, (name, _)) in fields.fields.iter().enumerate() {
            if fields.fields[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(Unreadable::Duplicate(name.to_string()));
            }
        }
        Ok(fields)
    }

    /// The raw text of a field; `None` when absent. A `null` reads as absent.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, raw)| raw.get()).filter(|raw| *raw != "null")
    }

    /// The fields' names, in the body's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(n, _)| n.as_ref())
    }

    /// Where a field's value stands in the body.
    fn span(&self, name: &str) -> Option<Range<usize>> {
        let (_, raw) = self.fields.iter().find(|(n, _)| n == name)?;
        let start = raw.get().as_ptr() as usize - self.text.as_ptr() as usize;
        Some(start..start + raw.get().len())
    }

    /// An editor of this body.
    pub fn edit(&self) -> Edits<'_, 'a> {
        Edits { fields: self, replaced: Vec::new(), added: String::new() }
    }
}

/// Changes to a body: values replaced where they stand, fields added at the end.
pub struct Edits<'f, 'a> {
    fields: &'f Fields<'a>,
    replaced: Vec<(Range<usize>, String)>,
    added: String,
}

impl Edits<'_, '_> {
    /// Sets a field to `json` (a JSON text): in place if the body has it, else added last.
    pub fn set(&mut self, name: &str, json: String) {
        match self.fields.span(name) {
            Some(span) => self.replaced.push((span, json)),
            None => {
                self.added.push(',');
                self.added.push_str(&serde_json::to_string(name).unwrap_or_default());
                self.added.push(':');
                self.added.push_str(&json);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.replaced.is_empty() && self.added.is_empty()
    }

    /// The body with the changes; `None` if there were none.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        if self.is_empty() {
            return None;
        }
        let text = self.fields.text;
        self.replaced.sort_by_key(|(span, _)| span.start);
        let mut out = Vec::with_capacity(text.len() + self.added.len() + 64);
        let mut at = 0;
        for (span, json) in &self.replaced {
            out.extend_from_slice(&text.as_bytes()[at..span.start]);
            out.extend_from_slice(json.as_bytes());
            at = span.end;
        }
        // The object's closing brace: added fields go just before it.
        let close = text.trim_end().len() - 1;
        out.extend_from_slice(&text.as_bytes()[at..close]);
        let added = match self.fields.fields.is_empty() {
            true => self.added.strip_prefix(',').unwrap_or(&self.added),
            false => &self.added,
        };
        out.extend_from_slice(added.as_bytes());
        out.extend_from_slice(&text.as_bytes()[close..]);
        Some(out)
    }
}

/// Whether a raw JSON value is an object.
pub fn is_object(raw: &str) -> bool {
    raw.starts_with('{')
}

/// Whether a raw JSON value is a string.
pub fn is_string(raw: &str) -> bool {
    raw.starts_with('"')
}

/// The elements of a raw JSON array, each raw; `None` when it is not an array.
pub fn elements(raw: &str) -> Option<Vec<&str>> {
    if !raw.starts_with('[') {
        return None;
    }
    let items: Vec<&RawValue> = serde_json::from_str(raw).ok()?;
    Some(items.into_iter().map(RawValue::get).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_beyond_f64_is_kept_as_written() {
        // Found by the splice fuzz target: serde_json's Value refuses the
        // number; the splice leaves its text alone, as it does every field's.
        let text = r#" { "\u1212" : [21E1111111111111111111111111111111111,{"a":null}] }  "#;
        let fields = Fields::parse(text).unwrap();
        let mut edits = fields.edit();
        edits.set("model", "\"m\"".into());
        let out = String::from_utf8(edits.finish().unwrap()).unwrap();
        let again = Fields::parse(&out).unwrap();
        assert_eq!(again.get("\u{1212}"), Some(r#"[21E1111111111111111111111111111111111,{"a":null}]"#));
        assert_eq!(again.get("model"), Some("\"m\""));
        assert_eq!(again.names().collect::<Vec<_>>(), ["\u{1212}", "model"]);
    }

    #[test]
    fn fields_are_read_one_level_deep_and_spliced_in_place() {
        let text = r#" { "model" : "a", "messages":[{"role":"user","content":"x\"y"}], "n": null , "t":1.50 } "#;
        let f = Fields::parse(text).unwrap();
        assert_eq!(f.get("model"), Some(r#""a""#));
        assert_eq!(f.get("messages"), Some(r#"[{"role":"user","content":"x\"y"}]"#));
        assert_eq!(f.get("n"), None, "null reads as absent");
        assert_eq!(f.get("nope"), None);
        let mut e = f.edit();
        e.set("model", r#""b""#.into());
        e.set("n", "2".into());
        e.set("cap", "7".into());
        let out = String::from_utf8(e.finish().unwrap()).unwrap();
        assert_eq!(
            out, r#" { "model" : "b", "messages":[{"role":"user","content":"x\"y"}], "n": 2 , "t":1.50 ,"cap":7} "#,
            "everything else byte for byte, the added field last"
        );
        assert_eq!(Fields::parse(r#"{"a":1}"#).unwrap().edit().finish(), None, "no edit, no copy");
        let empty = Fields::parse("{}").unwrap();
        let mut e = empty.edit();
        e.set("a", "1".into());
        assert_eq!(e.finish().unwrap(), br#"{"a":1}"#);
    }

    #[test]
    fn escaped_names_duplicates_and_non_objects() {
        let f = Fields::parse(r#"{"mod\u0065l":"x"}"#).unwrap();
        assert_eq!(f.get("model"), Some(r#""x""#), "a name is read unescaped");
        assert_eq!(
            Fields::parse(r#"{"model":"a","mod\u0065l":"b"}"#).err(),
            Some(Unreadable::Duplicate("model".into()))
        );
        assert_eq!(Fields::parse("[1]").err(), Some(Unreadable::NotAnObject));
        assert_eq!(Fields::parse(" 7").err(), Some(Unreadable::NotAnObject));
        assert!(matches!(Fields::parse("{not json"), Err(Unreadable::Syntax(_))));
        assert!(matches!(Fields::parse(r#"{"a":1} x"#), Err(Unreadable::Syntax(_))), "trailing text");
        assert!(matches!(Fields::parse(r#"{"a":[1,}"#), Err(Unreadable::Syntax(_))), "nested syntax checked");
        assert_eq!(elements(r#"[1, {"a":2} ,"x"]"#), Some(vec!["1", r#"{"a":2}"#, r#""x""#]));
        assert_eq!(elements(r#"{"a":1}"#), None);
    }
}
