//! Statements a handler may not run: the host owns the transaction and the session.

/// First keywords that control a transaction or a session, or leave the transaction's bounds.
/// `DO` and `CALL` run code that could do any of it out of sight of this check.
const REFUSED: &[(&str, &str)] = &[
    ("BEGIN", "transaction control"),
    ("START", "transaction control"),
    ("COMMIT", "transaction control"),
    ("END", "transaction control"),
    ("ROLLBACK", "transaction control"),
    ("ABORT", "transaction control"),
    ("SAVEPOINT", "transaction control"),
    ("RELEASE", "transaction control"),
    ("PREPARE", "transaction control"),
    ("SET", "session control"),
    ("RESET", "session control"),
    ("DISCARD", "session control"),
    ("LISTEN", "session control"),
    ("UNLISTEN", "session control"),
    ("NOTIFY", "session control"),
    ("DEALLOCATE", "session control"),
    ("LOAD", "session control"),
    ("COPY", "COPY"),
    ("DO", "anonymous code blocks"),
    ("CALL", "procedures (they may control the transaction)"),
    ("VACUUM", "maintenance outside a transaction"),
    ("CHECKPOINT", "maintenance outside a transaction"),
];

/// Functions that change the session's role or settings from inside a query.
const REFUSED_CALLS: &[&str] = &["set_config", "set_session_authorization"];

/// Why `statement` is refused, if it is.
pub(crate) fn refused(statement: &str) -> Option<String> {
    let body = skip_comments(statement);
    let word: String = body
        .chars()
        .take_while(|c| c.is_ascii_alphabetic() || *c == '_')
        .collect::<String>()
        .to_ascii_uppercase();
    if word.is_empty() && body.is_empty() {
        return Some("the statement is empty".into());
    }
    if let Some((_, what)) = REFUSED.iter().find(|(w, _)| *w == word) {
        return Some(format!(
            "{word} is refused: {what} belongs to the host, which runs each message's statements in one transaction and commits it with the message"
        ));
    }
    let lower = statement.to_ascii_lowercase();
    if let Some(call) = REFUSED_CALLS.iter().find(|c| lower.contains(*c)) {
        return Some(format!(
            "{call}() is refused: it changes the session's role or settings, which belong to the host"
        ));
    }
    None
}

/// `s` without leading whitespace, `-- line` and `/* block */` comments (nested, as
/// PostgreSQL reads them).
fn skip_comments(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.find('\n').map_or("", |i| &rest[i + 1..]);
        } else if s.starts_with("/*") {
            s = s.get(block_comment_len(s.as_bytes())..).unwrap_or("");
        } else {
            return s;
        }
    }
}

/// The length of the `/* block */` comment `b` starts with (nested, as PostgreSQL reads
/// them; all of `b` when it is not closed).
pub(super) fn block_comment_len(b: &[u8]) -> usize {
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if b[i..].starts_with(b"*/") {
            depth = depth.saturating_sub(1);
            i += 2;
            if depth == 0 {
                break;
            }
        } else {
            i += 1;
        }
    }
    i.min(b.len())
}

#[cfg(test)]
mod tests {
    use super::refused;

    #[test]
    fn transaction_and_session_control_are_refused_whatever_the_case_and_comments() {
        for s in [
            "BEGIN",
            "begin isolation level serializable",
            "  Commit",
            "ROLLBACK TO SAVEPOINT a",
            "savepoint a",
            "SET ROLE postgres",
            "set local statement_timeout = 0",
            "RESET ROLE",
            "-- hidden\nCOMMIT",
            "/* a /* nested */ comment */ end",
            "LISTEN x",
            "COPY t FROM STDIN",
            "DO $$ BEGIN COMMIT; END $$",
            "CALL p()",
            "SELECT set_config('role', 'postgres', true)",
            "select pg_catalog.SET_CONFIG('statement_timeout', '0', true)",
            "",
            "  -- only a comment",
        ] {
            assert!(refused(s).is_some(), "{s:?} was let through");
        }
    }

    #[test]
    fn ordinary_statements_pass() {
        for s in [
            "SELECT 1",
            "insert into events (aggregate_id, version) values ($1, $2)",
            "UPDATE account_balances SET balance = balance + $1 WHERE id = $2",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "DELETE FROM t WHERE settled",
            "-- a note\nSELECT 2",
            "SELECT 'BEGIN'",
            "CREATE TABLE IF NOT EXISTS t (id int)",
        ] {
            assert_eq!(refused(s), None, "{s:?}");
        }
    }
}
