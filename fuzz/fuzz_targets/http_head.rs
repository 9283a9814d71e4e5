//! What a device reads from an artifact mirror before any of the body: the head of an
//! HTTP/1.x answer (`mirror::parse_head`) and what it allows of the body, and mirror
//! URLs with the GET request built from them. Nothing may panic or read past the
//! 8 KiB head bound, and no URL that parses may put a line break into the request.
#![no_main]

use kiln_protocol::mirror::{parse_head, MirrorUrl, MAX_HEAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        if let Ok(Some(head)) = parse_head(rest) {
            assert!(head.len <= MAX_HEAD && head.len <= rest.len());
            assert_eq!(&rest[head.len - 4..head.len], b"\r\n\r\n");
            for (max, exact) in [
                (0, None),
                (65_536, None),
                (65_536, Some(1024)),
                (u64::MAX, None),
            ] {
                if let Ok(len) = head.body_len(max, exact) {
                    assert!(len <= max && exact.is_none_or(|e| e == len));
                    assert_eq!(head.status, 200);
                }
            }
        }
        // A head cut anywhere waits or fails the same way as the whole refused.
        if let Ok(None) = parse_head(rest) {
            assert!(rest.len() < MAX_HEAD);
        }
    } else if let Ok(text) = std::str::from_utf8(rest) {
        if let Ok(url) = MirrorUrl::parse(text) {
            let request = url.request(&url.chunk_path(&[7; 32], 3));
            let lines = request.split(|b| *b == b'\n').count();
            assert_eq!(lines, 7, "{}", String::from_utf8_lossy(&request));
            let again = MirrorUrl::parse(&format!("{}{}", url.origin(), url.path)).unwrap();
            assert_eq!(
                (again.host, again.port, again.path),
                (url.host, url.port, url.path)
            );
        }
    }
});
