//! The outbox row as the relay carries it from the claim to the sinks: the one type the storage
//! layer, the pipeline and every sink share, so that none of them imports another's types.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// One claimed outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: String,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    /// Failed attempts so far.
    pub attempts: i32,
}

/// A claimed row and its physical address, the `ctid` (PostgreSQL's text form, `(block,item)`),
/// as the claim returned it. The completion of the batch addresses the row by its `ctid`
/// ([`Locked`]): the claim transaction holds the row's lock until it ends, so nothing can update,
/// delete or move the row meanwhile (see [`crate::store::complete`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub row: OutboxRow,
    pub ctid: String,
}

impl Claimed {
    /// The row, and how its completion addresses it.
    pub fn into_parts(self) -> (OutboxRow, Locked) {
        let locked = self.locked();
        (self.row, locked)
    }

    /// How the completion addresses the row.
    pub fn locked(&self) -> Locked {
        Locked {
            id: self.row.id,
            ctid: self.ctid.clone(),
        }
    }
}

impl std::ops::Deref for Claimed {
    type Target = OutboxRow;

    fn deref(&self) -> &OutboxRow {
        &self.row
    }
}

/// A row that the current transaction holds locked (`FOR UPDATE`), as the completion statements
/// address it: by `ctid`, with the id to check that they touched exactly these rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    pub id: i64,
    pub ctid: String,
}

/// `xxd`-style dump: offset, 16 bytes in hex, printable ASCII (how `dead show` and the admin
/// show a payload that is not text).
pub fn hex_dump(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}  ", i * 16);
        for j in 0..16 {
            match chunk.get(j) {
                Some(b) => {
                    let _ = write!(out, "{b:02x} ");
                }
                None => out.push_str("   "),
            }
            if j == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    out
}
