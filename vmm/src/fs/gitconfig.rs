//! Host side: the guest's view of a host repository's git configuration,
//! with the secrets it may hold taken out. Users keep tokens in remote
//! URLs (`https://user:TOKEN@host/repo`) and headers
//! (`http.extraheader = Authorization: Bearer ...`); the guest's git needs
//! the rest of the file (remotes, branches, settings), but never those.
//!
//! What is removed, line by line (git's config syntax is line-based; a
//! value continued with a trailing `\` is removed with its continuation):
//! - the user-info part and the query of every `scheme://user:password@`
//!   URL, in values and in section names (`[http "https://TOKEN@host"]`);
//! - every value whose key names a secret (see [`SECRET_KEY_PARTS`]), and
//!   every inline shell command (a value starting with `!`, as credential
//!   helpers and aliases may be), replaced by a comment saying sbx
//!   removed it — a key may also follow its section name on one line.
//!
//! Pure functions of bytes; the file is read (bounded) by the share.

/// Largest config file served: a larger one is refused (EFBIG), not
/// served in part.
pub const MAX_CONFIG: usize = 1 << 20;

/// Key names (any part, case-insensitive) whose values are secrets.
pub const SECRET_KEY_PARTS: &[&str] = &["extraheader", "pass", "token", "secret", "cookie", "auth", "key"];

/// What stands where a secret line was.
const REMOVED: &[u8] = b"\t# sbx: a secret value was removed here\n";

/// The text with every secret taken out.
pub fn redact(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut dropping = false;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let continued = body.strip_suffix(b"\r").unwrap_or(body).ends_with(b"\\");
        if dropping {
            dropping = continued;
            continue;
        }
        if secret_key(body) {
            out.extend_from_slice(REMOVED);
            dropping = continued;
            continue;
        }
        out.extend_from_slice(&strip_userinfo(line));
    }
    out
}

/// True if the line sets a key whose name holds a secret part, or whose
/// value is an inline command.
fn secret_key(line: &[u8]) -> bool {
    let mut trimmed = trim_start(line);
    if trimmed.first() == Some(&b'[') {
        // `[section] key = value` is one line to git too.
        match trimmed.iter().position(|&b| b == b']') {
            Some(end) => trimmed = trim_start(&trimmed[end + 1..]),
            None => return false,
        }
    }
    if trimmed.is_empty() || trimmed[0] == b'#' || trimmed[0] == b';' {
        return false;
    }
    let key_end = trimmed.iter().position(|&b| b == b'=').unwrap_or(trimmed.len());
    let key = trimmed[..key_end].to_ascii_lowercase();
    let value = trim_start(trimmed.get(key_end + 1..).unwrap_or_default());
    let value = value.strip_prefix(b"\"").unwrap_or(value);
    SECRET_KEY_PARTS.iter().any(|part| key.windows(part.len()).any(|w| w == part.as_bytes())) || value.starts_with(b"!")
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

/// Removes `user[:password]@` after every `://` whose authority has one.
fn strip_userinfo(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if line[i..].starts_with(b"://") {
            out.extend_from_slice(b"://");
            i += 3;
            // The authority ends at the first '/', '?', '#', quote or space.
            let end = line[i..]
                .iter()
                .position(|&b| matches!(b, b'/' | b'?' | b'#' | b'"' | b' ' | b'\t' | b'\n' | b'\r'))
                .map_or(line.len(), |p| i + p);
            if let Some(at) = line[i..end].iter().rposition(|&b| b == b'@') {
                i += at + 1;
            }
            // The path stays; a query (`?private_token=...`) goes.
            let path_end = line[i..]
                .iter()
                .position(|&b| matches!(b, b'"' | b' ' | b'\t' | b'\n' | b'\r'))
                .map_or(line.len(), |p| i + p);
            match line[i..path_end].iter().position(|&b| b == b'?' || b == b'#') {
                Some(q) => {
                    out.extend_from_slice(&line[i..i + q]);
                    i = path_end;
                }
                None => {
                    out.extend_from_slice(&line[i..path_end]);
                    i = path_end;
                }
            }
            continue;
        }
        out.push(line[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        String::from_utf8(redact(s.as_bytes())).unwrap()
    }

    #[test]
    fn tokens_in_urls_are_removed_and_the_rest_kept() {
        let conf = "[core]\n\trepositoryformatversion = 0\n[remote \"origin\"]\n\turl = https://alice:ghp_SECRET1@github.com/a/b.git\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n[branch \"main\"]\n\tremote = origin\n";
        let out = r(conf);
        assert!(!out.contains("ghp_SECRET1") && !out.contains("alice"), "{out}");
        assert!(out.contains("url = https://github.com/a/b.git\n"), "{out}");
        assert!(out.contains("fetch = +refs/heads/*:refs/remotes/origin/*") && out.contains("[branch \"main\"]"));
        // A token as the user name, in a section name, several per line.
        let out =
            r("[http \"https://TOKEN2@example.com/\"]\n\tsslVerify = true\n\tpushurl = http://u:p3@h/x http://q@h2\n");
        assert!(!out.contains("TOKEN2") && !out.contains("p3") && !out.contains("q@"), "{out}");
        assert!(out.contains("[http \"https://example.com/\"]") && out.contains("http://h/x http://h2"), "{out}");
        // Not URLs: ssh's scp-like form and e-mail addresses stay.
        let keep = "[remote \"o\"]\n\turl = git@github.com:a/b.git\n[user]\n\temail = a@b.c\n";
        assert_eq!(r(keep), keep);
    }

    #[test]
    fn secret_keys_are_removed_with_their_continuations() {
        let conf = "[http]\n\textraHeader = Authorization: Bearer SECRET3\n\tpostBuffer = 1\n[credential]\n\thelper = store\n[x]\n\tapiToken = SECRET4 \\\n  SECRET5\n\tok = 1\n";
        let out = r(conf);
        for s in ["SECRET3", "SECRET4", "SECRET5"] {
            assert!(!out.contains(s), "{s}: {out}");
        }
        assert!(out.contains("postBuffer = 1") && out.contains("helper = store") && out.contains("ok = 1"), "{out}");
        assert_eq!(out.matches("sbx: a secret value was removed").count(), 2);
    }

    #[test]
    fn any_bytes_are_handled() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let out = redact(&bytes);
        assert!(out.len() <= bytes.len() + REMOVED.len() * 100);
        assert_eq!(redact(b""), b"");
        assert_eq!(redact(b"://@"), b"://");
    }

    #[test]
    fn secrets_hide_nowhere_else() {
        for (conf, secret) in [
            ("[http] extraheader = Authorization: Bearer SECRET1\n", "SECRET1"),
            ("[sendemail]\n\tsmtpPass = SECRET2\n", "SECRET2"),
            ("[credential]\n\thelper = \"!f() { echo password=SECRET3; }; f\"\n", "SECRET3"),
            ("[alias]\n\tx = !echo SECRET4\n", "SECRET4"),
            ("[remote \"o\"]\n\turl = https://gitlab.example/r.git?private_token=SECRET5\n", "SECRET5"),
            ("[remote \"o\"]\n\turl = https://h/r.git#SECRET6 x\n", "SECRET6"),
            ("[lfs]\n\taccesskey = SECRET7\n", "SECRET7"),
        ] {
            let out = r(conf);
            assert!(!out.contains(secret), "{conf:?} -> {out}");
        }
        assert!(r("[remote \"o\"]\n\turl = https://h/r.git?x=1\n").contains("url = https://h/r.git\n"));
        assert!(r("[alias]\n\tst = status\n").contains("st = status"), "plain aliases stay");
    }
}
