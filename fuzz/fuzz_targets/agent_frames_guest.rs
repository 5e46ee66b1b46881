//! What the agent decodes from the host: HostMessage frames. The agent must survive any bytes
//! (a compromised host library, or a local user of the hybrid vsock socket).
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_init::agent::{HostMessage, Request};
use msb_init::frame::{encode, read_frame};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut buf = Vec::new();
    while let Ok(Some(m)) = read_frame::<HostMessage, _>(&mut r, &mut buf) {
        // Whatever decodes must re-encode to something that decodes to the same message.
        let bytes = encode(&m).expect("a decoded message encodes");
        let mut again = bytes.as_slice();
        assert_eq!(read_frame::<HostMessage, _>(&mut again, &mut Vec::new()).unwrap(), Some(m.clone()));
        if let HostMessage::Request { request: Request::Exec(e), .. } = m {
            let _ = e.argv.len();
        }
    }
});
