//! Issue 17 against a real mosquitto: one release for a mixed fleet, compressed and
//! patched transfers, and every way a transfer can be bad (refused with an event
//! naming the reason, the running version untouched).

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use kiln_compiler::commands::keygen::KeygenCommand;
use kiln_compiler::commands::push::PushCommand;
use kiln_protocol::fleet::{
    sha256, Desired, DesiredModule, EventKind, Patch, Scope, SignedDesired, TargetArtifact, Topics,
    DEFAULT_PREFIX,
};
use kiln_protocol::transfer::{self, Codec, Prepared, Transfer};

use crate::fleet::{app, device_at_v1, fresh_serial, retained, wait_online, Watch};
use crate::util::{fleet_id, now_ms, path_str, shared, FleetDevice};
use kiln_e2e::mosquitto::Broker;

const X86: &str = "x86_64-unknown-linux-gnu";

#[test]
fn one_wasm_pushed_to_a_mixed_group_reaches_each_device_as_its_own_artifact_then_as_a_patch() {
    let broker = Broker::start();
    let url = broker.url();
    let mut devices = Vec::new();
    let mut watches = Vec::new();
    for (target, id) in [("x86_64-linux", "mix-x86"), ("aarch64-linux", "mix-arm")] {
        let mut d = FleetDevice::new(target, id, &broker);
        d.groups = vec!["lab".into()];
        d.start(None);
        watches.push(Watch::start(&broker, id));
        devices.push(d);
    }
    for d in &devices {
        wait_online(&url, &d.id);
    }
    let wasm = kiln_e2e::source("sensor_filter.wasm");
    let key = shared().key();
    let push = |version: &str| {
        let args = [
            "push",
            path_str(&wasm),
            "--group",
            "lab",
            "--name",
            "app",
            "--version",
            version,
            "--sign",
            path_str(&key),
            "--broker",
            &url,
            "--health-window-ms",
            "2000",
            "--tick-ms",
            "100",
            "--timeout-ms",
            "20000",
        ];
        PushCommand::try_parse_from(args)
            .unwrap()
            .execute()
            .unwrap_or_else(|e| panic!("kiln {}: {e:#}", args.join(" ")));
    };
    // Compiled here for the two targets the group's devices report.
    push("1");
    for w in &watches {
        w.wait_committed(1, Duration::from_secs(120));
    }
    let topics = Topics::new(DEFAULT_PREFIX);
    let desired = |url: &str| {
        let topic = topics.group_desired("lab");
        let state = retained(url, &topic);
        SignedDesired::peek(&state[&topic])
            .unwrap()
            .modules
            .remove(0)
    };
    let v1 = desired(&url);
    let triples: Vec<&str> = v1.artifacts.iter().map(|a| a.triple.as_str()).collect();
    assert_eq!(triples.len(), 2, "{triples:?}");
    assert!(triples.contains(&X86) && triples.contains(&"aarch64-unknown-linux-gnu"));
    for a in &v1.artifacts {
        assert_eq!(a.full.codec, Codec::Zstd);
        assert!(
            a.full.len * 100 < a.len * 60,
            "compressed to {}/{}",
            a.full.len,
            a.len
        );
    }

    // v2: each device gets a patch from the v1 it runs, nothing else.
    push("2");
    for w in &watches {
        w.wait_committed(2, Duration::from_secs(120));
    }
    let v2 = desired(&url);
    for (w, triple) in watches.iter().zip([X86, "aarch64-unknown-linux-gnu"]) {
        let a = v2.artifacts.iter().find(|a| a.triple == triple).unwrap();
        let before = v1.artifacts.iter().find(|b| b.triple == triple).unwrap();
        assert_eq!(a.patches.len(), 1, "{triple}: one patch, from v1");
        assert_eq!(a.patches[0].base, before.sha256);
        let patch = &a.patches[0].transfer;
        assert!(
            patch.len * 10 < a.len,
            "{triple}: a patch of {} bytes",
            patch.len
        );
        let chunks = patch.len.div_ceil(u64::from(patch.chunk_size)) as u32;
        let events = w.events();
        assert!(
            events.iter().any(|(m, v, k)| m == "app"
                && *v == 2
                && *k
                    == EventKind::Downloading {
                        have: 0,
                        total: chunks
                    }),
            "{triple}: v2 came as the patch's {chunks} chunk(s): {events:#?}"
        );
        assert!(
            !events
                .iter()
                .any(|(_, _, k)| matches!(k, EventKind::FellBack { .. })),
            "{events:#?}"
        );
    }
    devices.iter_mut().for_each(FleetDevice::kill);
}

/// Publishes a transfer's chunk list and chunks, retained, as `kiln push` does.
fn publish(broker: &Broker, p: &Prepared) {
    let topics = Topics::new(DEFAULT_PREFIX);
    let sha = p.transfer.sha256;
    broker.publish_retained(&topics.list(&sha), p.list_message.clone());
    for (n, chunk) in p.chunk_messages() {
        broker.publish_retained(&topics.chunk(&sha, n), chunk);
    }
}

/// Publishes `transfers`, then a desired state for `device` with module `app` at
/// `version` in `artifacts`, signed with the fleet key.
fn offer(
    broker: &Broker,
    device: &str,
    version: u64,
    artifacts: Vec<TargetArtifact>,
    transfers: &[&Prepared],
) {
    for p in transfers {
        publish(broker, p);
    }
    let key = kiln_compiler::keyfile::read_secret(&shared().key()).unwrap();
    let desired = Desired {
        fleet: fleet_id(),
        issued_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        scope: Scope::Device(device.into()),
        serial: fresh_serial(),
        mirrors: Vec::new(),
        modules: vec![DesiredModule {
            name: "app".into(),
            version,
            artifacts,
            config: Vec::new(),
            limits: Default::default(),
            allow_downgrade: false,
            health_window_ms: 1000,
        }],
    };
    let topic = Topics::new(DEFAULT_PREFIX).desired(device);
    broker.publish_retained(&topic, SignedDesired::sign(&desired, &[&key]));
}

/// The x86_64 entry of `bytes` with `stream` as its whole transfer.
fn entry_with_stream(bytes: &[u8], codec: Codec, stream: Vec<u8>) -> (TargetArtifact, Prepared) {
    let p = Prepared::of(codec, stream, 4096);
    let entry = TargetArtifact {
        triple: X86.into(),
        cpu_features: Vec::new(),
        sha256: sha256(bytes),
        len: bytes.len() as u64,
        full: p.transfer.clone(),
        patches: Vec::new(),
    };
    (entry, p)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A zstd frame of `len` zeros that does not declare its size (`declare` false) or
/// declares it.
fn zeros_frame(len: usize, declare: bool) -> Vec<u8> {
    let mut cctx = zstd::zstd_safe::CCtx::create();
    cctx.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(declare))
        .unwrap();
    let zeros = vec![0u8; len];
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(len));
    cctx.compress2(&mut out, &zeros).unwrap();
    out
}

#[test]
fn bad_releases_and_transfers_are_refused_and_the_running_version_untouched() {
    let health = ["--health-window-ms", "1000", "--tick-ms", "100"];
    let id = "dev-xfer";
    let (broker, watch, device) = device_at_v1(id, &health);
    let v1 = read(&app("x86_64-linux", 1, false));
    let refused = |version: u64, what: &str, needle: &str| {
        watch.wait_event(Duration::from_secs(30), what, |(m, v, k)| {
            m == "app"
                && *v == version
                && matches!(k, EventKind::Rejected { reason } if reason.contains(needle))
        });
        watch.wait_running(1, Duration::from_secs(10));
        assert_eq!(
            device.started_versions(),
            [1],
            "{what}: {}",
            device.stderr()
        );
    };

    // A release with no artifact for this device.
    let v2 = read(&app("x86_64-linux", 2, false));
    let (mut riscv, p) = TargetArtifact::whole(&v2, X86, Vec::new(), Codec::Zstd, 4096);
    riscv.triple = "riscv64gc-unknown-linux-gnu".into();
    offer(&broker, id, 2, vec![riscv], &[&p]);
    refused(
        2,
        "no artifact for the device",
        "release app v2 has no artifact for this x86_64",
    );

    // A release whose artifact for this target is signed by a key it does not trust.
    let rogue = shared().dir.path().join("rogue.key");
    if !rogue.exists() {
        // A key of no fleet: the shared fleet's root is in that directory.
        KeygenCommand::try_parse_from(["keygen", "-o", path_str(&rogue), "--no-root"])
            .unwrap()
            .execute()
            .unwrap();
    }
    let foreign = shared().dir.path().join("app-v3-rogue.kiln");
    kiln_e2e::compile(
        &kiln_e2e::source("sensor_filter.wasm"),
        "x86_64-linux",
        &rogue,
        &foreign,
        &["--name", "app", "--version", "3"],
    );
    let (entry, p) = TargetArtifact::whole(&read(&foreign), X86, Vec::new(), Codec::Zstd, 4096);
    offer(&broker, id, 3, vec![entry], &[&p]);
    refused(3, "an untrusted signer", "which is not trusted");

    // A truncated compressed stream, and a corrupt one: their chunks hash as the
    // signed chunk list says, but the stream does not give the signed artifact.
    let v4 = read(&app("x86_64-linux", 4, false));
    let mut stream = transfer::compress(&v4);
    stream.truncate(stream.len() / 2);
    let (entry, p) = entry_with_stream(&v4, Codec::Zstd, stream);
    offer(&broker, id, 4, vec![entry], &[&p]);
    refused(4, "a truncated stream", "the zstd stream");
    let v5 = read(&app("x86_64-linux", 5, false));
    let mut stream = transfer::compress(&v5);
    let middle = stream.len() / 2;
    stream[middle..middle + 64]
        .iter_mut()
        .for_each(|b| *b ^= 0x5a);
    let (entry, p) = entry_with_stream(&v5, Codec::Zstd, stream);
    offer(&broker, id, 5, vec![entry], &[&p]);
    refused(5, "a corrupt stream", "the zstd stream");

    // Decompression bombs: 64 MiB of zeros in 2 KiB, sized or not.
    let v6 = read(&app("x86_64-linux", 6, false));
    let (entry, p) = entry_with_stream(&v6, Codec::Zstd, zeros_frame(64 << 20, false));
    offer(&broker, id, 6, vec![entry], &[&p]);
    refused(
        6,
        "a bomb of undeclared size",
        "the zstd stream: it does not declare its size",
    );
    let v7 = read(&app("x86_64-linux", 7, false));
    let (entry, p) = entry_with_stream(&v7, Codec::Zstd, zeros_frame(64 << 20, true));
    offer(&broker, id, 7, vec![entry], &[&p]);
    refused(
        7,
        "a bomb that declares its size",
        "it declares 67108864 bytes",
    );

    // A patch made from another base than the one it names (the committed v1): here
    // from v8 itself, so nearly every byte it gives comes from the base. The device
    // says why and fetches the whole artifact, which installs.
    let v8 = read(&app("x86_64-linux", 8, false));
    let (mut entry, full) = TargetArtifact::whole(&v8, X86, Vec::new(), Codec::Zstd, 4096);
    let wrong = Transfer::patch(&v8, &v8, 4096);
    entry.patches.push(Patch {
        base: sha256(&v1),
        transfer: wrong.transfer.clone(),
    });
    offer(&broker, id, 8, vec![entry], &[&full, &wrong]);
    watch.wait_event(Duration::from_secs(30), "fell back", |(m, v, k)| {
        m == "app"
            && *v == 8
            && matches!(k, EventKind::FellBack { reason } if reason.contains("the patch from"))
    });
    watch.wait_committed(8, Duration::from_secs(30));
    assert_eq!(device.started_versions(), [1, 8]);
    // The fleet tool saw the event too.
    let rejected: Vec<String> = watch
        .events()
        .into_iter()
        .filter(|(_, v, _)| (2..=7).contains(v))
        .filter_map(|(_, v, k)| match k {
            EventKind::Rejected { reason } => Some(format!("v{v}: {reason}")),
            _ => None,
        })
        .collect();
    assert!(rejected.len() >= 6, "{rejected:#?}");
}
