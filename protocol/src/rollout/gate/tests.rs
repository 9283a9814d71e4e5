use super::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn gate(text: &str) -> Gate {
    text.parse().unwrap()
}

/// `calls` calls of `app` with `traps` traps.
fn calls(calls: u64, traps: u64) -> HealthSummary {
    HealthSummary {
        calls,
        traps,
        ..HealthSummary::new("app")
    }
}

/// A cohort of `app` with one summary per device, named `{prefix}{i}`.
fn cohort(prefix: &str, summaries: &[HealthSummary]) -> Cohort {
    let mut c = Cohort::new("app");
    for (i, s) in summaries.iter().enumerate() {
        c.report(&format!("{prefix}{i}"), s).unwrap();
    }
    c
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

fn none() -> Cohort {
    Cohort::new("app")
}

fn breaches(v: Verdict) -> Vec<Breach> {
    match v {
        Verdict::Breach(b) => b,
        other => panic!("expected a breach, got {other:?}"),
    }
}

#[test]
fn the_examples_parse_and_print_as_written() {
    for text in [
        "traps <= 2x control",
        "restarts <= 1.5x baseline",
        "dropped <= 10",
        "offline <= 20%",
        "temperature.error_rate <= 1.2x control",
        "fuel <= 1.1x control",
        "memory <= 1.3x baseline",
        "traps <= 2x control min 5",
        "sensor_filter.v2.latency-ms <= -0.5",
    ] {
        assert_eq!(gate(text).to_string(), text);
    }
    assert_eq!(
        gate("temperature.error_rate<=1.2x control  min 3"),
        Gate {
            signal: Signal::Metric {
                module: "temperature".into(),
                name: "error_rate".into()
            },
            bound: Bound::Times(1.2, Reference::Control),
            min: 3,
        }
    );
    assert_eq!(
        gate("traps <= 2x control min 1").to_string(),
        "traps <= 2x control"
    );
}

#[test]
fn parse_errors_name_the_text_and_what_is_wrong_on_one_line() {
    for (text, why) in [
        ("", "expected `SIGNAL <= BOUND"),
        ("traps < 2", "expected `SIGNAL <= BOUND"),
        ("crashes <= 2", "unknown signal `crashes`"),
        ("traps <=", "no bound"),
        ("traps <= 2x", "not a number"),
        ("traps <= 2x canary", "`canary` is not a reference"),
        ("traps <= 2 control", "`2` is not a factor"),
        ("traps <= 0x control", "not above 0"),
        ("traps <= NaNx control", "not a number"),
        ("traps <= 1.5", "traps is a count: a whole number"),
        ("offline <= 120%", "not within 0% to 100%"),
        ("fuel <= 5%", "fuel is not a share"),
        ("memory <= -1", "never below 0"),
        ("traps <= 2x control min 0", "minimum sample `0`"),
        ("traps <= 2x control min", "unexpected `min`"),
        ("traps <= 2x control soon", "unexpected `soon`"),
        ("temp.err/rate <= 1", "contains `/`"),
        ("temp. <= 1", "metric name `` is 0 bytes"),
        ("../x.err <= 1", "module name `../x` contains `/`"),
        ("tr\naps <= 2", "expected `SIGNAL <= BOUND"),
    ] {
        let e = Gate::parse(text).unwrap_err();
        let shown = format!("gate `{}`: ", text.escape_debug());
        assert!(e.starts_with(&shown), "{e}");
        assert!(e.contains(why), "{text:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn the_trap_rate_is_traps_per_call_against_the_control() {
    let g = [gate("traps <= 2x control")];
    let control = cohort("c", &[calls(1000, 1), calls(1000, 1)]);
    let twice = cohort("w", &[calls(500, 1), calls(1500, 3)]);
    assert_eq!(judge(&g, &twice, &control, &none()), Verdict::Pass);
    let worse = cohort("w", &[calls(500, 0), calls(1500, 5)]);
    let b = &breaches(judge(&g, &worse, &control, &none()))[0];
    assert_eq!(
        (b.observed, b.reference, b.limit),
        (0.0025, Some(0.001), 0.002)
    );
    assert_eq!(b.devices, ["w1"]);
    assert_eq!((b.sample, b.more), (2, 0));
    assert_eq!(
        b.to_string(),
        "traps <= 2x control: 0.0025 in the wave against 0.001 in the control \
         (limit 0.002) over 2 devices; worst w1"
    );
    // An absolute count is the wave's traps, a share their rate.
    assert_eq!(
        judge(&[gate("traps <= 5")], &worse, &none(), &none()),
        Verdict::Pass
    );
    assert!(matches!(
        judge(&[gate("traps <= 4")], &worse, &none(), &none()),
        Verdict::Breach(_)
    ));
    assert_eq!(
        judge(&[gate("traps <= 0.25%")], &worse, &none(), &none()),
        Verdict::Pass
    );
    assert!(matches!(
        judge(&[gate("traps <= 0.2%")], &worse, &none(), &none()),
        Verdict::Breach(_)
    ));
}

#[test]
fn restarts_are_per_call_and_a_trap_or_restart_ends_a_call() {
    // A module that traps in its first call, before it counts one, is not unseen.
    let starts = HealthSummary {
        traps: 3,
        restarts: 3,
        ..HealthSummary::new("app")
    };
    let wave = cohort("w", &[starts]);
    let b = &breaches(judge(&[gate("restarts <= 50%")], &wave, &none(), &none()))[0];
    assert_eq!(b.observed, 100.0);
    let fine = HealthSummary {
        calls: 100,
        restarts: 1,
        ..HealthSummary::new("app")
    };
    let baseline = cohort("w", std::slice::from_ref(&fine));
    let g = [gate("restarts <= 1.5x baseline")];
    assert_eq!(
        judge(&g, &cohort("w", &[fine]), &none(), &baseline),
        Verdict::Pass
    );
    let b = &breaches(judge(&g, &wave, &none(), &baseline))[0];
    assert_eq!((b.observed, b.reference), (1.0, Some(0.01)));
}

#[test]
fn dropped_is_the_share_of_the_records_lost_or_their_count() {
    let s = |sent, dropped| HealthSummary {
        records_sent: sent,
        records_dropped: dropped,
        ..HealthSummary::new("app")
    };
    let wave = cohort("w", &[s(90, 10), s(100, 0), s(0, 0)]);
    assert_eq!(
        judge(&[gate("dropped <= 10")], &wave, &none(), &none()),
        Verdict::Pass
    );
    let b = &breaches(judge(&[gate("dropped <= 4%")], &wave, &none(), &none()))[0];
    assert_eq!(
        (b.observed, b.sample),
        (5.0, 2),
        "a device with no records is no sample"
    );
    assert_eq!(b.devices, ["w0"]);
}

#[test]
fn fuel_is_per_call_against_the_baseline() {
    let s = |calls, fuel| HealthSummary {
        calls,
        fuel_used: fuel,
        ..HealthSummary::new("app")
    };
    let baseline = cohort("d", &[s(100, 10_000), s(100, 10_000)]);
    let g = [gate("fuel <= 1.1x baseline")];
    let same = cohort("d", &[s(50, 5_000), s(200, 21_000)]);
    assert_eq!(judge(&g, &same, &none(), &baseline), Verdict::Pass);
    let hungry = cohort("d", &[s(100, 12_000), s(100, 11_000)]);
    let b = &breaches(judge(&g, &hungry, &none(), &baseline))[0];
    assert_eq!((b.observed, b.reference), (115.0, Some(100.0)));
    assert_eq!(b.devices, ["d0"], "d1 alone is within 110 per call");
    assert_eq!(
        judge(&[gate("fuel <= 120")], &hungry, &none(), &none()),
        Verdict::Pass
    );
}

#[test]
fn memory_is_the_mean_of_the_devices_peaks() {
    let s = |peak| HealthSummary {
        peak_memory_bytes: peak,
        ..HealthSummary::new("app")
    };
    let control = cohort("c", &[s(1000), s(3000), s(0)]);
    let wave = cohort("w", &[s(2000), s(2600)]);
    let g = [gate("memory <= 1.3x control")];
    assert_eq!(judge(&g, &wave, &control, &none()), Verdict::Pass);
    let wave = cohort("w", &[s(2000), s(3400)]);
    let b = &breaches(judge(&g, &wave, &control, &none()))[0];
    assert_eq!((b.observed, b.reference), (2700.0, Some(2000.0)));
    assert!(close(b.limit, 2600.0), "{b:?}");
    assert_eq!(b.devices, ["w1"]);
    assert_eq!(
        judge(&[gate("memory <= 2700")], &wave, &none(), &none()),
        Verdict::Pass
    );
}

#[test]
fn offline_is_the_share_of_silent_devices_and_names_them() {
    let mut wave = cohort("w", &[calls(1, 0), calls(1, 0), calls(1, 0)]);
    wave.offline("w9").unwrap();
    assert_eq!(
        judge(&[gate("offline <= 25%")], &wave, &none(), &none()),
        Verdict::Pass
    );
    wave.offline("w8").unwrap();
    let b = &breaches(judge(&[gate("offline <= 25%")], &wave, &none(), &none()))[0];
    assert_eq!((b.observed, b.sample), (40.0, 5));
    assert_eq!(b.devices, ["w8", "w9"]);
    assert!(matches!(
        judge(&[gate("offline <= 1")], &wave, &none(), &none()),
        Verdict::Breach(_)
    ));
    // A device that reports is not offline.
    wave.report("w8", &calls(1, 0)).unwrap();
    wave.offline("w0").unwrap();
    assert_eq!(wave.offline_devices().iter().collect::<Vec<_>>(), ["w9"]);
    assert_eq!(
        judge(&[gate("offline <= 1")], &wave, &none(), &none()),
        Verdict::Pass
    );
}

#[test]
fn a_metric_is_the_mean_of_any_modules_readings() {
    let s = |module: &str, readings: &[f64]| HealthSummary {
        metrics: [("error_rate".to_string(), Sketch::of(readings))].into(),
        ..HealthSummary::new(module)
    };
    let mut control = Cohort::new("app");
    control
        .report("c0", &s("temperature", &[1.0, 2.0, 3.0]))
        .unwrap();
    // The same metric name of another module is another signal.
    control.report("c0", &s("app", &[100.0])).unwrap();
    let g = [gate("temperature.error_rate <= 1.2x control")];
    let mut wave = Cohort::new("app");
    wave.report("w0", &s("temperature", &[2.0, 2.4])).unwrap();
    assert_eq!(judge(&g, &wave, &control, &none()), Verdict::Pass);
    wave.report("w1", &s("temperature", &[2.8, 2.8])).unwrap();
    let b = &breaches(judge(&g, &wave, &control, &none()))[0];
    assert_eq!((b.reference, b.limit, b.sample), (Some(2.0), 2.4, 2));
    assert!(close(b.observed, 2.5) && b.devices == ["w1"], "{b:?}");
    // A device without the metric is no sample: the gate waits for one.
    let silent = cohort("w", &[calls(10, 0)]);
    assert_eq!(judge(&g, &silent, &control, &none()), Verdict::Wait);
}

#[test]
fn a_negative_reference_allows_its_magnitude_times_the_factor_less_one_above_it() {
    // Ten readings each: one reading's worth (a tenth of the magnitude) is below it.
    let s = |x: f64| HealthSummary {
        metrics: [("drift".to_string(), Sketch::of(&[x; 10]))].into(),
        ..HealthSummary::new("app")
    };
    let control = cohort("c", &[s(-10.0)]);
    let g = [gate("app.drift <= 1.2x control")];
    assert_eq!(
        judge(&g, &cohort("w", &[s(-11.0)]), &control, &none()),
        Verdict::Pass
    );
    assert_eq!(
        judge(&g, &cohort("w", &[s(-8.0)]), &control, &none()),
        Verdict::Pass
    );
    let b = &breaches(judge(&g, &cohort("w", &[s(-7.5)]), &control, &none()))[0];
    assert!(close(b.limit, -8.0), "{b:?}");
}

#[test]
fn a_reference_of_zero_allows_one_events_worth_times_the_factor() {
    let g = [gate("traps <= 2x control")];
    let control = cohort("c", &[calls(10_000, 0)]);
    for (traps, breach) in [(0, false), (1, false), (2, false), (3, true)] {
        let wave = cohort("w", &[calls(1000, traps)]);
        let v = judge(&g, &wave, &control, &none());
        assert_eq!(matches!(v, Verdict::Breach(_)), breach, "{traps}: {v:?}");
    }
    // A reference with data but no events, and a wave with none either: nothing
    // divides by zero.
    let idle = cohort("w", &[HealthSummary::new("app")]);
    let g = [
        gate("app.lat <= 1.5x control"),
        gate("fuel <= 1.5x control"),
    ];
    assert_eq!(judge(&g, &idle, &idle, &none()), Verdict::Wait);
    // Metric readings of zero in the control: one reading at the wave's largest
    // magnitude is one event.
    let m = |xs: &[f64]| HealthSummary {
        metrics: [("lat".to_string(), Sketch::of(xs))].into(),
        ..HealthSummary::new("app")
    };
    let zero = cohort("c", &[m(&[0.0, 0.0])]);
    let g = [gate("app.lat <= 2x control")];
    let one = cohort("w", &[m(&[0.0, 0.0, 0.0, 7.0])]);
    assert_eq!(judge(&g, &one, &zero, &none()), Verdict::Pass);
    let three = cohort("w", &[m(&[0.0, 7.0, 7.0, 7.0])]);
    assert!(matches!(
        judge(&g, &three, &zero, &none()),
        Verdict::Breach(_)
    ));
}

#[test]
fn a_small_sample_waits_and_a_breach_wins_over_a_wait() {
    let control = cohort("c", &[calls(1000, 1), calls(1000, 1)]);
    let wave = cohort("w", &[calls(1000, 50)]);
    let g = gate("traps <= 2x control min 2");
    assert_eq!(
        judge(std::slice::from_ref(&g), &wave, &control, &none()),
        Verdict::Wait
    );
    // The reference's sample counts too: the last wave has no control left.
    let wave2 = cohort("w", &[calls(1000, 50), calls(1000, 50)]);
    assert_eq!(
        judge(std::slice::from_ref(&g), &wave2, &none(), &none()),
        Verdict::Wait
    );
    assert!(matches!(
        judge(std::slice::from_ref(&g), &wave2, &control, &none()),
        Verdict::Breach(_)
    ));
    let b = breaches(judge(
        &[g, gate("traps <= 10"), gate("offline <= 0")],
        &wave,
        &control,
        &none(),
    ));
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].gate, gate("traps <= 10"));
    assert_eq!(judge(&[], &wave, &control, &none()), Verdict::Pass);
}

#[test]
fn a_breach_names_at_most_a_few_devices_worst_first_and_counts_the_rest() {
    let wave = cohort("w", &(0..20).map(|i| calls(100, i)).collect::<Vec<_>>());
    let b = &breaches(judge(&[gate("traps <= 5%")], &wave, &none(), &none()))[0];
    assert_eq!(b.devices.len(), MAX_BLAMED);
    assert_eq!(&b.devices[..3], ["w19", "w18", "w17"]);
    assert_eq!(
        b.more,
        14 - MAX_BLAMED as u32,
        "w6 to w19 are over 5% on their own"
    );
    let line = b.to_string();
    assert!(
        line.starts_with("traps <= 5%: 9.5 in the wave (limit 5) over 20 devices; worst w19"),
        "{line}"
    );
    assert!(line.ends_with("w15 and 9 more"), "{line}");
    // None over the limit on its own: those that had any.
    let wave = cohort("w", &[calls(10, 1), calls(10, 0), calls(10, 1)]);
    let b = &breaches(judge(&[gate("traps <= 1")], &wave, &none(), &none()))[0];
    assert_eq!(
        (b.devices.as_slice(), b.more),
        (&["w0".to_string(), "w2".into()][..], 0)
    );
}

#[test]
fn summaries_merge_by_adding_and_keeping_the_peak() {
    let mut a = HealthSummary {
        calls: 10,
        traps: 1,
        restarts: 1,
        records_sent: 5,
        records_dropped: 1,
        fuel_used: 100,
        peak_memory_bytes: 4096,
        metrics: [("lat".to_string(), Sketch::of(&[1.0, 5.0]))].into(),
        ..HealthSummary::new("app")
    };
    let b = HealthSummary {
        calls: u64::MAX,
        peak_memory_bytes: 1024,
        metrics: [
            ("lat".to_string(), Sketch::of(&[-1.0])),
            ("err".to_string(), Sketch::of(&[0.5])),
        ]
        .into(),
        ..HealthSummary::new("other")
    };
    a.merge(&b);
    assert_eq!(a.module, "app");
    assert_eq!((a.calls, a.traps, a.peak_memory_bytes), (u64::MAX, 1, 4096));
    assert_eq!(a.metrics["lat"], Sketch::of(&[1.0, 5.0, -1.0]));
    assert_eq!(a.metrics["lat"].mean(), Some(5.0 / 3.0));
    assert_eq!(a.metrics["err"].count, 1);
    assert_eq!(Sketch::default().mean(), None);
}

/// The largest summary a device may send (also the health message's tests').
pub(crate) fn largest_of(module: &str) -> HealthSummary {
    let name = |i: usize| format!("{i}{}", "m".repeat(MAX_METRIC_NAME - 1));
    let sketch = Sketch {
        count: u64::MAX,
        sum: -MAX_VALUE,
        min: -MAX_VALUE,
        max: MAX_VALUE,
    };
    HealthSummary {
        module: module.into(),
        calls: u64::MAX,
        traps: u64::MAX,
        restarts: u64::MAX,
        records_sent: u64::MAX,
        records_dropped: u64::MAX,
        fuel_used: u64::MAX,
        peak_memory_bytes: u64::MAX,
        metrics: (0..MAX_METRICS).map(|i| (name(i), sketch)).collect(),
    }
}

fn largest() -> HealthSummary {
    largest_of(&"m".repeat(names::MAX_NAME))
}

#[test]
fn a_valid_summary_is_small_and_survives_postcard() {
    let s = largest();
    assert_eq!(s.validate(), Ok(()));
    let bytes = postcard::to_stdvec(&s).unwrap();
    assert!(bytes.len() <= MAX_SUMMARY, "{} bytes", bytes.len());
    assert_eq!(postcard::from_bytes::<HealthSummary>(&bytes).unwrap(), s);
}

#[test]
fn validate_refuses_what_would_make_a_summary_large_or_meaningless() {
    let bad = |f: &dyn Fn(&mut HealthSummary), why: &str| {
        let mut s = largest();
        f(&mut s);
        let e = s.validate().unwrap_err();
        assert!(e.contains(why), "{e}");
        assert!(!e.contains('\n'), "{e}");
    };
    bad(
        &|s| s.module = "a/b".into(),
        "module name `a/b` contains `/`",
    );
    bad(&|s| s.module.push('m'), "at most 64");
    bad(
        &|s| {
            s.metrics.insert("extra".into(), Sketch::of(&[1.0]));
        },
        "9 metrics (at most 8)",
    );
    fn metric(name: &str, sketch: Sketch) -> impl Fn(&mut HealthSummary) + '_ {
        move |s| {
            s.metrics.pop_first();
            s.metrics.insert(name.into(), sketch);
        }
    }
    bad(&metric("a.b", Sketch::of(&[1.0])), "contains `.`");
    bad(
        &metric(&"x".repeat(33), Sketch::of(&[1.0])),
        "33 bytes long",
    );
    bad(
        &metric("nan", Sketch::of(&[f64::NAN])),
        "not a finite number",
    );
    bad(&metric("big", Sketch::of(&[2e15])), "beyond");
    let upside = Sketch {
        count: 2,
        sum: 0.0,
        min: 1.0,
        max: -1.0,
    };
    bad(&metric("upside", upside), "least 1 above its greatest -1");
    let empty = Sketch {
        sum: 1.0,
        ..Sketch::default()
    };
    bad(&metric("empty", empty), "no readings");
}

#[test]
fn a_cohort_takes_only_valid_devices_and_summaries_within_its_bounds() {
    let mut c = Cohort::new("app");
    assert!(c
        .report("a/b", &calls(1, 0))
        .unwrap_err()
        .contains("device name"));
    assert!(c.offline("+").is_err());
    let e = c.report("d0", &HealthSummary::new("")).unwrap_err();
    assert_eq!(e, "d0: module name is empty");
    c.report("d0", &calls(5, 1)).unwrap();
    c.report("d0", &calls(5, 1)).unwrap();
    for i in 1..MAX_MODULES {
        c.report("d0", &HealthSummary::new(&format!("m{i}")))
            .unwrap();
    }
    let e = c.report("d0", &HealthSummary::new("one-more")).unwrap_err();
    assert_eq!(e, "d0 reported more than 64 modules");
    assert_eq!(c.summary("d0", "app"), Some(&calls(10, 2)));
    c.report("d1", &calls(1, 1)).unwrap();
    assert_eq!((c.reporting(), c.total("app").traps), (2, 3));
}

#[test]
fn the_issues_three_releases_doubled_traps_and_a_raised_metric_halt_and_the_good_one_passes() {
    // 90 devices not updated, each trapping about once per 500 calls and reporting a
    // metric near 10; a wave of 10.
    let device = |i: u64, traps: u64, metric: f64| HealthSummary {
        calls: 1000,
        traps,
        metrics: [(
            "err".to_string(),
            Sketch::of(&[metric, metric + (i % 3) as f64]),
        )]
        .into(),
        ..HealthSummary::new("app")
    };
    let old = |i: u64| device(i, 1 + i % 3, 10.0);
    let control = cohort("c", &(0..90).map(old).collect::<Vec<_>>());
    let baseline = cohort("w", &(0..10).map(old).collect::<Vec<_>>());
    let gates = [
        gate("traps <= 1.5x control min 5"),
        gate("app.err <= 1.2x baseline min 5"),
    ];
    let good = cohort("w", &(0..10).map(old).collect::<Vec<_>>());
    assert_eq!(judge(&gates, &good, &control, &baseline), Verdict::Pass);
    let traps = cohort(
        "w",
        &(0..10)
            .map(|i| device(i, 2 * (1 + i % 3), 10.0))
            .collect::<Vec<_>>(),
    );
    let b = breaches(judge(&gates, &traps, &control, &baseline));
    assert_eq!(b.iter().map(|b| &b.gate).collect::<Vec<_>>(), [&gates[0]]);
    let metric = cohort(
        "w",
        &(0..10)
            .map(|i| device(i, 1 + i % 3, 13.0))
            .collect::<Vec<_>>(),
    );
    let b = breaches(judge(&gates, &metric, &control, &baseline));
    assert_eq!(b.iter().map(|b| &b.gate).collect::<Vec<_>>(), [&gates[1]]);
    let few = cohort("w", &(0..4).map(|i| device(i, 9, 13.0)).collect::<Vec<_>>());
    assert_eq!(judge(&gates, &few, &control, &baseline), Verdict::Wait);
}

// The model: per-device counts in small integers, judged by an oracle in exact
// fractions, written apart from the code under test.

#[derive(Debug, Clone)]
struct Dev {
    calls: u64,
    traps: u64,
    restarts: u64,
    sent: u64,
    dropped: u64,
    fuel: u64,
    peak: u64,
    readings: Vec<i64>,
    offline: bool,
}

fn dev() -> impl Strategy<Value = Dev> {
    let counts = (0u64..40, 0u64..5, 0u64..3, 0u64..20, 0u64..4);
    let rest = (
        0u64..400,
        prop_oneof![Just(0u64), 1u64..6],
        vec(-20i64..=20, 0..4),
        prop::bool::weighted(0.15),
    );
    (counts, rest).prop_map(
        |((calls, traps, restarts, sent, dropped), (fuel, peak, readings, offline))| Dev {
            calls,
            traps,
            restarts,
            sent,
            dropped,
            fuel,
            peak,
            readings,
            offline,
        },
    )
}

fn model_cohort(prefix: &str, devs: &[Dev]) -> Cohort {
    let mut c = Cohort::new("app");
    for (i, d) in devs.iter().enumerate() {
        let name = format!("{prefix}{i}");
        if d.offline {
            c.offline(&name).unwrap();
            continue;
        }
        let mut s = HealthSummary {
            calls: d.calls,
            traps: d.traps,
            restarts: d.restarts,
            records_sent: d.sent,
            records_dropped: d.dropped,
            fuel_used: d.fuel,
            peak_memory_bytes: d.peak,
            ..HealthSummary::new("app")
        };
        if !d.readings.is_empty() {
            let xs: Vec<f64> = d.readings.iter().map(|&x| x as f64).collect();
            s.metrics.insert("lat".into(), Sketch::of(&xs));
        }
        c.report(&name, &s).unwrap();
    }
    c
}

/// A fraction, `n / d` with `d > 0`.
#[derive(Debug, Clone, Copy)]
struct Q(i128, i128);

impl Q {
    fn int(n: i128) -> Q {
        Q(n, 1)
    }
    fn mul(self, o: Q) -> Q {
        Q(self.0 * o.0, self.1 * o.1)
    }
    fn add(self, o: Q) -> Q {
        Q(self.0 * o.1 + o.0 * self.1, self.1 * o.1)
    }
    fn gt(self, o: Q) -> bool {
        self.0 * o.1 > o.0 * self.1
    }
    fn max(self, o: Q) -> Q {
        if o.gt(self) {
            o
        } else {
            self
        }
    }
    fn abs(self) -> Q {
        Q(self.0.abs(), self.1)
    }
}

/// A gate of the model: the signal and the bound in integers (a factor in tenths).
#[derive(Debug, Clone)]
enum MBound {
    At(i64),
    Percent(i64),
    Tenths(i64, Reference),
}

fn model_gate() -> impl Strategy<Value = (Signal, MBound, u32)> {
    let signal = prop_oneof![
        Just(Signal::Traps),
        Just(Signal::Restarts),
        Just(Signal::Dropped),
        Just(Signal::Fuel),
        Just(Signal::Memory),
        Just(Signal::Offline),
        Just(Signal::Metric {
            module: "app".into(),
            name: "lat".into()
        }),
    ];
    let reference = prop_oneof![Just(Reference::Control), Just(Reference::Baseline)];
    let bound = prop_oneof![
        (0i64..12).prop_map(MBound::At),
        (0i64..=60).prop_map(MBound::Percent),
        (1i64..=30, reference).prop_map(|(k, r)| MBound::Tenths(k, r)),
    ];
    (signal, bound, 1u32..5).prop_filter_map("no share of a value", |(s, b, min)| {
        let b = match b {
            MBound::At(n) if matches!(s, Signal::Metric { .. }) => MBound::At(n - 6),
            MBound::Percent(_) if !s.counts() => return None,
            b => b,
        };
        Some((s, b, min))
    })
}

fn to_gate(signal: &Signal, bound: &MBound, min: u32) -> Gate {
    let bound = match *bound {
        MBound::At(n) => Bound::At(n as f64),
        MBound::Percent(p) => Bound::Percent(p as f64),
        MBound::Tenths(k, r) => Bound::Times(k as f64 / 10.0, r),
    };
    Gate {
        signal: signal.clone(),
        bound,
        min,
    }
}

/// Per device with data: (numerator, denominator, one event).
fn model_parts(signal: &Signal, devs: &[Dev]) -> Vec<(i128, i128, i128)> {
    let mut parts = Vec::new();
    for d in devs {
        if *signal == Signal::Offline {
            parts.push((d.offline as i128, 1, 1));
            continue;
        }
        if d.offline {
            continue;
        }
        let (c, t, r) = (d.calls as i128, d.traps as i128, d.restarts as i128);
        let part = match signal {
            Signal::Traps => (t, c.max(t), 1),
            Signal::Restarts => (r, c.max(r), 1),
            Signal::Dropped => (d.dropped as i128, (d.sent + d.dropped) as i128, 1),
            Signal::Fuel => (d.fuel as i128, c, 1),
            Signal::Memory => (d.peak as i128, (d.peak > 0) as i128, 1),
            _ => {
                let sum: i64 = d.readings.iter().sum();
                let unit = d.readings.iter().map(|x| x.abs()).max().unwrap_or(0);
                (sum as i128, d.readings.len() as i128, unit as i128)
            }
        };
        if part.1 > 0 {
            parts.push(part);
        }
    }
    parts
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Pass,
    Wait,
    Breach,
}

/// What the issue asks of one gate: wait below the minimum sample, else breach
/// exactly when the signal is above its bound.
fn oracle(signal: &Signal, bound: &MBound, min: u32, cohorts: [&[Dev]; 3]) -> Expect {
    let sums = |devs: &[Dev]| {
        let parts = model_parts(signal, devs);
        let (n, d) = parts.iter().fold((0, 0), |(n, d), p| (n + p.0, d + p.1));
        let unit = parts.iter().map(|p| p.2).max().unwrap_or(0);
        (n, d, unit, parts.len() as u32)
    };
    let (n, d, unit, sample) = sums(cohorts[0]);
    let value = |n: i128, d: i128| if d > 0 { Q(n, d) } else { Q::int(0) };
    let (observed, limit, sample) = match *bound {
        MBound::At(k) if signal.counts() => (Q::int(n), Q::int(k.into()), sample),
        MBound::At(k) => (value(n, d), Q::int(k.into()), sample),
        MBound::Percent(p) => (value(100 * n, d), Q::int(p.into()), sample),
        MBound::Tenths(k, which) => {
            let reference = match which {
                Reference::Control => cohorts[1],
                Reference::Baseline => cohorts[2],
            };
            let (rn, rd, _, rsample) = sums(reference);
            if sample.min(rsample) < min {
                return Expect::Wait;
            }
            let (r, x, floor) = (value(rn, rd), Q(k.into(), 10), Q(unit, d));
            let limit = if r.0 >= 0 {
                x.mul(r.max(floor))
            } else {
                r.add(x.add(Q::int(-1)).mul(r.abs().max(floor)))
            };
            (value(n, d), limit, sample.min(rsample))
        }
    };
    if sample < min {
        Expect::Wait
    } else if observed.gt(limit) {
        Expect::Breach
    } else {
        Expect::Pass
    }
}

fn any_gate() -> impl Strategy<Value = Gate> {
    let metric = ("[a-zA-Z0-9][a-zA-Z0-9._-]{0,12}", "[a-zA-Z0-9_-]{1,12}")
        .prop_map(|(module, name)| Signal::Metric { module, name });
    let signal = prop_oneof![
        Just(Signal::Traps),
        Just(Signal::Restarts),
        Just(Signal::Dropped),
        Just(Signal::Fuel),
        Just(Signal::Memory),
        Just(Signal::Offline),
        metric,
    ];
    let finite = any::<f64>().prop_filter("finite", |x| x.is_finite());
    let reference = prop_oneof![Just(Reference::Control), Just(Reference::Baseline)];
    let bound = prop_oneof![
        finite.clone().prop_map(Bound::At),
        (0.0f64..=100.0).prop_map(Bound::Percent),
        (finite, reference).prop_map(|(x, r)| Bound::Times(x.abs().max(f64::MIN_POSITIVE), r)),
    ];
    (signal, bound, 1u32..1000).prop_map(|(signal, bound, min)| {
        let bound = match bound {
            Bound::At(n) if signal.counts() => Bound::At(n.abs().trunc()),
            Bound::At(n) if !matches!(signal, Signal::Metric { .. }) => Bound::At(n.abs()),
            Bound::Percent(_) if !signal.counts() => Bound::At(0.5),
            b => b,
        };
        Gate { signal, bound, min }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Whatever a gate is, its text reads back as it.
    #[test]
    fn display_and_parse_round_trip(g in any_gate()) {
        let text = g.to_string();
        prop_assert_eq!(Gate::parse(&text), Ok(g), "{}", text);
    }

    /// No text makes the parser panic, and every error is one line naming the text.
    #[test]
    fn any_text_parses_or_fails_on_one_line(text in "[a-z.0-9 <=%x\n-]{0,30}") {
        if let Err(e) = Gate::parse(&text) {
            prop_assert!(!e.contains('\n'));
            prop_assert!(e.starts_with("gate `"), "{}", e);
        }
    }

    /// A merge of sketches is the sketch of all their readings.
    #[test]
    fn sketches_merge_as_their_readings(a in vec(-1e6f64..1e6, 0..8), b in vec(-1e6f64..1e6, 0..8)) {
        let mut s = Sketch::of(&a);
        s.merge(&Sketch::of(&b));
        let all = Sketch::of(&[a, b].concat());
        prop_assert_eq!((s.count, s.min, s.max), (all.count, all.min, all.max));
        prop_assert!((s.sum - all.sum).abs() <= 1e-6);
        prop_assert_eq!(s.validate(), Ok(()));
    }

    /// The laws of issue 36: no breach unless a gate's signal is above its bound over
    /// at least its minimum sample; always a breach when one is (naming exactly those
    /// gates, and devices of the wave); a wait exactly when no gate breaches and one
    /// has fewer devices than its minimum.
    #[test]
    fn judge_breaches_exactly_when_a_gate_is_passed_over_its_sample(
        wave in vec(dev(), 0..10),
        control in vec(dev(), 0..10),
        baseline in vec(dev(), 0..10),
        model in vec(model_gate(), 0..4),
    ) {
        let gates: Vec<Gate> = model.iter().map(|(s, b, m)| to_gate(s, b, *m)).collect();
        let expect: Vec<Expect> = model
            .iter()
            .map(|(s, b, m)| oracle(s, b, *m, [&wave, &control, &baseline]))
            .collect();
        let (w, c) = (model_cohort("w", &wave), model_cohort("c", &control));
        let verdict = judge(&gates, &w, &c, &model_cohort("w", &baseline));
        let breached: Vec<&Gate> = gates
            .iter()
            .zip(&expect)
            .filter(|(_, e)| **e == Expect::Breach)
            .map(|(g, _)| g)
            .collect();
        match verdict {
            Verdict::Breach(bs) => {
                prop_assert_eq!(bs.iter().map(|b| &b.gate).collect::<Vec<_>>(), breached);
                for b in &bs {
                    prop_assert!(!b.devices.is_empty() && b.devices.len() <= MAX_BLAMED);
                    for d in &b.devices {
                        let i: usize = d[1..].parse().unwrap();
                        prop_assert!(d.starts_with('w') && i < wave.len(), "{}", d);
                    }
                    prop_assert!(b.sample >= b.gate.min);
                }
            }
            Verdict::Wait => {
                prop_assert!(breached.is_empty());
                prop_assert!(expect.contains(&Expect::Wait), "{:?}", expect);
            }
            Verdict::Pass => {
                prop_assert!(expect.iter().all(|e| *e == Expect::Pass), "{:?}", expect);
            }
        }
    }
}

#[test]
fn a_reading_shows_each_cohort_in_the_bounds_terms_with_the_gates_own_verdict() {
    let control = cohort("c", &[calls(1000, 1), calls(1000, 1)]);
    let baseline = cohort("b", &[calls(2000, 0)]);
    let worse = cohort("w", &[calls(500, 0), calls(1500, 5)]);
    // Relative: rates, the limit twice the control's, the sample the fewer devices.
    let r = read(&gate("traps <= 2x control"), &worse, &control, &baseline);
    let level = |l: Level| (l.value, l.sample);
    assert_eq!(
        [level(r.wave), level(r.control), level(r.baseline)],
        [(0.0025, 2), (0.001, 2), (0.0, 1)]
    );
    assert_eq!((r.limit, r.sample), (0.002, 2));
    assert_eq!(
        r.verdict,
        judge(&[gate("traps <= 2x control")], &worse, &control, &baseline)
    );
    // Against a baseline of none: one trap's worth of the wave, twice; short of 3.
    let r = read(
        &gate("traps <= 2x baseline min 3"),
        &worse,
        &control,
        &baseline,
    );
    assert!(close(r.limit, 2.0 / 2000.0), "{}", r.limit);
    assert_eq!((r.sample, r.verdict), (1, Verdict::Wait));
    // Absolute: counts, and shares as percentages, for every cohort alike.
    let r = read(&gate("traps <= 5"), &worse, &control, &baseline);
    assert_eq!((r.wave.value, r.control.value, r.limit), (5.0, 2.0, 5.0));
    assert_eq!(r.verdict, Verdict::Pass);
    let r = read(&gate("traps <= 0.2%"), &worse, &control, &baseline);
    assert!(close(r.wave.value, 0.25) && close(r.control.value, 0.1));
    assert_eq!(r.limit, 0.2);
    assert!(matches!(r.verdict, Verdict::Breach(ref b) if b.len() == 1));
}

#[test]
fn a_breach_line_shows_four_significant_digits() {
    let cases = [
        (0.005154639175257732, "0.005155"),
        (0.001288659793814433, "0.001289"),
        (128.93, "128.9"),
        (100.0, "100"),
        (0.0025, "0.0025"),
        (9.5, "9.5"),
        (1048576.0, "1048576"),
        (-12.345, "-12.35"),
        (0.0, "0"),
    ];
    for (value, text) in cases {
        assert_eq!(super::shown(value), text, "{value}");
    }
}
