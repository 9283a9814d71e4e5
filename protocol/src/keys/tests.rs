use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use proptest::prelude::*;

use super::format::{dotted_oid, pem_block, MAX_BASE64, PUBLIC_TAG, SECRET_TAG};
use super::*;

/// RFC 8032 test 1: a known seed and its public key.
const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn rfc8032_secret() -> SecretKey {
    SecretKey::from_text(&format!("{SECRET_TAG} {RFC8032_SEED}")).unwrap()
}

/// Runs an external tool and returns its stdout; `None`, with a note, when the tool
/// is not installed (the interop tests then skip). Any other failure fails the test.
fn run(tool: &str, args: &[&str]) -> Option<Vec<u8>> {
    let output = match Command::new(tool).args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("note: `{tool}` is not on PATH; skipping this interop check");
            return None;
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(output.stdout)
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// The key algorithm and public key bytes of an `openssl pkey ... -text` report.
fn openssl_report(stdout: &[u8]) -> (String, Vec<u8>) {
    let report = String::from_utf8(stdout.to_vec()).unwrap();
    let algorithm = report.split_whitespace().next().unwrap().to_string();
    let hex: String = report
        .lines()
        .skip_while(|l| l.trim() != "pub:")
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .flat_map(|l| l.chars().filter(char::is_ascii_hexdigit))
        .collect();
    (algorithm, hex::decode(hex).unwrap())
}

fn public_err(text: &str) -> KeyError {
    let err = PublicKey::from_text(text).unwrap_err();
    assert!(!err.to_string().contains('\n'), "{err}");
    err
}

fn secret_err(text: &str) -> KeyError {
    let err = SecretKey::from_text(text).unwrap_err();
    assert!(!err.to_string().contains('\n'), "{err}");
    err
}

fn ssh_line(blob: &[u8]) -> String {
    format!("ssh-ed25519 {} c", STANDARD.encode(blob))
}

/// An SSH wire blob of the given strings.
fn ssh_blob(fields: &[&[u8]]) -> Vec<u8> {
    let mut blob = Vec::new();
    for field in fields {
        blob.extend_from_slice(&(field.len() as u32).to_be_bytes());
        blob.extend_from_slice(field);
    }
    blob
}

#[test]
fn key_files_round_trip_and_ids_match() {
    let secret = SecretKey::generate().unwrap();
    let again = SecretKey::from_text(&secret.to_text()).unwrap();
    assert_eq!(again.public(), secret.public());
    let public = PublicKey::from_text(&secret.public().to_text()).unwrap();
    assert_eq!(public.id(), secret.public().id());
    assert!(secret.to_text().contains(&public.id().to_string()));
    assert!(public.to_text().contains(&public.id().to_string()));
}

#[test]
fn secret_key_text_is_a_commented_pkcs8_pem() {
    let secret = rfc8032_secret();
    let expected = format!(
        "# kiln ed25519 secret key, key id {}: keep it private\n\
         -----BEGIN PRIVATE KEY-----\n\
         {}\n\
         -----END PRIVATE KEY-----\n",
        secret.public().id(),
        STANDARD.encode(
            hex::decode(format!("302e020100300506032b657004220420{RFC8032_SEED}")).unwrap()
        )
    );
    assert_eq!(secret.to_text(), expected);
}

#[test]
fn public_key_text_is_a_commented_spki_pem() {
    let public = rfc8032_secret().public();
    assert_eq!(hex::encode(public.0.as_bytes()), RFC8032_PUBLIC);
    assert_eq!(
        public.to_text(),
        "# kiln ed25519 public key, key id 21fe31dfa154a261\n\
         -----BEGIN PUBLIC KEY-----\n\
         MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n\
         -----END PUBLIC KEY-----\n"
    );
    let der = hex::decode(format!("302a300506032b6570032100{RFC8032_PUBLIC}")).unwrap();
    assert!(public.to_text().contains(&STANDARD.encode(der)));
}

#[test]
fn pem_bodies_wrap_at_64_characters() {
    let text = pem("c", "PUBLIC KEY", &[7u8; 100]);
    let lengths: Vec<usize> = text.lines().map(str::len).collect();
    assert_eq!(lengths, [3, 26, 64, 64, 8, 24]);
    let (_, body) = pem_block(&text).unwrap().unwrap();
    assert_eq!(STANDARD.decode(body).unwrap(), [7u8; 100]);
}

#[test]
fn openssh_lines_round_trip() {
    let public = SecretKey::generate().unwrap().public();
    for comment in ["", "ops@example", "  two words\nand a newline "] {
        let line = public.to_openssh(comment);
        assert!(
            line.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(PublicKey::from_text(&line).unwrap(), public);
        assert_eq!(
            PublicKey::from_text(&format!("# fleet\n\n{line}\n")).unwrap(),
            public
        );
    }
    let fields = |comment: &str| -> Vec<String> {
        let line = public.to_openssh(comment);
        line.split(' ').skip(2).map(String::from).collect()
    };
    assert_eq!(fields("ops@example"), ["ops@example"]);
    assert_eq!(fields(""), [""; 0]);
    assert_eq!(fields(" a\n b "), ["a", "b"]);
}

#[test]
fn the_openssh_form_of_the_rfc_8032_key_is_exact() {
    let line = rfc8032_secret().public().to_openssh("x");
    let blob = ssh_blob(&[b"ssh-ed25519", &hex::decode(RFC8032_PUBLIC).unwrap()]);
    assert_eq!(line, format!("ssh-ed25519 {} x", STANDARD.encode(blob)));
}

#[test]
fn legacy_hex_lines_still_parse() {
    let secret = SecretKey::from_text(&format!(
        "# kiln ed25519 secret key, key id 21fe31dfa154a261: keep it private\n\
         {SECRET_TAG} {RFC8032_SEED}\n"
    ))
    .unwrap();
    assert_eq!(hex::encode(secret.0.to_bytes()), RFC8032_SEED);
    let public = PublicKey::from_text(&format!("  {PUBLIC_TAG} {RFC8032_PUBLIC}  \n")).unwrap();
    assert_eq!(public, secret.public());
    // A legacy key rewritten by this version is the same key.
    let rewritten = SecretKey::from_text(&secret.to_text()).unwrap();
    assert_eq!(rewritten.0.to_bytes(), secret.0.to_bytes());
}

#[test]
fn lines_outside_the_pem_block_are_ignored() {
    let public = SecretKey::generate().unwrap().public();
    let text = public.to_text();
    let wrapped = format!(
        "Subject: the fleet key\r\n\r\n{}notes after the key\n",
        text.replace('\n', "\r\n")
    );
    assert_eq!(PublicKey::from_text(&wrapped).unwrap(), public);
    let bare: String = text.lines().skip(1).map(|l| format!("  {l}\n")).collect();
    assert_eq!(PublicKey::from_text(&bare).unwrap(), public);
    // PEM is preferred over a line format anywhere in the file.
    let other = SecretKey::generate().unwrap().public();
    let both = format!("{}\n{text}", other.to_openssh(""));
    assert_eq!(PublicKey::from_text(&both).unwrap(), public);
}

#[test]
fn a_secret_key_is_not_accepted_as_a_public_key() {
    let secret = SecretKey::generate().unwrap();
    let legacy = format!("{SECRET_TAG} {}", hex::encode(secret.0.to_bytes()));
    for text in [secret.to_text(), legacy] {
        let err = public_err(&text);
        assert_eq!(
            err,
            KeyError::WrongKind {
                expected: "public key",
                found: "secret key".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "expected a public key but found a secret key"
        );
    }
}

#[test]
fn a_public_key_is_not_accepted_as_a_secret_key() {
    let public = SecretKey::generate().unwrap().public();
    let legacy = format!("{PUBLIC_TAG} {}", hex::encode(public.0.as_bytes()));
    for text in [public.to_text(), public.to_openssh("c"), legacy] {
        assert_eq!(
            secret_err(&text).to_string(),
            "expected a secret key but found a public key"
        );
    }
}

#[test]
fn garbage_is_a_clear_error() {
    for text in ["", "# only a comment\n", "\n  \n"] {
        assert!(matches!(public_err(text), KeyError::Missing { .. }));
        assert!(matches!(secret_err(text), KeyError::Missing { .. }));
    }
    assert_eq!(
        PublicKey::from_text("kiln-public-key-v1 abcd"),
        Err(KeyError::BadEncoding)
    );
    assert_eq!(
        PublicKey::from_text(&format!("{PUBLIC_TAG} {RFC8032_PUBLIC}00")),
        Err(KeyError::BadEncoding)
    );
    // Unknown text is not quoted back: a bare hex secret must not reach the logs.
    for text in ["hello world", RFC8032_SEED] {
        let err = secret_err(text);
        assert!(matches!(err, KeyError::Unrecognized { .. }), "{err}");
        assert!(!err.to_string().contains(&text[..5]), "{err}");
    }
    assert_eq!(
        public_err("hello").to_string(),
        "not a key file (expected a PUBLIC KEY PEM block, an `ssh-ed25519` line or a \
         `kiln-public-key-v1` line)"
    );
}

#[test]
fn truncated_or_garbage_pem_is_refused() {
    let text = SecretKey::generate().unwrap().to_text();
    let body = text.lines().nth(2).unwrap();
    let with_body = |new: &str| text.replace(body, new);
    let too_long = "A".repeat(MAX_BASE64 + 4);
    let cases = [
        (
            with_body(&body[..40]),
            "malformed PKCS#8 key: the key is not 32 bytes",
        ),
        (
            with_body(&format!("{body}AAAA")),
            "malformed PKCS#8 key: the key is not 32 bytes",
        ),
        (with_body(&body[..41]), "malformed PEM key: invalid base64"),
        (
            with_body(&body.replace(|c: char| c.is_ascii_digit(), "!")),
            "malformed PEM key: invalid base64",
        ),
        (
            with_body(""),
            "malformed PKCS#8 key: not the RFC 8410 ed25519 layout",
        ),
        (
            with_body("MAA="),
            "malformed PKCS#8 key: not the RFC 8410 ed25519 layout",
        ),
        (
            with_body(&too_long),
            "malformed PEM key: base64 is over 4 KiB",
        ),
        (
            text.replace("-----END PRIVATE KEY-----", ""),
            "malformed PEM key: no END line",
        ),
        (
            text.replace("END PRIVATE", "END PUBLIC"),
            "malformed PEM key: the END line does not match the BEGIN line",
        ),
        (
            format!("{text}{text}"),
            "malformed PEM key: more than one key in the file",
        ),
    ];
    for (text, message) in cases {
        assert_eq!(secret_err(&text).to_string(), message, "{text}");
    }
    let public = SecretKey::generate().unwrap().public().to_text();
    let unpadded = public.replace('=', "");
    assert_eq!(
        public_err(&unpadded).to_string(),
        "malformed PEM key: invalid base64"
    );
}

#[test]
fn truncated_or_garbage_openssh_lines_are_refused() {
    let public = rfc8032_secret().public();
    let key = public.to_bytes();
    let cases = [
        (
            "ssh-ed25519".to_string(),
            "malformed OpenSSH key: no base64 key after `ssh-ed25519`",
        ),
        (
            "ssh-ed25519 !!!!".to_string(),
            "malformed OpenSSH key: invalid base64",
        ),
        (
            format!("ssh-ed25519 {}", "A".repeat(MAX_BASE64 + 4)),
            "malformed OpenSSH key: base64 is over 4 KiB",
        ),
        (
            ssh_line(&[0, 0, 0]),
            "malformed OpenSSH key: the encoded key is truncated",
        ),
        (
            ssh_line(&[0xff, 0xff, 0xff, 0xff, 0]),
            "malformed OpenSSH key: the encoded key is truncated",
        ),
        (
            ssh_line(&ssh_blob(&[b"ssh-ed25519"])),
            "malformed OpenSSH key: the encoded key is truncated",
        ),
        (
            ssh_line(&ssh_blob(&[b"ssh-rsa", &key])),
            "malformed OpenSSH key: the encoded key type is not ssh-ed25519",
        ),
        (
            ssh_line(&ssh_blob(&[b"ssh-ed25519", &key[..31]])),
            "malformed OpenSSH key: the key is not 32 bytes",
        ),
        (
            ssh_line(&ssh_blob(&[b"ssh-ed25519", &key, b""])),
            "malformed OpenSSH key: trailing bytes after the key",
        ),
        (
            "ssh-rsa AAAAB3NzaC1yc2E x".to_string(),
            "not an ed25519 key (OpenSSH algorithm is ssh-rsa, not Ed25519)",
        ),
        (
            "ecdsa-sha2-nistp256 AAAA".to_string(),
            "not an ed25519 key (OpenSSH algorithm is ecdsa-sha2-nistp256, not Ed25519)",
        ),
    ];
    for (line, message) in cases {
        assert_eq!(public_err(&line).to_string(), message, "{line}");
    }
    // The same blob, well formed, is the key.
    let good = ssh_line(&ssh_blob(&[b"ssh-ed25519", &key]));
    assert_eq!(PublicKey::from_text(&good).unwrap(), public);
    // Two bytes short of the wire length: the decoder never reads past the blob.
    let short = ssh_blob(&[b"ssh-ed25519", &key]);
    assert!(matches!(
        public_err(&ssh_line(&short[..short.len() - 2])),
        KeyError::Malformed { .. }
    ));
}

#[test]
fn other_pem_blocks_are_refused_by_name() {
    let block = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
    for label in [
        "ENCRYPTED PRIVATE KEY",
        "OPENSSH PRIVATE KEY",
        "CERTIFICATE",
    ] {
        assert_eq!(
            secret_err(&block(label)),
            KeyError::UnsupportedPem {
                label: label.into()
            }
        );
    }
    assert_eq!(
        secret_err(&block("RSA PRIVATE KEY")).to_string(),
        "not an ed25519 key (PEM algorithm is RSA, not Ed25519)"
    );
    assert_eq!(
        public_err(&block("EC PRIVATE KEY")).to_string(),
        "not an ed25519 key (PEM algorithm is EC, not Ed25519)"
    );
}

#[test]
fn unknown_algorithms_are_named_by_oid() {
    // SPKI { { OID 1.2.3.4 }, BIT STRING 00 }
    let der = hex::decode("300b300506032a03040302000000").unwrap();
    let text = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD.encode(&der[..der.len() - 1])
    );
    assert_eq!(
        public_err(&text).to_string(),
        "not an ed25519 key (SPKI algorithm is OID 1.2.3.4, not Ed25519)"
    );
    let rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    assert_eq!(dotted_oid(&rsa).unwrap(), "1.2.840.113549.1.1.1");
    assert_eq!(dotted_oid(&[0x88, 0x37]).unwrap(), "2.999");
    assert_eq!(dotted_oid(&[0x2a, 0x86]), None);
    assert_eq!(dotted_oid(&[0xff; 12]), None);
}

#[test]
fn signatures_verify_only_for_the_signed_message() {
    let secret = SecretKey::generate().unwrap();
    let sig = secret.sign(b"hello");
    assert!(secret.public().verify_strict(b"hello", &sig));
    assert!(!secret.public().verify_strict(b"hellp", &sig));
}

#[test]
fn openssl_reads_the_secret_key_file() {
    let secret = SecretKey::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "fleet.key", secret.to_text());
    let Some(out) = run("openssl", &["pkey", "-in", &path, "-noout", "-text_pub"]) else {
        return;
    };
    let (algorithm, public) = openssl_report(&out);
    assert_eq!(algorithm, "ED25519");
    assert_eq!(public, secret.public().0.as_bytes());
}

#[test]
fn openssl_reads_the_public_key_file() {
    let public = SecretKey::generate().unwrap().public();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "fleet.pub", public.to_text());
    let Some(out) = run(
        "openssl",
        &["pkey", "-pubin", "-in", &path, "-noout", "-text"],
    ) else {
        return;
    };
    let (algorithm, bytes) = openssl_report(&out);
    assert_eq!(algorithm, "ED25519");
    assert_eq!(bytes, public.0.as_bytes());
}

#[test]
fn openssl_signatures_verify_with_verify_strict() {
    let secret = SecretKey::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = write(dir.path(), "fleet.key", secret.to_text());
    let message = b"a kiln artifact\n";
    let input = write(dir.path(), "message", message);
    let args = ["pkeyutl", "-sign", "-rawin", "-inkey", &key, "-in", &input];
    let Some(out) = run("openssl", &args) else {
        return;
    };
    let signature: [u8; 64] = out.as_slice().try_into().unwrap();
    assert!(secret.public().verify_strict(message, &signature));
    assert!(!secret
        .public()
        .verify_strict(b"another artifact\n", &signature));
    // ed25519 signing is deterministic: the same key signs the same bytes.
    assert_eq!(signature, secret.sign(message));
}

#[test]
fn keys_written_by_openssl_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = write(dir.path(), "k.pem", "");
    let public = write(dir.path(), "p.pem", "");
    let args = ["genpkey", "-algorithm", "ed25519", "-out", &key];
    let Some(_) = run("openssl", &args) else {
        return;
    };
    run(
        "openssl",
        &["pkey", "-in", &key, "-pubout", "-out", &public],
    );
    let secret = SecretKey::from_text(&read(&key)).unwrap();
    assert_eq!(
        PublicKey::from_text(&read(&public)).unwrap(),
        secret.public()
    );
}

#[test]
fn ssh_keygen_accepts_the_openssh_line() {
    let public = SecretKey::generate().unwrap().public();
    let line = public.to_openssh("fleet@kiln");
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "fleet.pub", format!("{line}\n"));
    let Some(out) = run("ssh-keygen", &["-l", "-f", &path]) else {
        return;
    };
    let blob = STANDARD.decode(line.split(' ').nth(1).unwrap()).unwrap();
    let fingerprint = STANDARD_NO_PAD.encode(Sha256::digest(blob));
    assert_eq!(
        String::from_utf8(out).unwrap().trim(),
        format!("256 SHA256:{fingerprint} fleet@kiln (ED25519)")
    );
}

#[test]
fn keys_written_by_ssh_keygen_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id").to_str().unwrap().to_string();
    let args = [
        "-q", "-t", "ed25519", "-N", "", "-C", "ops@host", "-f", &key,
    ];
    let Some(_) = run("ssh-keygen", &args) else {
        return;
    };
    let line = read(&format!("{key}.pub"));
    let public = PublicKey::from_text(&line).unwrap();
    assert_eq!(public.to_openssh("ops@host"), line.trim());
}

#[test]
fn an_rsa_or_ec_key_is_refused_as_not_ed25519() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
            "RSA",
        ),
        (
            ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            "EC",
        ),
    ];
    for (options, name) in cases {
        let key = write(dir.path(), "k.pem", "");
        let public = write(dir.path(), "p.pem", "");
        let Some(_) = run(
            "openssl",
            &[&["genpkey", "-out", &key], &options[..]].concat(),
        ) else {
            return;
        };
        run(
            "openssl",
            &["pkey", "-in", &key, "-pubout", "-out", &public],
        );
        assert_eq!(
            secret_err(&read(&key)).to_string(),
            format!("not an ed25519 key (PKCS#8 algorithm is {name}, not Ed25519)")
        );
        assert_eq!(
            public_err(&read(&public)).to_string(),
            format!("not an ed25519 key (SPKI algorithm is {name}, not Ed25519)")
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever bytes a file holds, in whatever wrapper, reading refuses or
    /// returns a key and never panics.
    #[test]
    fn any_bytes_are_read_or_refused_without_panicking(
        bytes in prop::collection::vec(any::<u8>(), 0..160),
        prefix in prop::bool::ANY,
    ) {
        let mut der = if prefix { PKCS8_PREFIX.to_vec() } else { Vec::new() };
        der.extend_from_slice(&bytes);
        let base64 = STANDARD.encode(&der);
        let texts = [
            format!("-----BEGIN PRIVATE KEY-----\n{base64}\n-----END PRIVATE KEY-----"),
            format!("-----BEGIN PUBLIC KEY-----\n{base64}\n-----END PUBLIC KEY-----"),
            format!("ssh-ed25519 {base64} c"),
            String::from_utf8_lossy(&bytes).into_owned(),
        ];
        for text in &texts {
            let _ = PublicKey::from_text(text);
            let _ = SecretKey::from_text(text);
        }
    }
}
