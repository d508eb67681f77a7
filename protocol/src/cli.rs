//! What the command-line programs share. A configuration file a person
//! hands over (job, schema, site config) gets a short, clear refusal when
//! it is not a small text file, before a TOML parser echoes a 6 MB line or
//! a binary file's bytes back into a terminal, a log or the coordinator's
//! reply; and output into a closed pipe ends the program quietly.

/// The largest job, schema or site configuration file accepted. Real ones
/// are a few KiB; a categorical column with thousands of declared codes
/// still fits.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The longest line accepted in such a file (TOML error messages quote the
/// line they stop at).
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// Why `text` is not a configuration file, in a few words, or `None`.
pub fn not_config_text(text: &str) -> Option<String> {
    if text.len() > MAX_CONFIG_BYTES {
        return Some(format!(
            "{} bytes; a configuration file is at most {} KiB",
            text.len(),
            MAX_CONFIG_BYTES >> 10
        ));
    }
    if let Some((n, _)) = text
        .split('\n')
        .enumerate()
        .find(|(_, line)| line.len() > MAX_LINE_BYTES)
    {
        return Some(format!(
            "line {} is longer than {} KiB; not a configuration file",
            n + 1,
            MAX_LINE_BYTES >> 10
        ));
    }
    if let Some((n, _)) = text
        .split('\n')
        .enumerate()
        .find(|(_, line)| line.chars().any(|c| c.is_control() && c != '\t' && c != '\r'))
    {
        return Some(format!(
            "line {} holds control characters: a binary file, not text",
            n + 1
        ));
    }
    None
}

/// Lets a command-line program die quietly, as `head` expects, when the
/// reader of its output goes away (`tessera job list | head`): Rust ignores
/// SIGPIPE, so every `println!` after that would panic. Call it first in
/// `main`, before any thread starts.
#[cfg(feature = "io")]
pub fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal, before any other
    // thread exists; no handler of ours is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_config_file_is_small_text() {
        assert_eq!(not_config_text("rounds = 3\r\n\tseed = 1\n"), None);
        assert_eq!(
            not_config_text("name = \"a\"\nx = \"\0\u{1}\"\n").as_deref(),
            Some("line 2 holds control characters: a binary file, not text")
        );
        let long = format!("a = 1\nname = \"{}\"\n", "x".repeat(MAX_LINE_BYTES));
        assert_eq!(
            not_config_text(&long).as_deref(),
            Some("line 2 is longer than 64 KiB; not a configuration file")
        );
        let big = "a = 1\n".repeat(MAX_CONFIG_BYTES / 6 + 1);
        assert!(
            not_config_text(&big)
                .unwrap()
                .ends_with("a configuration file is at most 1024 KiB")
        );
    }

    proptest! {
        /// Printable text with tabs and CRLF endings passes; one control
        /// character anywhere is named by its line.
        #[test]
        fn one_control_character_is_found_on_its_line(
            lines in prop::collection::vec("[ -~\t]{0,40}", 1..20),
            at in any::<prop::sample::Index>(),
            c in prop::sample::select(vec!['\0', '\u{1}', '\u{7}', '\u{1b}', '\u{7f}']),
        ) {
            let text = lines.join("\r\n");
            prop_assert_eq!(not_config_text(&text), None);
            let line = at.index(lines.len());
            let mut bad = lines.clone();
            bad[line].push(c);
            let reason = not_config_text(&bad.join("\r\n")).expect("a control character is refused");
            prop_assert_eq!(reason, format!("line {} holds control characters: a binary file, not text", line + 1));
        }
    }
}
