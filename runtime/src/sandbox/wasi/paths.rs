//! What a WASI preview 1 path says before it is resolved: the checks kilnd makes on
//! the guest's path bytes in `adapt`. Pure, so they are tested on their own.

/// Why a path may not be resolved relative to a directory fd at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `/...`: preview 1 paths are relative to the fd they are given with.
    Absolute,
    /// More `..` than names before them: the path climbs out of the directory.
    Escapes,
}

/// Whether `path`, taken lexically relative to a directory fd, stays inside it. A
/// symlink inside the directory can still point out; wasix resolves those in the
/// module's own file system, whose root is the sandbox, so that cannot leave it either.
pub fn check(path: &[u8]) -> Result<(), Refusal> {
    if path.first() == Some(&b'/') {
        return Err(Refusal::Absolute);
    }
    let mut depth: usize = 0;
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => depth = depth.checked_sub(1).ok_or(Refusal::Escapes)?,
            _ => depth += 1,
        }
    }
    Ok(())
}

/// `path` without its trailing slashes (`dir/` names `dir`); `/` stays `/`.
pub fn trim_trailing_slashes(path: &[u8]) -> &[u8] {
    let mut end = path.len();
    while end > 1 && path[end - 1] == b'/' {
        end -= 1;
    }
    &path[..end]
}

/// Whether `path` ends in a slash, which only a directory may.
pub fn has_trailing_slash(path: &[u8]) -> bool {
    path.len() > 1 && path.last() == Some(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_inside_pass_and_paths_out_do_not() {
        for ok in [
            "",
            ".",
            "file",
            "dir/nested/file",
            "dir/.//nested/../../dir/nested/../nested///./file",
            "dir/..",
            "a/b/../../c",
        ] {
            assert_eq!(check(ok.as_bytes()), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("/dir/nested/file", Refusal::Absolute),
            ("/", Refusal::Absolute),
            ("..", Refusal::Escapes),
            ("../file", Refusal::Escapes),
            ("dir/nested/../../../dir/nested/file", Refusal::Escapes),
            ("./..", Refusal::Escapes),
        ] {
            assert_eq!(check(bad.as_bytes()), Err(why), "{bad}");
        }
    }

    #[test]
    fn trailing_slashes() {
        assert_eq!(trim_trailing_slashes(b"dir///"), b"dir");
        assert_eq!(trim_trailing_slashes(b"dir"), b"dir");
        assert_eq!(trim_trailing_slashes(b"/"), b"/");
        assert!(has_trailing_slash(b"file/"));
        assert!(!has_trailing_slash(b"file"));
        assert!(!has_trailing_slash(b"/"));
    }

    /// The lexical walk a resolver would make: a stack of names, popped by `..`.
    fn depth_walk(parts: &[&str]) -> Option<usize> {
        let mut stack = Vec::new();
        for part in parts {
            match *part {
                "" | "." => {}
                ".." => {
                    stack.pop()?;
                }
                name => stack.push(name),
            }
        }
        Some(stack.len())
    }

    proptest! {
        /// `check` refuses exactly the relative paths whose walk pops past the start.
        #[test]
        fn check_agrees_with_a_walk(parts in proptest::collection::vec(
            prop_oneof![Just(""), Just("."), Just(".."), Just("a"), Just("bc")], 0..12)
        ) {
            let path = parts.join("/");
            let walked = depth_walk(&parts);
            let checked = check(path.as_bytes());
            if path.starts_with('/') {
                prop_assert_eq!(checked, Err(Refusal::Absolute));
            } else {
                prop_assert_eq!(checked.is_ok(), walked.is_some(), "{}", path);
            }
        }
    }
}
