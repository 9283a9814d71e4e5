//! The book (`docs/src/`, built by `mdbook build docs`) and the README, checked without a
//! network: every relative link and `#anchor` resolves, every page is in `SUMMARY.md`,
//! and each `kiln`/`kilnd` subcommand's page names exactly the flags its `--help` lists
//! (read from the same clap definitions the binaries parse).
//!
//! Run with `cargo test -p kiln-dist --test book`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use clap::CommandFactory;

/// Which page documents each visible subcommand. A new subcommand fails the test until
/// it is given a page here and documented there.
const PAGES: &[(&str, &str)] = &[
    ("kiln keygen", "trust.md"),
    ("kiln compile", "usage.md"),
    ("kiln inspect", "usage.md"),
    ("kiln targets", "targets.md"),
    ("kiln conformance", "conformance.md"),
    ("kiln release", "fleet.md"),
    ("kiln push", "fleet.md"),
    ("kiln remove", "fleet.md"),
    ("kiln decommission", "fleet.md"),
    ("kiln devices", "fleet.md"),
    ("kiln gc", "fleet.md"),
    ("kiln watch", "telemetry.md"),
    ("kiln dashboard", "dashboard.md"),
    ("kiln rollout", "rollouts.md"),
    ("kiln rollout status", "rollouts.md"),
    ("kiln rollout pause", "rollouts.md"),
    ("kiln rollout resume", "rollouts.md"),
    ("kiln rollout retry", "rollouts.md"),
    ("kiln rollout abort", "rollouts.md"),
    ("kiln tag", "rollouts.md"),
    ("kiln send", "commands.md"),
    ("kiln root", "trust.md"),
    ("kiln root show", "trust.md"),
    ("kiln root rotate", "trust.md"),
    ("kiln root publish", "trust.md"),
    ("kiln sign", "trust.md"),
    ("kiln enroll", "trust.md"),
    ("kiln refresh", "trust.md"),
    ("kiln acl", "brokers.md"),
    ("kiln completions", "setup.md"),
    ("kilnd run", "usage.md"),
    ("kilnd serve", "serve.md"),
    ("kilnd check", "install.md"),
    ("kiln provision", "provisioning.md"),
    ("kilnd provision", "provisioning.md"),
];

/// The page that documents the broker flags every fleet command shares (the flags
/// common to all commands that take `--broker`), once for all of them.
const SHARED_FLAGS_PAGE: &str = "fleet.md";

/// Flags of other tools that pages name outside a `kiln`/`kilnd` command line, each with
/// whose it is. Inside a `kiln`/`kilnd` command line every flag must be the command's.
const OTHER_TOOLS: &[(&str, &str)] = &[
    (
        "--no-default-features",
        "cargo: the lean and no-TLS kilnd builds",
    ),
    ("--features", "cargo"),
    ("--release", "cargo"),
    ("--locked", "cargo"),
    ("--profile", "cargo install: the host profile"),
    ("--path", "cargo install"),
    ("--target-dir", "cargo"),
    ("--manifest-path", "cargo"),
    ("--lib", "cargo test"),
    ("--test", "cargo test"),
    ("--check", "cargo fmt"),
    (
        "--patch-from",
        "zstd's command line, which kiln's patches follow",
    ),
    ("--ultra", "zstd's command line, measured against"),
    ("--long", "zstd's command line, measured against"),
    ("--dynamic", "scripts/kilnd-build.sh: the lean kilnd"),
    ("--only", "scripts/bench.sh"),
    ("--runs", "scripts/bench.sh"),
    ("--targets", "scripts/bench.sh, scripts/package.sh"),
    ("--module-mb", "scripts/bench.sh"),
    ("--no-page", "scripts/bench.sh"),
    ("--mirror", "scripts/fleet-scale.sh"),
    ("--minutes", "scripts/soak.sh"),
    ("--short", "scripts/board.sh"),
    ("--arch", "scripts/board.sh"),
    ("--cuts", "scripts/board.sh"),
    ("--image-only", "scripts/board.sh"),
    ("--architectures", "mmdebstrap: the board image"),
    ("--seed", "scripts/soak.sh, scripts/board.sh"),
    ("--plan", "the soak binary"),
    ("--no-build", "scripts/soak.sh, scripts/board.sh"),
    ("--seconds", "scripts/fuzz.sh"),
    ("--build", "scripts/wasi-testsuite.sh"),
    ("--devices", "scripts/soak.sh, scripts/fleet-scale.sh"),
    ("--brokers", "scripts/fleet-scale.sh"),
    ("--telemetry-ms", "scripts/fleet-scale.sh, kilnd-sim"),
    ("--model", "kilnd-sim: a module's behaviour per version"),
    (
        "--crash",
        "kilnd-sim: the share of devices whose worker crashes on a version",
    ),
    ("--calls-per-s", "kilnd-sim: the module model's call rate"),
    (
        "--health-ms",
        "kilnd-sim: how often each simulated device sends its health",
    ),
    ("--quick", "scripts/corpus.sh: the part CI runs"),
    ("--no-deps", "pip download: how the corpus fetches a wheel"),
    (
        "--nocapture",
        "cargo test's harness: print the tests' output",
    ),
    (
        "--force-confold",
        "dpkg: keep a provisioned conffile on an unattended upgrade",
    ),
    (
        "--translate-to-exnref",
        "binaryen's wasm-opt: how a C++ module is made to use the exnref proposal",
    ),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("dist/ sits in the repository")
        .to_path_buf()
}

struct Page {
    /// Relative to the repository, e.g. `docs/src/fleet.md`.
    path: PathBuf,
    text: String,
}

/// README.md and every page under docs/src.
fn pages() -> Vec<Page> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot read `{}`: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    let root = repo();
    let mut paths = vec![root.join("README.md")];
    walk(&root.join("docs/src"), &mut paths);
    paths
        .into_iter()
        .map(|p| Page {
            text: std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("cannot read `{}`: {e}", p.display())),
            path: p.strip_prefix(&root).unwrap().to_path_buf(),
        })
        .collect()
}

/// A line of a page, and whether it is inside a fenced code block.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str, bool)> {
    let mut fence: Option<&str> = None;
    text.lines().enumerate().filter_map(move |(i, l)| {
        let t = l.trim_start();
        for marker in ["```", "~~~"] {
            if t.starts_with(marker) {
                match fence {
                    None => fence = Some(marker),
                    Some(m) if m == marker => fence = None,
                    Some(_) => continue,
                }
                return None;
            }
        }
        Some((i + 1, l, fence.is_some()))
    })
}

/// mdBook's heading id (and GitHub's, for the README): lowercase letters, digits, `_`
/// and `-` kept, whitespace made `-`, everything else dropped; of the rendered text, so
/// inline code loses its backticks and a link keeps its text.
fn heading_id(heading: &str) -> String {
    let text = strip_links(heading);
    text.chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '_' || c == '-' {
                Some(c.to_lowercase().next().unwrap_or(c))
            } else if c.is_whitespace() {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

/// `[text](target)` becomes `text`.
fn strip_links(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find("](").and_then(|close| {
            after[close + 2..]
                .find(')')
                .map(|end| (close, close + 2 + end + 1))
        }) {
            Some((close, end)) => {
                out.push_str(&after[..close]);
                rest = &after[end..];
            }
            None => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The ids of a page's headings, with mdBook's `-1`, `-2` suffixes for repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeMap::<String, usize>::new();
    let mut out = BTreeSet::new();
    for (_, line, code) in lines(text) {
        if code || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let id = heading_id(heading.trim());
        let n = seen.entry(id.clone()).or_insert(0);
        out.insert(if *n == 0 {
            id.clone()
        } else {
            format!("{id}-{n}")
        });
        *n += 1;
    }
    out
}

/// The text of a line with its inline code spans removed (links inside code are code).
fn without_code(line: &str) -> String {
    let mut out = String::new();
    let mut parts = line.split('`');
    let mut in_code = false;
    for part in parts.by_ref() {
        if !in_code {
            out.push_str(part);
        }
        in_code = !in_code;
    }
    out
}

/// The inline code spans of a line.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// A page cut into what the checks read: prose paragraphs (their first line, the lines
/// joined, since a code span or a link may wrap) and code lines (a shell line continued
/// with `\\` is one).
enum Chunk {
    Prose(usize, String),
    Code(usize, String),
}

fn chunks(text: &str) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut prose: Option<(usize, String)> = None;
    let mut code: Option<(usize, String)> = None;
    for (n, line, in_code) in lines(text) {
        if in_code {
            if let Some((start, p)) = prose.take() {
                out.push(Chunk::Prose(start, p));
            }
            let (_, c) = code.get_or_insert((n, String::new()));
            c.push_str(line.trim_end().trim_end_matches('\\'));
            c.push(' ');
            if !line.trim_end().ends_with('\\') {
                let (start, c) = code.take().unwrap();
                out.push(Chunk::Code(start, c));
            }
            continue;
        }
        if let Some((start, c)) = code.take() {
            out.push(Chunk::Code(start, c));
        }
        if line.trim().is_empty() || line.starts_with('#') {
            if let Some((start, p)) = prose.take() {
                out.push(Chunk::Prose(start, p));
            }
            if line.starts_with('#') {
                out.push(Chunk::Prose(n, line.to_string()));
            }
            continue;
        }
        let (_, p) = prose.get_or_insert((n, String::new()));
        p.push_str(line);
        p.push('\n');
    }
    if let Some((start, p)) = prose {
        out.push(Chunk::Prose(start, p));
    }
    if let Some((start, c)) = code {
        out.push(Chunk::Code(start, c));
    }
    out
}

/// Every `[..](target)` / `![..](target)` link target in a page's prose, with the line
/// its paragraph starts on.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for chunk in chunks(text) {
        let Chunk::Prose(line, p) = chunk else {
            continue;
        };
        let prose = without_code(&p);
        let mut from = 0;
        while let Some(i) = prose[from..].find("](") {
            let start = from + i + 2;
            let Some(end) = prose[start..].find(')') else {
                break;
            };
            let target = prose[start..start + end]
                .split_whitespace()
                .next()
                .unwrap_or("");
            out.push((line, target.to_string()));
            from = start + end;
        }
    }
    out
}

/// `a/b/../c` without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let root = repo();
    let pages = pages();
    let by_path: BTreeMap<&Path, &Page> = pages.iter().map(|p| (p.path.as_path(), p)).collect();
    let mut broken = Vec::new();
    for page in &pages {
        for (line, target) in links(&page.text) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                page.path.clone()
            } else {
                normalize(&page.path.parent().unwrap().join(path))
            };
            let here = format!("{}:{line}: `{target}`", page.path.display());
            if !root.join(&file).exists() {
                broken.push(format!("{here}: no file `{}`", file.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                let Some(target_page) = by_path.get(file.as_path()) else {
                    if file.extension().is_some_and(|e| e == "md") {
                        broken.push(format!("{here}: `{}` is not a page", file.display()));
                    }
                    continue;
                };
                let ids = anchors(&target_page.text);
                if !ids.contains(fragment) {
                    broken.push(format!(
                        "{here}: `{}` has no heading `#{fragment}` (it has: {})",
                        file.display(),
                        ids.into_iter().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_page_is_in_the_summary() {
    let summary_path = repo().join("docs/src/SUMMARY.md");
    let summary = std::fs::read_to_string(&summary_path).unwrap();
    let listed: BTreeSet<PathBuf> = links(&summary)
        .into_iter()
        .map(|(_, t)| normalize(&Path::new("docs/src").join(t)))
        .collect();
    let orphans: Vec<_> = pages()
        .into_iter()
        .map(|p| p.path)
        .filter(|p| p.starts_with("docs/src") && !p.ends_with("SUMMARY.md") && !listed.contains(p))
        .collect();
    assert!(
        orphans.is_empty(),
        "pages the book does not list in docs/src/SUMMARY.md: {orphans:?}"
    );
}

/// A visible (sub)command, by its path (`kiln rollout status`).
struct Cmd {
    path: String,
    /// `--long` flags, without clap's own `--help` and `--version`.
    flags: BTreeSet<String>,
    subcommands: BTreeMap<String, Cmd>,
}

fn tree(cmd: &clap::Command, path: &str) -> Cmd {
    let flags = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "help" && *l != "version")
        .map(|l| format!("--{l}"))
        .collect();
    let subcommands = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .map(|s| {
            let name = s.get_name().to_string();
            let sub = tree(s, &format!("{path} {name}"));
            (name, sub)
        })
        .collect();
    Cmd {
        path: path.to_string(),
        flags,
        subcommands,
    }
}

fn programs() -> BTreeMap<String, Cmd> {
    let mut out = BTreeMap::new();
    for mut cmd in [
        kiln_compiler::cli::Cli::command(),
        kiln_protocol::kilnd_cli::Cli::command(),
    ] {
        cmd.build();
        let name = cmd.get_name().to_string();
        out.insert(name.clone(), tree(&cmd, &name));
    }
    out
}

fn all<'a>(cmd: &'a Cmd, out: &mut Vec<&'a Cmd>) {
    for sub in cmd.subcommands.values() {
        out.push(sub);
        all(sub, out);
    }
}

/// `--flag` tokens in a piece of text (`--flag=v`, `[--flag`, `--flag]` and `--flag,`
/// count; a bare `--` does not).
fn flags_in(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let s = i + at;
        let before_ok = s == 0 || !(bytes[s - 1].is_ascii_alphanumeric() || bytes[s - 1] == b'-');
        let mut e = s + 2;
        while e < bytes.len() && (bytes[e].is_ascii_alphanumeric() || bytes[e] == b'-') {
            e += 1;
        }
        if before_ok && e > s + 2 && bytes[s + 2].is_ascii_lowercase() {
            out.push(text[s..e].trim_end_matches('-').to_string());
        }
        i = e.max(s + 2);
    }
    out
}

/// The `kiln`/`kilnd` command lines in a text (a code block's line, continued with `\`,
/// or an inline code span): for each, the commands it may be (`a|b` alternatives) and
/// the flags it passes. Words end at a comment, a pipe, a redirection or `--`.
fn invocations<'a>(
    text: &str,
    programs: &'a BTreeMap<String, Cmd>,
) -> Vec<(Vec<&'a Cmd>, Vec<String>)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let name = w.trim_matches(|c| c == '"' || c == '\'' || c == '`');
        let name = name.rsplit('/').next().unwrap_or(name);
        let Some(program) = programs.get(name) else {
            continue;
        };
        let mut current = vec![program];
        let mut j = i + 1;
        while let Some(next) = words.get(j) {
            let alternatives: Vec<&Cmd> = next
                .split('|')
                .filter_map(|n| current[0].subcommands.get(n))
                .collect();
            if current.len() != 1 || alternatives.is_empty() {
                break;
            }
            current = alternatives;
            j += 1;
        }
        if j == i + 1 {
            continue; // `kiln` the user, the word, or a program without a subcommand
        }
        let mut flags = Vec::new();
        for w in &words[j..] {
            if w.starts_with('#')
                || ["|", "||", "&&", ";", "&"].contains(w)
                || w.starts_with('>')
                || w.starts_with("2>")
                || w.starts_with('<')
                || *w == "--"
            {
                break;
            }
            flags.extend(flags_in(w));
        }
        out.push((current, flags));
    }
    out
}

#[test]
fn each_commands_page_and_its_help_agree_on_the_flags() {
    let programs = programs();
    let pages = pages();
    let page_text = |name: &str| -> &str {
        &pages
            .iter()
            .find(|p| p.path == Path::new("docs/src").join(name))
            .unwrap_or_else(|| panic!("no page docs/src/{name}"))
            .text
    };
    let mut commands = Vec::new();
    for p in programs.values() {
        all(p, &mut commands);
    }
    let pages_of: BTreeMap<&str, &str> = PAGES.iter().copied().collect();
    let mut problems = Vec::new();

    // The flags every command with a broker session shares, documented once. `kiln
    // provision` names a broker for the devices without connecting to one: it takes
    // --broker but not the session's other flags (--client-cert, ...), and documents
    // its own.
    let mut shared: Option<BTreeSet<String>> = None;
    for c in commands
        .iter()
        .filter(|c| c.flags.contains("--broker") && c.flags.contains("--client-cert"))
    {
        shared = Some(match shared {
            None => c.flags.clone(),
            Some(s) => s.intersection(&c.flags).cloned().collect(),
        });
    }
    let shared = shared.unwrap_or_default();
    let has = |text: &str, flag: &str| flags_in(text).iter().any(|f| f == flag);
    for flag in &shared {
        if !has(page_text(SHARED_FLAGS_PAGE), flag) {
            problems.push(format!(
                "docs/src/{SHARED_FLAGS_PAGE} does not name the shared broker flag {flag}"
            ));
        }
    }

    // Every flag in --help is on the command's page.
    for c in &commands {
        let Some(page) = pages_of.get(c.path.as_str()) else {
            problems.push(format!(
                "`{}` has no page: add it to PAGES in dist/tests/book.rs and document it",
                c.path
            ));
            continue;
        };
        for flag in c.flags.difference(&shared) {
            if !has(page_text(page), flag) {
                problems.push(format!(
                    "`{} --help` lists {flag}, docs/src/{page} does not name it",
                    c.path
                ));
            }
        }
    }
    for (path, page) in PAGES {
        if !commands.iter().any(|c| c.path == *path) {
            problems.push(format!(
                "PAGES names `{path}` ({page}), which is not a command"
            ));
        }
    }

    // No page (nor the README) names a flag that does not exist: in a kiln/kilnd command
    // line, the command's own; elsewhere, some command's or another tool's.
    let every_flag: BTreeSet<&str> = commands
        .iter()
        .flat_map(|c| c.flags.iter().map(String::as_str))
        .chain(["--help", "--version"])
        .collect();
    let other: BTreeSet<&str> = OTHER_TOOLS.iter().map(|(f, _)| *f).collect();
    for page in &pages {
        for chunk in chunks(&page.text) {
            match chunk {
                Chunk::Code(n, line) => {
                    let here = format!("{}:{n}", page.path.display());
                    check_line(&line, &programs, &here, &mut problems);
                }
                Chunk::Prose(n, text) => {
                    let here = format!("{}:{n}", page.path.display());
                    let mut prose = without_code(&text);
                    for span in code_spans(&text) {
                        if invocations(span, &programs).is_empty() {
                            prose.push(' ');
                            prose.push_str(span);
                        } else {
                            check_line(span, &programs, &here, &mut problems);
                        }
                    }
                    for flag in flags_in(&prose) {
                        if !every_flag.contains(flag.as_str()) && !other.contains(flag.as_str()) {
                            problems.push(format!(
                                "{here}: {flag} is no flag of kiln or kilnd (nor of a tool in OTHER_TOOLS)"
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the book and the commands' --help disagree:\n{}",
        problems.join("\n")
    );
}

/// Checks the flags of each kiln/kilnd command line in `text` against its command.
fn check_line(
    text: &str,
    programs: &BTreeMap<String, Cmd>,
    here: &str,
    problems: &mut Vec<String>,
) {
    for (alternatives, flags) in invocations(text, programs) {
        for flag in flags {
            if flag == "--help" || flag == "--version" {
                continue;
            }
            for c in &alternatives {
                if !c.flags.contains(&flag) {
                    problems.push(format!(
                        "{here}: `{}` has no flag {flag} (in `{}`)",
                        c.path,
                        text.trim()
                    ));
                }
            }
        }
    }
}

#[test]
fn the_checks_see_what_they_should() {
    assert_eq!(
        heading_id("Update transfers: one release, `kiln push`"),
        "update-transfers-one-release-kiln-push"
    );
    assert_eq!(
        heading_id("Fleet scale: 1,000 devices"),
        "fleet-scale-1000-devices"
    );
    assert_eq!(heading_id("[Trust](trust.md) and keys"), "trust-and-keys");
    let ids = anchors("# A\n\n## B\n```\n# not a heading\n```\n## B\n");
    assert_eq!(
        ids,
        ["a", "b", "b-1"].into_iter().map(String::from).collect()
    );
    let l = links("See [a](a.md#x) and `[b](b.md)`,\n![c](img/c.png) [d\ne](https://e.org).\n```\n[f](f.md)\n```\n\n[g](g.md)\n");
    let targets: Vec<_> = l.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(targets, ["a.md#x", "img/c.png", "https://e.org", "g.md"]);
    assert_eq!(l[3].0, 8);
    assert_eq!(
        flags_in("kiln push [--wire zstd|raw] --chunk-size=5 -- --x a--b"),
        ["--wire", "--chunk-size", "--x"]
    );
    let programs = programs();
    let found = invocations(
        "sudo -u kiln kilnd check --config /etc/kiln/kilnd.toml # not --this",
        &programs,
    );
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0[0].path, "kilnd check");
    assert_eq!(found[0].1, ["--config"]);
    let found = invocations("kiln rollout status|pause --group lab", &programs);
    assert_eq!(found[0].0.len(), 2);
    let mut problems = Vec::new();
    check_line(
        "kiln push a.kiln --no-such-flag",
        &programs,
        "here",
        &mut problems,
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
}
