//! Host side, tests: typed events are the old lines byte for byte, and a
//! log written before events were typed still verifies.

mod table;

use audit::{verify, AuditLog};
use serde_json::Value;

/// Written by netstack's `audit` module before this crate existed (the
/// table's old `json!` objects recorded at 1_700_000_000_000 + i ms,
/// then flushed): the format on disk as it was.
const OLD_LOG: &[u8] = include_bytes!("fixtures/before-typed-events.log");

#[test]
fn every_typed_event_is_the_old_json_byte_for_byte() {
    for (typed, old) in table::table() {
        let new = serde_json::to_value(&typed).unwrap();
        assert_eq!(new.to_string(), old.to_string(), "{typed:?}");
    }
}

#[test]
fn typed_events_are_aggregated_under_the_kinds_their_json_was() {
    for (typed, old) in table::table() {
        let Value::Object(m) = &old else { panic!("{old} is not an object") };
        assert_eq!(typed.refusal_kind(), audit::refusal_kind(m), "{old}");
        assert_eq!(typed.change_kind(), audit::change_kind(m), "{old}");
        assert_eq!(typed.allowed_kind(), audit::allowed_kind(m), "{old}");
        assert_eq!(typed.name(), m.get("event").and_then(Value::as_str));
    }
}

#[test]
fn a_log_written_before_events_were_typed_still_verifies() {
    let v = verify(OLD_LOG).unwrap();
    assert_eq!(v.lines, table::table().len() as u64);
    assert!(v.torn_tail.is_none());
}

#[test]
fn typed_events_write_the_old_log_again_byte_for_byte() {
    let mut log = AuditLog::new(Vec::new());
    for (i, (typed, _)) in table::table().iter().enumerate() {
        log.record(typed, 1_700_000_000_000 + i as u64).unwrap();
    }
    log.flush_suppressed(1_700_000_000_100).unwrap();
    assert_eq!(String::from_utf8_lossy(log.get_ref()), String::from_utf8_lossy(OLD_LOG));
}
