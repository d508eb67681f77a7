//! What the command-line programs share. A configuration file a person
//! hands over (job, schema, site config) gets a short, clear refusal when
//! it is not a small text file, before a TOML parser echoes a 6 MB line or
//! a binary file's bytes back into a terminal, a log or the coordinator's
//! reply; output into a closed pipe ends the program quietly; and the
//! daemons' logs are text for a person or JSON lines for a log collector.

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
/// SIGPIPE, so a `println!` after that panics. Restoring SIGPIPE's default
/// action would be wrong: a TLS connection the peer closes mid-handshake
/// then kills the process from inside a socket write (`writev` raises
/// SIGPIPE), silently. So SIGPIPE stays ignored, sockets get `EPIPE` as
/// errors, and only a print to a closed standard output or error ends the
/// program, by SIGPIPE, with nothing on its standard error. Call it first in
/// `main`.
#[cfg(feature = "io")]
pub fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_closed_pipe_print(message) {
            die_of_closed_pipe();
        }
        default(info)
    }));
}

/// Whether a panic message is std's for a `print!` into a closed pipe.
#[cfg(feature = "io")]
fn is_closed_pipe_print(message: &str) -> bool {
    let closed = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
    (message.starts_with("failed printing to stdout: ") || message.starts_with("failed printing to stderr: "))
        && (message.contains("os error 32") || message.ends_with(&closed.to_string()))
}

#[cfg(feature = "io")]
fn die_of_closed_pipe() -> ! {
    #[cfg(unix)]
    // SAFETY: restores the default action of SIGPIPE and raises it in this
    // thread, which ends the process; no handler of ours runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(141)
}

/// Refuses a coordinator address that cannot work with the connection
/// asked for, before a confusing transport error: a plaintext `http://`
/// address with a TLS kit (the coordinator would see a TLS-less HTTP/2
/// preface and drop it), or no scheme at all.
pub fn check_coordinator_address(addr: &str, tls: bool) -> Result<(), String> {
    match addr.split_once("://") {
        None => Err(format!(
            "coordinator address `{addr}` has no scheme: https://{addr} (or http:// for a coordinator run with --insecure-dev)"
        )),
        Some(("http", rest)) if tls => Err(format!(
            "coordinator address `{addr}` is plaintext, but a TLS kit is configured: use https://{rest}"
        )),
        Some(("http" | "https", _)) => Ok(()),
        Some((scheme, _)) => Err(format!(
            "coordinator address `{addr}`: unknown scheme `{scheme}`; expected https:// (or http:// with --insecure-dev)"
        )),
    }
}

/// How a daemon writes its log (`--log-format`, or `TESSERA_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Lines a person reads; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`),
    /// for journald, Loki, Elasticsearch and the like: no parsing of text.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("`{other}` is no log format; expected text or json")),
        }
    }
}

/// Starts a daemon's log on stderr: `RUST_LOG` when set, else
/// `default_filter`.
#[cfg(feature = "io")]
pub fn init_logging(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colour on a terminal only: a log written to a file stays plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[cfg(feature = "io")]
    #[test]
    fn only_a_print_into_a_closed_pipe_counts_as_one() {
        assert!(is_closed_pipe_print(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(is_closed_pipe_print(
            "failed printing to stderr: Broken pipe (os error 32)"
        ));
        assert!(!is_closed_pipe_print(
            "failed printing to stdout: No space left on device (os error 28)"
        ));
        assert!(!is_closed_pipe_print("Broken pipe (os error 32)"));
        assert!(!is_closed_pipe_print(""));
    }

    /// The SIGPIPE a socket write raises when its peer has gone (a
    /// coordinator dropping a refused TLS handshake) must come back as an
    /// error: with SIGPIPE's default action it killed the CLI silently.
    #[cfg(all(feature = "io", unix))]
    #[test]
    fn a_socket_whose_peer_left_gives_an_error_not_a_signal() {
        use std::io::{IoSlice, Write};
        quiet_on_closed_pipe();
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(theirs);
        let chunk = [7u8; 4096];
        // `write_vectored` is `writev`, which (unlike `send`) does not ask
        // the kernel to spare the process.
        let err = ours
            .write_vectored(&[IoSlice::new(&chunk), IoSlice::new(&chunk)])
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn coordinator_addresses_match_the_connection() {
        assert_eq!(check_coordinator_address("https://c.example:50051", true), Ok(()));
        assert_eq!(check_coordinator_address("http://127.0.0.1:50051", false), Ok(()));
        assert_eq!(
            check_coordinator_address("http://127.0.0.1:50051", true),
            Err(
                "coordinator address `http://127.0.0.1:50051` is plaintext, but a TLS kit is configured: \
                 use https://127.0.0.1:50051"
                    .to_owned()
            )
        );
        let err = check_coordinator_address("c.example:50051", true).unwrap_err();
        assert!(err.contains("no scheme: https://c.example:50051"), "{err}");
        let err = check_coordinator_address("grpc://c.example", false).unwrap_err();
        assert!(err.contains("unknown scheme `grpc`"), "{err}");
    }

    #[test]
    fn log_formats_are_named() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!(
            "xml".parse::<LogFormat>(),
            Err("`xml` is no log format; expected text or json".to_owned())
        );
    }

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
