//! The guest→host control stream, as the VMM receives it from the guest's UART: arbitrary bytes
//! split at arbitrary points. It must never panic, never emit an event after the stream failed
//! or after Exited, and never emit Exited twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_init::control::{ControlEvent, ControlReceiver};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so the fuzzer explores how frames are split.
    let Some((&split, rest)) = data.split_first() else { return };
    let chunk = usize::from(split).max(1);
    let mut r = ControlReceiver::new();
    let mut exited = 0;
    let mut after_exit = false;
    for c in rest.chunks(chunk) {
        let failed_before = r.failure().is_some();
        let mut events = 0;
        let _ = r.push(c, |e| {
            events += 1;
            if exited > 0 {
                after_exit = true;
            }
            if matches!(e, ControlEvent::Exited(_)) {
                exited += 1;
            }
        });
        assert!(!(failed_before && events > 0), "events after the stream failed");
    }
    assert!(exited <= 1, "Exited twice");
    assert!(!after_exit, "an event after Exited");
});
