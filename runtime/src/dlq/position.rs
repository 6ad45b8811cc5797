//! A dead letter's position: how a DLQ numbers its letters, how `lockgate dlq` prints a
//! position and how it reads one a user typed.
//!
//! A position is a dead letter's identity (`topic/partition/offset`): replay markers, replay
//! results and a replayed copy's `lockgate-replayed-from` name it, so it never changes. Where
//! the broker numbers messages (Kafka offsets, JetStream sequences, the dead-letter table's row
//! ids) it is printed and typed as it is. A RabbitMQ queue has no offsets: there a position is
//! `queue/-/<n>` with `n` a 63-bit digest of the letter, which would print as 19 digits. It is
//! printed instead like git's short hashes: `queue/<hex>`, the shortest prefix of the digest's
//! 16 hex digits that no other letter of the queue shares, at least 8 digits
//! (`orders.dlq/3f9a1c07`). Any unique prefix of at least 4 digits, the whole 16, or the old
//! decimal form is accepted back ([`PositionArg`]). The identity stays the full digest: a
//! shorter hash would let two letters share a position, and one would be marked replayed
//! without having been replayed.

/// Hex digits a shortened digest position prints at least.
pub const SHORT_DIGITS: usize = 8;
/// Hex digits a typed digest position needs at least.
pub const MIN_TYPED_DIGITS: usize = 4;
/// Hex digits of a whole digest.
const FULL_DIGITS: usize = 16;

/// How a DLQ numbers its dead letters (what its scan's record offsets are).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numbering {
    /// The broker's offsets or sequences, or the dead-letter table's row ids: a position is
    /// printed and typed as it is (`orders.dlq/0/17`, `orders.dlq/-/17`).
    #[default]
    Offsets,
    /// A digest of each letter (RabbitMQ queues, which have no offsets): the position
    /// `queue/-/<n>` is printed `queue/<hex>` (see the module doc).
    Digests,
}

impl Numbering {
    /// The longest printed form of `position`, never ambiguous: for digests all 16 hex digits
    /// (`orders.dlq/3f9a1c07e2d4b6a8`), else the position itself.
    pub fn full(self, position: &str) -> String {
        match (self, split_digest(position)) {
            (Self::Digests, Some((topic, n))) => format!("{topic}/{}", hex(n)),
            _ => position.to_owned(),
        }
    }
}

/// `topic/-/<n>` as `(topic, n)`.
fn split_digest(position: &str) -> Option<(&str, u64)> {
    let (topic, n) = position.rsplit_once("/-/")?;
    Some((topic, n.parse().ok()?))
}

fn hex(n: u64) -> String {
    format!("{n:016x}")
}

/// The printed forms of one DLQ's positions: for digests, each shortened to the shortest
/// prefix no other letter of the DLQ shares (at least [`SHORT_DIGITS`]).
#[derive(Clone, Debug, Default)]
pub struct Shortener {
    numbering: Numbering,
    /// Every letter's digest, sorted, without repeats.
    digests: Vec<u64>,
}

impl Shortener {
    /// Shortens among `positions` (every dead letter of the DLQ, as read in one scan).
    pub fn new<'a>(numbering: Numbering, positions: impl IntoIterator<Item = &'a str>) -> Self {
        let mut digests = Vec::new();
        if numbering == Numbering::Digests {
            digests = positions
                .into_iter()
                .filter_map(|p| split_digest(p).map(|(_, n)| n))
                .collect();
            digests.sort_unstable();
            digests.dedup();
        }
        Self { numbering, digests }
    }

    /// How `lockgate dlq list` prints `position`.
    pub fn short(&self, position: &str) -> String {
        let Some((topic, n)) =
            split_digest(position).filter(|_| self.numbering == Numbering::Digests)
        else {
            return position.to_owned();
        };
        // Hex digits `n` shares with its neighbours in order: the only ones that can share
        // the most with it.
        let common = |other: u64| (other ^ n).leading_zeros() as usize / 4;
        let at = self.digests.partition_point(|d| *d < n);
        let before = at.checked_sub(1).map(|i| self.digests[i]);
        let after = self.digests[at..].iter().find(|d| **d != n).copied();
        let shared = before
            .into_iter()
            .chain(after)
            .map(common)
            .max()
            .unwrap_or(0);
        let digits = (shared + 1).clamp(SHORT_DIGITS, FULL_DIGITS);
        format!("{topic}/{}", &hex(n)[..digits])
    }
}

/// A position as a user typed it (`lockgate dlq show POSITION`, `replay --position`), read
/// for one DLQ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PositionArg {
    want: Want,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Want {
    /// The position itself.
    Exact(String),
    /// A digest, given whole (the old decimal form).
    Digest(u64),
    /// The leading hex digits of a digest (lower case).
    Prefix(String),
}

/// A typed position that names no single dead letter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionError {
    /// It is not of the DLQ's form.
    #[error("{typed:?} is not a position of {topic} (positions there look like {expected})")]
    Malformed {
        /// What was typed.
        typed: String,
        /// The DLQ's topic.
        topic: String,
        /// The forms that are.
        expected: &'static str,
    },
    /// Too few hex digits to be told apart.
    #[error(
        "{typed:?} is too short: give at least {MIN_TYPED_DIGITS} hex digits after the queue name, as `lockgate dlq list` prints them"
    )]
    TooShort {
        /// What was typed.
        typed: String,
    },
    /// No dead letter has it.
    #[error("no dead letter at {typed}")]
    Unknown {
        /// What was typed.
        typed: String,
    },
    /// Several dead letters begin with it.
    #[error(
        "{typed} is ambiguous: it begins {} positions ({}); give more hex digits",
        candidates.len(),
        candidates.join(", ")
    )]
    Ambiguous {
        /// What was typed.
        typed: String,
        /// The positions it begins, as printed.
        candidates: Vec<String>,
    },
}

const DIGEST_FORMS: &str =
    "QUEUE/HEX, at least 4 hex digits as `lockgate dlq list` prints them, or QUEUE/-/NUMBER";
const OFFSET_FORMS: &str = "TOPIC/PARTITION/OFFSET, as `lockgate dlq list` prints them";

impl PositionArg {
    /// Reads `typed` as a position of the DLQ `topic`, numbered by `numbering`.
    pub fn parse(typed: &str, topic: &str, numbering: Numbering) -> Result<Self, PositionError> {
        let malformed = |expected| PositionError::Malformed {
            typed: typed.to_owned(),
            topic: topic.to_owned(),
            expected,
        };
        let expected = match numbering {
            Numbering::Offsets => OFFSET_FORMS,
            Numbering::Digests => DIGEST_FORMS,
        };
        let Some(rest) = typed.strip_prefix(topic).and_then(|r| r.strip_prefix('/')) else {
            return Err(malformed(expected));
        };
        if numbering == Numbering::Offsets {
            return Ok(Self {
                want: Want::Exact(typed.to_owned()),
            });
        }
        if let Some(n) = rest.strip_prefix("-/") {
            return n
                .parse()
                .map(|n| Self {
                    want: Want::Digest(n),
                })
                .map_err(|_| malformed(expected));
        }
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed(expected));
        }
        if rest.len() < MIN_TYPED_DIGITS {
            return Err(PositionError::TooShort {
                typed: typed.to_owned(),
            });
        }
        if rest.len() > FULL_DIGITS {
            return Err(malformed(expected));
        }
        Ok(Self {
            want: Want::Prefix(rest.to_ascii_lowercase()),
        })
    }

    /// Whether the dead letter at `position` (its identity, as read) is one this names.
    pub fn matches(&self, position: &str) -> bool {
        match &self.want {
            Want::Exact(p) => p == position,
            Want::Digest(n) => split_digest(position).is_some_and(|(_, d)| d == *n),
            Want::Prefix(p) => split_digest(position).is_some_and(|(_, d)| hex(d).starts_with(p)),
        }
    }

    /// The one position among `matching` (those [`Self::matches`] accepted, as read, with
    /// their printed forms); `typed` is what the user typed, for the error.
    pub fn resolve<'a>(
        typed: &str,
        matching: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<&'a str, PositionError> {
        let mut found: Vec<(&str, &str)> = matching.into_iter().collect();
        found.sort_unstable();
        found.dedup_by(|a, b| a.0 == b.0);
        match found.as_slice() {
            [] => Err(PositionError::Unknown {
                typed: typed.to_owned(),
            }),
            [(one, _)] => Ok(one),
            many => {
                let mut candidates: Vec<String> =
                    many.iter().map(|(_, shown)| (*shown).to_owned()).collect();
                candidates.sort_unstable();
                Err(PositionError::Ambiguous {
                    typed: typed.to_owned(),
                    candidates,
                })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn digest(n: u64) -> String {
        format!("q.dlq/-/{n}")
    }

    #[test]
    fn digests_print_as_the_shortest_unique_hex_prefix_of_at_least_eight_digits() {
        let a = 0x3f9a_1c07_0000_0001;
        // `b` and `c` share 11 digits, and 8 with `a`.
        let b = 0x3f9a_1c07_e2d0_0000;
        let c = 0x3f9a_1c07_e2d1_0000;
        let lone = 0x0123_4567_89ab_cdef;
        let positions: Vec<String> = [a, b, c, lone].map(digest).into();
        let s = Shortener::new(Numbering::Digests, positions.iter().map(String::as_str));
        assert_eq!(s.short(&digest(lone)), "q.dlq/01234567", "never under 8");
        assert_eq!(
            s.short(&digest(a)),
            "q.dlq/3f9a1c070",
            "one past the 8 shared"
        );
        assert_eq!(s.short(&digest(b)), "q.dlq/3f9a1c07e2d0");
        assert_eq!(s.short(&digest(c)), "q.dlq/3f9a1c07e2d1");
        // A letter read twice (a repeated DLQ write) is one position, not a clash.
        let twice = [digest(lone), digest(lone)];
        let s = Shortener::new(Numbering::Digests, twice.iter().map(String::as_str));
        assert_eq!(s.short(&digest(lone)), "q.dlq/01234567");
        // Equal but for the last digit: all 16.
        let close = [digest(0x10), digest(0x11)];
        let s = Shortener::new(Numbering::Digests, close.iter().map(String::as_str));
        assert_eq!(s.short(&digest(0x10)), "q.dlq/0000000000000010");
        assert_eq!(
            Numbering::Digests.full(&digest(0x10)),
            "q.dlq/0000000000000010"
        );
    }

    #[test]
    fn offsets_print_as_they_are() {
        let s = Shortener::new(Numbering::Offsets, ["o.dlq/0/17", "o.dlq/-/18"]);
        assert_eq!(s.short("o.dlq/0/17"), "o.dlq/0/17");
        assert_eq!(s.short("o.dlq/-/18"), "o.dlq/-/18");
        assert_eq!(Numbering::Offsets.full("o.dlq/-/18"), "o.dlq/-/18");
        let arg = PositionArg::parse("o.dlq/-/18", "o.dlq", Numbering::Offsets).unwrap();
        assert!(arg.matches("o.dlq/-/18"));
        assert!(!arg.matches("o.dlq/-/180"));
        // A hex prefix means nothing where the broker numbers its messages.
        let arg = PositionArg::parse("o.dlq/0012", "o.dlq", Numbering::Offsets).unwrap();
        assert!(!arg.matches("o.dlq/-/18"));
    }

    #[test]
    fn a_typed_prefix_names_the_letters_it_begins_and_the_old_decimal_form_still_works() {
        let (a, b) = (0x3f9a_1c07_0000_0001_u64, 0x3f9a_2000_0000_0000_u64);
        let parse = |t: &str| PositionArg::parse(t, "q.dlq", Numbering::Digests);
        let arg = parse("q.dlq/3F9A1").unwrap();
        assert!(arg.matches(&digest(a)));
        assert!(!arg.matches(&digest(b)));
        let both = parse("q.dlq/3f9a").unwrap();
        assert!(both.matches(&digest(a)) && both.matches(&digest(b)));
        let old = parse(&digest(a)).unwrap();
        assert!(old.matches(&digest(a)));
        assert!(!old.matches(&digest(b)));
        assert!(
            parse("q.dlq/3f9a1c070000000100000").is_err(),
            "over 16 digits"
        );
        assert_eq!(
            parse("q.dlq/3f9"),
            Err(PositionError::TooShort {
                typed: "q.dlq/3f9".into()
            })
        );
        for bad in [
            "q.dlq/xyz12",
            "q.dlq/",
            "q.dlq/-/12a",
            "other/3f9a1c07",
            "q.dlq/0/17",
        ] {
            assert!(
                matches!(parse(bad), Err(PositionError::Malformed { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_prefix_resolves_to_one_letter_or_says_why_not() {
        let typed = "q.dlq/3f9a";
        assert_eq!(
            PositionArg::resolve(typed, [("q.dlq/-/1", "q.dlq/3f9a0001")]),
            Ok("q.dlq/-/1")
        );
        // The same letter read twice is still one.
        assert_eq!(
            PositionArg::resolve(
                typed,
                [
                    ("q.dlq/-/1", "q.dlq/3f9a0001"),
                    ("q.dlq/-/1", "q.dlq/3f9a0001")
                ]
            ),
            Ok("q.dlq/-/1")
        );
        let e = PositionArg::resolve(
            typed,
            [
                ("q.dlq/-/1", "q.dlq/3f9a0001"),
                ("q.dlq/-/2", "q.dlq/3f9a0002"),
            ],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "q.dlq/3f9a is ambiguous: it begins 2 positions (q.dlq/3f9a0001, q.dlq/3f9a0002); give more hex digits"
        );
        assert_eq!(
            PositionArg::resolve(typed, []).unwrap_err().to_string(),
            "no dead letter at q.dlq/3f9a"
        );
    }
}
