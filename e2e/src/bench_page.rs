//! The bench's report as a dated page of the book: `bench` (run by `scripts/bench.sh`)
//! keeps every line it prints, and at the end writes them as
//! `docs/src/measurements/YYYY-MM-DD.md` and lists the page in `SUMMARY.md` and on
//! `measurements.md`, so no figure is pasted by hand.
//!
//! ```
//! let report = "## kiln bench, 2026-12-06 05:10 UTC\n\n- machine: x86_64\n\n### Metering\n\n| a |\n|---|\n| 1 |\n";
//! let page = kiln_e2e::bench_page::render(report, "scripts/bench.sh --only metering").unwrap();
//! assert_eq!(page.date, "2026-12-06");
//! assert!(page.text.starts_with("# Measurements of 2026-12-06: the bench\n"));
//! assert!(page.text.contains("\n## Metering\n"));
//! ```

use std::path::{Path, PathBuf};

/// Where `measurements.md` lists the generated pages: the newest goes on the line after
/// this one.
pub const MARKER: &str = "<!-- bench pages: scripts/bench.sh adds each run's page below -->";

/// `SUMMARY.md` lists each page under the line that names `measurements.md`.
pub const SUMMARY_PARENT: &str = "](measurements.md)";

/// A rendered page: its date (`YYYY-MM-DD`, from the report's first line), the
/// sections it holds, and its markdown.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    pub date: String,
    pub sections: Vec<String>,
    pub text: String,
}

/// Turns the bench's report into a page. The report starts with
/// `## kiln bench, YYYY-MM-DD HH:MM UTC`, then the machine, then one `### section` per
/// table; the page is titled by the date, says which command made it, and keeps every
/// line of the report, its sections one level up.
pub fn render(report: &str, command: &str) -> Result<Page, String> {
    let mut lines = report.lines();
    let first = lines.next().unwrap_or("");
    let stamp = first.strip_prefix("## kiln bench, ").ok_or_else(|| {
        format!("the report does not start with `## kiln bench, DATE`: `{first}`")
    })?;
    let date = stamp.split_whitespace().next().unwrap_or("");
    let valid = date.len() == 10
        && date.char_indices().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !valid {
        return Err(format!("the report's date is not YYYY-MM-DD: `{stamp}`"));
    }
    let mut text = format!(
        "# Measurements of {date}: the bench\n\n\
         Written by `{command}` at {stamp} from its own output: the tables below are the \
         bench's, not edited by hand. Figures under qemu-user measure the emulator, not a \
         board: compare ratios there. How the bench works: [Measurements](../measurements.md).\n"
    );
    let mut sections = Vec::new();
    let mut fence = false;
    for line in lines {
        if line.trim_start().starts_with("```") {
            fence = !fence;
        }
        let line = match line.strip_prefix("### ") {
            Some(title) if !fence => {
                // `Metering: compute.wat (...), median of 3` is listed as `Metering`,
                // `kilnd size (stripped release: ...)` as `kilnd size`
                let short = title.split(':').next().unwrap_or(title);
                let short = short.split(" (").next().unwrap_or(short);
                sections.push(short.split(", ").next().unwrap_or(short).to_string());
                format!("## {title}")
            }
            _ => line.to_string(),
        };
        text.push_str(&line);
        text.push('\n');
    }
    while text.ends_with("\n\n") {
        text.pop();
    }
    if sections.is_empty() {
        return Err("the report has no table: no `### section` in it".into());
    }
    Ok(Page {
        date: date.to_string(),
        sections,
        text,
    })
}

/// The file a page for `date` goes to in `dir`: `DATE.md`, or `DATE-2.md`, `DATE-3.md`...
/// when a page of that date exists (another run, or a page written by hand).
pub fn file_name(dir: &Path, date: &str) -> String {
    let mut name = format!("{date}.md");
    let mut n = 2;
    while dir.join(&name).exists() {
        name = format!("{date}-{n}.md");
        n += 1;
    }
    name
}

/// `text` with `entry` on its own line right after the line that contains `after` (the
/// newest first), or an error if no line does.
pub fn list(text: &str, after: &str, entry: &str) -> Result<String, String> {
    let at = text
        .find(after)
        .ok_or_else(|| format!("no line with `{after}` to list the page after"))?;
    let end = text[at..].find('\n').map_or(text.len(), |n| at + n);
    let rest = text[end..].strip_prefix('\n').unwrap_or(&text[end..]);
    Ok(format!("{}\n{entry}\n{rest}", &text[..end]))
}

/// Writes the page into `book/measurements/` and lists it in `book/SUMMARY.md` and
/// `book/measurements.md`. Returns the page's path.
pub fn write(book: &Path, page: &Page) -> Result<PathBuf, String> {
    let dir = book.join("measurements");
    let name = file_name(&dir, &page.date);
    let path = dir.join(&name);
    let title = match name.strip_suffix(".md") {
        Some(stem) if stem != page.date => format!("{} (run {})", page.date, &stem[11..]),
        _ => page.date.clone(),
    };
    let summary = book.join("SUMMARY.md");
    let index = book.join("measurements.md");
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read `{}`: {e}", p.display()))
    };
    // Both lists are checked before anything is written, so a book without the markers
    // gets no half-listed page.
    let new_summary = list(
        &read(&summary)?,
        SUMMARY_PARENT,
        &format!("  - [{title}: bench](measurements/{name})"),
    )
    .map_err(|e| format!("`{}`: {e}", summary.display()))?;
    let new_index = list(
        &read(&index)?,
        MARKER,
        &format!(
            "- [{title}](measurements/{name}): the bench ({})",
            page.sections.join("; ")
        ),
    )
    .map_err(|e| format!("`{}`: {e}", index.display()))?;
    let write = |p: &Path, text: &str| {
        std::fs::write(p, text).map_err(|e| format!("cannot write `{}`: {e}", p.display()))
    };
    write(&path, &page.text)?;
    write(&summary, &new_summary)?;
    write(&index, &new_index)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report captured from `scripts/bench.sh --only metering --targets x86_64-linux
    /// --runs 3`.
    const REPORT: &str = include_str!("bench_page/sample-report.md");

    #[test]
    fn a_captured_report_becomes_a_dated_page_with_every_line() {
        let page = render(REPORT, "scripts/bench.sh --only metering").unwrap();
        assert_eq!(page.date.len(), 10);
        assert!(page
            .text
            .starts_with(&format!("# Measurements of {}: the bench\n", page.date)));
        assert!(!page.sections.is_empty());
        for line in REPORT.lines().skip(1) {
            let line = line
                .strip_prefix("### ")
                .map_or(line.to_string(), |t| format!("## {t}"));
            assert!(page.text.contains(&line), "lost: {line}");
        }
        assert!(!page.text.contains("\n### "), "sections move one level up");
    }

    #[test]
    fn reports_without_a_date_or_tables_are_refused() {
        assert!(render("no header\n", "x").is_err());
        assert!(render("## kiln bench, yesterday\n### a\n", "x").is_err());
        assert!(render("## kiln bench, 2026-12-06 05:10 UTC\n\nno tables\n", "x").is_err());
    }

    #[test]
    fn a_page_is_written_beside_others_and_listed_newest_first() {
        let book = tempfile::tempdir().unwrap();
        let dir = book.path().join("measurements");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("2026-12-06.md"), "by hand").unwrap();
        let summary =
            "# Summary\n- [Measurements](measurements.md)\n  - [old](measurements/2026-11-30.md)\n";
        std::fs::write(book.path().join("SUMMARY.md"), summary).unwrap();
        std::fs::write(
            book.path().join("measurements.md"),
            format!("# M\n\n{MARKER}\n- [old](x.md)\n"),
        )
        .unwrap();
        let page = render(
            "## kiln bench, 2026-12-06 05:10 UTC\n\n### Metering\n\n| a |\n",
            "bench",
        )
        .unwrap();
        let path = write(book.path(), &page).unwrap();
        assert_eq!(path, dir.join("2026-12-06-2.md"));
        assert_eq!(
            std::fs::read_to_string(dir.join("2026-12-06.md")).unwrap(),
            "by hand"
        );
        let summary = std::fs::read_to_string(book.path().join("SUMMARY.md")).unwrap();
        assert!(
            summary.contains("(measurements.md)\n  - [2026-12-06 (run 2): bench](measurements/2026-12-06-2.md)\n  - [old]"),
            "{summary}"
        );
        let index = std::fs::read_to_string(book.path().join("measurements.md")).unwrap();
        assert!(index.contains("- [2026-12-06 (run 2)](measurements/2026-12-06-2.md): the bench (Metering)\n- [old]"), "{index}");
    }

    #[test]
    fn a_book_without_the_marker_gets_no_page() {
        let book = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(book.path().join("measurements")).unwrap();
        std::fs::write(book.path().join("SUMMARY.md"), "# Summary\n").unwrap();
        std::fs::write(book.path().join("measurements.md"), "# M\n").unwrap();
        let page = render(
            "## kiln bench, 2026-12-06 05:10 UTC\n\n### Metering\n",
            "bench",
        )
        .unwrap();
        assert!(write(book.path(), &page)
            .unwrap_err()
            .contains("no line with"));
        assert!(!book.path().join("measurements/2026-12-06.md").exists());
    }
}
