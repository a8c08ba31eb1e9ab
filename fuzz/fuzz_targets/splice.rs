//! The body splice: for any JSON object it reads, setting a field gives a body
//! that reads again with exactly that field set (in place, or added last) and
//! every other field's text untouched; where serde_json reads the input as a
//! value, the output is that value with the field set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw_filter::body::Fields;

const NAMES: [&str; 4] = ["model", "max_completion_tokens", "stream_options", "a\"b"];

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(body) else { return };
    let Ok(fields) = Fields::parse(text) else { return };
    let name = NAMES[usize::from(which % 4)];
    let value = serde_json::json!({"include_usage": true, "n": which});
    let mut edits = fields.edit();
    edits.set(name, value.to_string());
    let out = edits.finish().expect("one edit");
    let out = std::str::from_utf8(&out).expect("the spliced body is UTF-8");
    let again = Fields::parse(out).unwrap_or_else(|e| panic!("the spliced body {out:?} does not read: {e:?}"));
    assert_eq!(again.get(name), Some(value.to_string().as_str()), "{name} in {out:?}");
    let mut names: Vec<String> = Vec::new();
    for other in again.names() {
        if other != name {
            assert_eq!(again.get(other), fields.get(other), "{other} changed: {text:?} -> {out:?}");
        }
        names.push(other.to_owned());
    }
    let mut before: Vec<String> = fields.names().map(str::to_owned).collect();
    if !before.iter().any(|n| n == name) {
        before.push(name.to_owned());
    }
    assert_eq!(names, before, "the fields or their order changed: {text:?} -> {out:?}");
    if let Ok(serde_json::Value::Object(mut expected)) = serde_json::from_str::<serde_json::Value>(text) {
        let got: serde_json::Value = serde_json::from_str(out).expect("serde_json reads the spliced body");
        expected.insert(name.to_owned(), value);
        assert_eq!(got, serde_json::Value::Object(expected), "from {text:?}");
    }
});
