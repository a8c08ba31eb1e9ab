//! The sidecar's decoding of settlement batches from arbitrary bytes, as its
//! handler does it (the batch, then each record, close and progress report on
//! its own): never a panic; a record that passes validation has the id shapes
//! the ledger requires and a charge that is not negative.
#![no_main]

use bridge_protocol::{LeaseClose, LeaseProgress, RawSettleBatch, SettleRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = serde_json::from_slice::<RawSettleBatch>(data) else { return };
    if raw.validate().is_err() {
        return;
    }
    for value in raw.records {
        let Ok(record) = serde_json::from_value::<SettleRecord>(value) else { continue };
        if record.validate().is_ok() {
            assert!(bridge_protocol::valid_request_id(&record.request_id));
            assert!(bridge_protocol::valid_key_hash(&record.key_hash));
            assert!(record.charge() >= 0, "a valid record charges {}", record.charge());
        }
    }
    for value in raw.closes {
        if let Ok(close) = serde_json::from_value::<LeaseClose>(value) {
            let _ = close.validate();
        }
    }
    for value in raw.progress {
        if let Ok(progress) = serde_json::from_value::<LeaseProgress>(value) {
            let _ = progress.validate();
        }
    }
});
