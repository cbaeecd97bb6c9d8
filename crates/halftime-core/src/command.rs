//! Curtailment commands and their canonical byte encoding, the bytes that get signed.
//!
//! The encoding is fixed-size, big-endian, and independent of protobuf, so that a device verifies exactly
//! what the engine signed whatever transport carried it. Layout (61 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HLFTCMD1` |
//! | 8 | 1 | kind: 1 defer, 2 release |
//! | 9 | 4 | key id (u32) |
//! | 13 | 8 | device id (u64) |
//! | 21 | 8 | event id (u64) |
//! | 29 | 8 | counter (u64) |
//! | 37 | 8 | not before, Unix ms (i64) |
//! | 45 | 8 | not after, Unix ms (i64) |
//! | 53 | 4 | deferral, s (u32) |
//! | 57 | 4 | start randomisation window, s (u32) |

use crate::ids::{ApplianceId, EventId};
use serde::{Deserialize, Serialize};

pub const CANONICAL_LEN: usize = 61;
pub const MAGIC: &[u8; 8] = b"HLFTCMD1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandKind {
    /// Defer the appliance.
    Defer = 1,
    /// End an active deferral of the same event now.
    Release = 2,
}

/// A command before signing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeferralCommand {
    pub kind: CommandKind,
    pub key_id: u32,
    pub device: ApplianceId,
    pub event: EventId,
    /// Strictly increasing per device.
    pub counter: u64,
    pub not_before_unix_ms: i64,
    /// Expiry: the appliance resumes by itself by this time.
    pub not_after_unix_ms: i64,
    pub deferral_s: u32,
    pub randomize_start_s: u32,
}

impl DeferralCommand {
    pub fn canonical_bytes(&self) -> [u8; CANONICAL_LEN] {
        let mut out = [0u8; CANONICAL_LEN];
        out[0..8].copy_from_slice(MAGIC);
        out[8] = self.kind as u8;
        out[9..13].copy_from_slice(&self.key_id.to_be_bytes());
        out[13..21].copy_from_slice(&self.device.0.to_be_bytes());
        out[21..29].copy_from_slice(&self.event.0.to_be_bytes());
        out[29..37].copy_from_slice(&self.counter.to_be_bytes());
        out[37..45].copy_from_slice(&self.not_before_unix_ms.to_be_bytes());
        out[45..53].copy_from_slice(&self.not_after_unix_ms.to_be_bytes());
        out[53..57].copy_from_slice(&self.deferral_s.to_be_bytes());
        out[57..61].copy_from_slice(&self.randomize_start_s.to_be_bytes());
        out
    }

    /// Latest time the deferral can end: not before + randomisation + deferral, capped by the expiry.
    pub fn latest_end_unix_ms(&self) -> i64 {
        let end =
            self.not_before_unix_ms + i64::from(self.randomize_start_s) * 1000 + i64::from(self.deferral_s) * 1000;
        end.min(self.not_after_unix_ms)
    }
}

/// A command with its Ed25519 signature over [`DeferralCommand::canonical_bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    pub command: DeferralCommand,
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
}

mod sig_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(sig)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: Vec<u8> = Deserialize::deserialize(d)?;
        v.try_into().map_err(|_| serde::de::Error::custom("signature must be 64 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_encoding_is_fixed_and_field_sensitive() {
        let c = DeferralCommand {
            kind: CommandKind::Defer,
            key_id: 0x0102_0304,
            device: ApplianceId(5),
            event: EventId(6),
            counter: 7,
            not_before_unix_ms: 8,
            not_after_unix_ms: 9,
            deferral_s: 10,
            randomize_start_s: 11,
        };
        let b = c.canonical_bytes();
        assert_eq!(&b[0..8], b"HLFTCMD1");
        assert_eq!(b[8], 1);
        assert_eq!(&b[9..13], &[1, 2, 3, 4]);
        assert_eq!(b[60], 11);
        let mut d = c;
        d.counter = 8;
        assert_ne!(d.canonical_bytes(), b);
    }
}
