//! `hello NAME [--read PATH] [--exit CODE]`
//!
//! Greets NAME (and `$GREETING` if set), prints the file at PATH if asked, and exits
//! with CODE. Only directories the runtime preopened are readable.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let mut name = "world".to_string();
    let mut read = None;
    let mut exit = 0u8;
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--read" => read = rest.next().cloned(),
            "--exit" => exit = rest.next().and_then(|c| c.parse().ok()).unwrap_or(1),
            other => name = other.to_string(),
        }
    }
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".into());
    println!("{greeting}, {name}! ({} args)", args.len());
    if let Some(path) = read {
        match std::fs::read_to_string(&path) {
            Ok(text) => println!("{path}: {}", text.trim_end()),
            Err(e) => {
                eprintln!("hello: cannot read {path}: {e}");
                return ExitCode::from(3);
            }
        }
    }
    ExitCode::from(exit)
}
