//! The response meter over arbitrary answers cut into arbitrary chunks: never
//! a panic, the same usage and response id however the bytes were chunked,
//! and the bytes forwarded equal the bytes received when nothing is dropped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw_filter::response::{Forward, ResponseMeter};

fn meter(chunks: &[&[u8]], sse: bool, drop_usage: bool) -> (ResponseMeter, Vec<u8>) {
    let mut m = ResponseMeter::new(sse, drop_usage);
    let mut out = Vec::new();
    for chunk in chunks {
        match m.on_chunk(chunk) {
            Forward::Unchanged => out.extend_from_slice(chunk),
            Forward::Replace(bytes) => out.extend_from_slice(&bytes),
        }
    }
    out.extend_from_slice(&m.on_end());
    (m, out)
}

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the shape and the cuts; the rest is the answer.
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some((&step, answer)) = rest.split_first() else { return };
    let (sse, drop_usage) = (flags & 1 == 1, flags & 2 == 2);
    let step = usize::from(step).max(1);
    let chunks: Vec<&[u8]> = answer.chunks(step).collect();
    let (whole, whole_out) = meter(&[answer], sse, drop_usage);
    let (cut, cut_out) = meter(&chunks, sse, drop_usage);
    assert_eq!(whole.usage(), cut.usage(), "usage depends on the chunking");
    assert_eq!(whole.response_id(), cut.response_id(), "response id depends on the chunking");
    assert_eq!(whole_out, cut_out, "what the client gets depends on the chunking");
    if !(sse && drop_usage) {
        assert_eq!(cut_out, answer, "forwarded bytes differ from the answer");
    }
});
