//! The stack's contract with its link, driven without any device.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use msb_netstack::stack::{Config, Link, NetStack};

/// Gives `dropped` frames the link dropped (`Some(0)`), then one real frame, then nothing.
struct Scripted {
    dropped: usize,
    frame: Option<Vec<u8>>,
    /// Something pollable (the stack registers it).
    fd: std::os::unix::net::UnixStream,
}

impl Link for Scripted {
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.dropped > 0 {
            self.dropped -= 1;
            return Ok(Some(0));
        }
        Ok(self.frame.take().map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            f.len()
        }))
    }
    fn send(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn frames_the_link_dropped_are_skipped_not_taken_for_frames() {
    // A broadcast ARP request: any well-formed frame will do.
    let mut arp = vec![0xffu8; 6];
    arp.extend([0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend([0, 1, 0x08, 0, 6, 4, 0, 1, 0x02, 0, 0, 0, 0, 1, 10, 0, 2, 15]);
    arp.extend([0u8; 6]);
    arp.extend([10, 0, 2, 2]);
    arp.resize(60, 0);
    let link = Scripted {
        dropped: 5,
        frame: Some(arp),
        fd: std::os::unix::net::UnixStream::pair().unwrap().0,
    };
    let stats = NetStack::drive(Box::new(link), Config::default(), 2).unwrap();
    assert_eq!(stats.frames_in.load(Ordering::Relaxed), 1);
}
