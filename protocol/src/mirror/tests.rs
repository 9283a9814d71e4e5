#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

#[test]
fn mirror_urls_parse_with_their_defaults_and_odd_ones_are_refused() {
    let u = MirrorUrl::parse("https://cdn.example.com/fleet/").unwrap();
    assert_eq!(
        (u.tls, u.host.as_str(), u.port, u.path.as_str()),
        (true, "cdn.example.com", 443, "/fleet")
    );
    assert_eq!(u.authority(), "cdn.example.com");
    assert_eq!(
        u.list_path(&[0xab; 32]),
        format!("/fleet/artifacts/{}/list", "ab".repeat(32))
    );
    assert_eq!(
        u.chunk_path(&[1; 32], 7),
        format!("/fleet/artifacts/{}/7", "01".repeat(32))
    );
    let u = MirrorUrl::parse("http://127.0.0.1:8080").unwrap();
    assert_eq!((u.tls, u.port, u.path.as_str()), (false, 8080, ""));
    assert_eq!(u.authority(), "127.0.0.1:8080");
    assert_eq!(
        u.list_path(&[0; 32]),
        format!("/artifacts/{}/list", "00".repeat(32))
    );
    let u = MirrorUrl::parse("https://[::1]:8443/m").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
    assert_eq!(u.origin(), "https://[::1]:8443");
    for bad in [
        "ftp://host/",
        "https://",
        "https://host:0/",
        "https://host:99999/",
        "https://host:x/",
        "https://user@host/",
        "https://host/a?b",
        "https://host/a#b",
        "https://host/../etc",
        "https://ho st/",
        "https://host/\r\nX: y",
        "https://[zz]/",
        "mqtt://host",
    ] {
        let e = MirrorUrl::parse(bad).unwrap_err().to_string();
        assert!(e.starts_with("mirror `"), "{bad}: {e}");
    }
    assert!(MirrorUrl::parse(&format!("https://h/{}", "a".repeat(MAX_URL))).is_err());
}

#[test]
fn the_request_is_a_plain_get_with_the_host() {
    let u = MirrorUrl::parse("https://m.lan:8443/x").unwrap();
    let r = String::from_utf8(u.request("/x/artifacts/aa/list")).unwrap();
    assert!(r.starts_with("GET /x/artifacts/aa/list HTTP/1.1\r\nHost: m.lan:8443\r\n"));
    assert!(r.ends_with("\r\n\r\n"));
}

fn head(text: &str) -> Result<Option<Head>, MirrorError> {
    parse_head(text.as_bytes())
}

#[test]
fn a_200_with_a_length_is_taken() {
    let h = head("HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 42\r\nConnection: keep-alive\r\n\r\nbody")
        .unwrap()
        .unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.content_length, Some(42));
    assert!(!h.close);
    assert_eq!(&b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 42\r\nConnection: keep-alive\r\n\r\nbody"[h.len..], b"body");
    assert_eq!(h.body_len(100, None), Ok(42));
    assert_eq!(h.body_len(100, Some(42)), Ok(42));
    assert!(h
        .body_len(41, None)
        .unwrap_err()
        .to_string()
        .contains("above the limit of 41"));
    assert!(h
        .body_len(100, Some(40))
        .unwrap_err()
        .to_string()
        .contains("the chunk list says 40"));
}

#[test]
fn incomplete_heads_wait_and_overlong_ones_are_refused() {
    assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Len"), Ok(None));
    assert_eq!(head(""), Ok(None));
    let long = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
    assert!(head(&long)
        .unwrap_err()
        .to_string()
        .contains("longer than 8 KiB"));
    let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: y\r\n")).collect();
    let many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
    assert!(head(&many)
        .unwrap_err()
        .to_string()
        .contains("more than 64"));
}

#[test]
fn what_a_mirror_must_not_answer_is_refused_in_one_line() {
    let refused = |text: &str| head(text).unwrap_err().to_string();
    assert!(refused("HTTP/2 200\r\n\r\n").contains("status line"));
    assert!(refused("HTTP/1.1 20 OK\r\n\r\n").contains("status line"));
    assert!(refused("HTTP/1.1 2000 OK\r\n\r\n").contains("status line"));
    assert!(refused("<html>\r\n\r\n").contains("status line"));
    assert!(refused("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").contains("not a number"));
    assert!(refused("HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n").contains("not a number"));
    assert!(
        refused("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n")
            .contains("not a number")
    );
    assert!(
        refused("HTTP/1.1 200 OK\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\n")
            .contains("two different")
    );
    assert!(
        refused("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .contains("Transfer-Encoding")
    );
    assert!(
        refused("HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n").contains("Content-Encoding")
    );
    assert!(refused("HTTP/1.1 200 OK\r\nno colon\r\n\r\n").contains("no colon"));
    assert!(refused("HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n").contains("visible ASCII"));
    assert!(refused("HTTP/1.1 200 OK\r\n: v\r\n\r\n").contains("no name"));
    let h = head("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
    assert!(h
        .body_len(10, None)
        .unwrap_err()
        .to_string()
        .contains("no Content-Length"));
    let h = head("HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.body_len(10, None).unwrap_err().to_string(), "HTTP 404");
    let h = head("HTTP/1.1 302 Found\r\nLocation: http://evil/\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(
        h.body_len(10, None).unwrap_err().to_string(),
        "HTTP 302 to http://evil/ (redirects are not followed)"
    );
}

#[test]
fn connections_close_when_the_server_says_or_speaks_http_1_0() {
    let h = head("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\nContent-Length: 0\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(h.close);
    let h = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(h.close);
    let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.content_length, Some(5));
}

proptest! {
    /// Whatever the bytes: no panic; a head found is within the bounds and the bytes;
    /// bytes without the blank line within 8 KiB never make a head.
    #[test]
    fn any_bytes_parse_to_a_bounded_head_or_a_clean_error(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(Some(h)) = parse_head(&bytes) {
            prop_assert!(h.len <= bytes.len() && h.len <= MAX_HEAD);
            prop_assert_eq!(&bytes[h.len - 4..h.len], b"\r\n\r\n");
            prop_assert!((100..=999).contains(&h.status));
        }
    }

    /// A well-formed answer of any status and length parses to that status and
    /// length however it is cut: a prefix without the blank line waits.
    #[test]
    fn a_well_formed_head_parses_whatever_its_cut(status in 100u16..600, len in 0u64..1_000_000_000_000_000_000, name in "[A-Za-z-]{1,20}", value in "[ -~]{0,40}", cut in 0usize..200) {
        prop_assume!(!["content-length", "transfer-encoding", "content-encoding", "connection", "location"]
            .contains(&name.to_ascii_lowercase().as_str()));
        let text = format!("HTTP/1.1 {status} X\r\n{name}: {value}\r\nContent-Length: {len}\r\n\r\n");
        let h = parse_head(text.as_bytes()).unwrap().unwrap();
        prop_assert_eq!((h.status, h.content_length, h.len), (status, Some(len), text.len()));
        let cut = cut.min(text.len() - 1);
        prop_assert_eq!(parse_head(&text.as_bytes()[..cut]), Ok(None));
    }

    /// Every URL that parses names a path under its base and an authority that parses
    /// back to the same host and port.
    #[test]
    fn urls_that_parse_round_trip(url in "(http|https)://[a-z0-9.-]{1,20}(:[0-9]{1,5})?(/[a-z0-9._-]{0,10}){0,3}") {
        if let Ok(u) = MirrorUrl::parse(&url) {
            let again = MirrorUrl::parse(&format!("{}{}", u.origin(), u.path)).unwrap();
            prop_assert_eq!((again.host, again.port, again.tls, again.path), (u.host.clone(), u.port, u.tls, u.path.clone()));
            let base = format!("{}/artifacts/", u.path);
            prop_assert!(u.list_path(&[0; 32]).starts_with(&base));
        }
    }
}
