//! The embedded durable store, on redb (a pure-Rust, ACID, copy-on-write B-tree in one file).
//!
//! What it holds: the registry (appliances), households' own limits, accepted events and their idempotency
//! keys, dispatches (the reservations and signed commands of one batch, written in one transaction with the
//! counter high-water mark), outcomes, and the engine's signing key. Every write is one transaction that is
//! durable when it returns. Values are postcard-encoded; a value that fails to decode is an error naming its
//! table, never a panic.

use halftime_core::{Appliance, EventId, EventRecord, HouseholdId, Limits, Outcome, Reservation, SignedCommand};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const APPLIANCES: TableDefinition<u64, &[u8]> = TableDefinition::new("appliances");
const LIMITS: TableDefinition<u64, &[u8]> = TableDefinition::new("household_limits");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const IDEMPOTENCY: TableDefinition<&str, u64> = TableDefinition::new("idempotency_keys");
/// Key: (event id, record sequence number).
const DISPATCHES: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("dispatches");
/// Key: event id; value: its next free dispatch record number. Kept apart so that numbering a dispatch never reads
/// a record (at national scale a record's leaf page was read whole, hundreds of megabytes, for every release).
const DISPATCH_NEXT_SEQ: TableDefinition<u64, u32> = TableDefinition::new("dispatch_next_seq");
/// Key: append sequence number.
const OUTCOMES: TableDefinition<u64, &[u8]> = TableDefinition::new("outcomes");

const META_SIGNING_SEED: &str = "signing_seed";
const META_COUNTER_HWM: &str = "counter_hwm";
const META_SCHEMA: &str = "schema_version";
const SCHEMA_VERSION: &[u8] = b"2";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: PathBuf, source: Box<redb::DatabaseError> },
    #[error("store: {0}")]
    Db(Box<redb::Error>),
    #[error("store table {table}: undecodable value: {reason}")]
    Decode { table: &'static str, reason: String },
    #[error("store: encode: {0}")]
    Encode(String),
    #[error("store: data directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("store: schema version {found:?} is not {SCHEMA_VERSION:?}")]
    Schema { found: String },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
db_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

pub type Result<T> = std::result::Result<T, StoreError>;

/// Most commands (and most reservations) in one stored dispatch record: a dispatch of a million and a half
/// commands is kept as a few dozen records, so that no read or write handles a value of hundreds of megabytes.
pub const DISPATCH_RECORD_LEN_MAX: usize = 50_000;

/// One durable dispatch batch.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Dispatch {
    pub reservations: Vec<Reservation>,
    pub commands: Vec<SignedCommand>,
}

pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| StoreError::Encode(e.to_string()))
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Decode { table, reason: e.to_string() })
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        let path = dir.join("halftime.redb");
        let db = Database::create(&path)
            .map_err(|source| StoreError::Open { path: path.clone(), source: Box::new(source) })?;
        let w = db.begin_write()?;
        {
            let mut meta = w.open_table(META)?;
            let found = meta.get(META_SCHEMA)?.map(|v| v.value().to_vec());
            match found {
                None => {
                    meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(StoreError::Schema { found: String::from_utf8_lossy(&v).into_owned() });
                }
            }
            w.open_table(APPLIANCES)?;
            w.open_table(LIMITS)?;
            w.open_table(EVENTS)?;
            w.open_table(IDEMPOTENCY)?;
            let dispatches = w.open_table(DISPATCHES)?;
            let mut next_seq = w.open_table(DISPATCH_NEXT_SEQ)?;
            // A store written before records were numbered apart: number them from what it holds, once.
            if next_seq.is_empty()? && !dispatches.is_empty()? {
                for row in dispatches.iter()? {
                    let (event, seq) = row?.0.value();
                    next_seq.insert(event, seq + 1)?;
                }
            }
            w.open_table(OUTCOMES)?;
        }
        w.commit()?;
        Ok(Self { db })
    }

    pub fn signing_seed(&self) -> Result<Option<[u8; 32]>> {
        let r = self.db.begin_read()?;
        let meta = r.open_table(META)?;
        match meta.get(META_SIGNING_SEED)? {
            None => Ok(None),
            Some(v) => {
                let seed: [u8; 32] = v
                    .value()
                    .try_into()
                    .map_err(|_| StoreError::Decode { table: "meta", reason: "signing seed is not 32 bytes".into() })?;
                Ok(Some(seed))
            }
        }
    }

    pub fn set_signing_seed(&self, seed: &[u8; 32]) -> Result<()> {
        let w = self.db.begin_write()?;
        w.open_table(META)?.insert(META_SIGNING_SEED, seed.as_slice())?;
        w.commit()?;
        Ok(())
    }

    /// The highest command counter that may have been issued.
    pub fn counter_hwm(&self) -> Result<u64> {
        let r = self.db.begin_read()?;
        let meta = r.open_table(META)?;
        match meta.get(META_COUNTER_HWM)? {
            None => Ok(0),
            Some(v) => {
                let b: [u8; 8] = v.value().try_into().map_err(|_| StoreError::Decode {
                    table: "meta",
                    reason: "counter high-water mark is not 8 bytes".into(),
                })?;
                Ok(u64::from_be_bytes(b))
            }
        }
    }

    pub fn set_counter_hwm(&self, hwm: u64) -> Result<()> {
        let w = self.db.begin_write()?;
        w.open_table(META)?.insert(META_COUNTER_HWM, hwm.to_be_bytes().as_slice())?;
        w.commit()?;
        Ok(())
    }

    /// Enrols or updates appliances, all in one transaction.
    pub fn put_appliances(&self, appliances: &[Appliance]) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(APPLIANCES)?;
            for a in appliances {
                t.insert(a.id.0, encode(a)?.as_slice())?;
            }
        }
        w.commit()?;
        Ok(())
    }

    pub fn appliances(&self) -> Result<Vec<Appliance>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(APPLIANCES)?;
        let mut out = Vec::with_capacity(usize::try_from(t.len()?).unwrap_or(0));
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("appliances", v.value())?);
        }
        Ok(out)
    }

    /// Households' own limits, in one transaction (later entries for the same household win).
    pub fn put_limits(&self, limits: &[(HouseholdId, Limits)]) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(LIMITS)?;
            for (household, l) in limits {
                t.insert(household.0, encode(l)?.as_slice())?;
            }
        }
        w.commit()?;
        Ok(())
    }

    pub fn limits(&self) -> Result<Vec<(HouseholdId, Limits)>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(LIMITS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((HouseholdId(k.value()), decode("household_limits", v.value())?));
        }
        Ok(out)
    }

    /// Records an event (new or updated); a new one also records its idempotency key, in the same transaction.
    pub fn put_event(&self, record: &EventRecord) -> Result<()> {
        let w = self.db.begin_write()?;
        {
            w.open_table(EVENTS)?.insert(record.id.0, encode(record)?.as_slice())?;
            w.open_table(IDEMPOTENCY)?.insert(record.spec.idempotency_key.as_str(), record.id.0)?;
        }
        w.commit()?;
        Ok(())
    }

    pub fn events(&self) -> Result<Vec<EventRecord>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("events", v.value())?);
        }
        Ok(out)
    }

    pub fn event_by_key(&self, idempotency_key: &str) -> Result<Option<EventId>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(IDEMPOTENCY)?;
        Ok(t.get(idempotency_key)?.map(|v| EventId(v.value())))
    }

    /// Makes a dispatch durable after its event's earlier ones: its reservations and signed commands (as records
    /// of at most [`DISPATCH_RECORD_LEN_MAX`] each) and the counter high-water mark, in one transaction, which
    /// also numbers them (so two dispatches of one event written at once never take the same number). Commands may
    /// leave only after this returns. Returns the number of its first record.
    pub fn append_dispatch(&self, event: EventId, dispatch: &Dispatch, counter_hwm: u64) -> Result<u32> {
        let part = |v_len: usize, i: usize| {
            (i * DISPATCH_RECORD_LEN_MAX).min(v_len)..((i + 1) * DISPATCH_RECORD_LEN_MAX).min(v_len)
        };
        let n_records =
            dispatch.reservations.len().max(dispatch.commands.len()).div_ceil(DISPATCH_RECORD_LEN_MAX).max(1);
        let n_records_u32 = u32::try_from(n_records).map_err(|_| StoreError::Encode("dispatch too large".into()))?;
        let w = self.db.begin_write()?;
        let first;
        {
            let mut next_seq = w.open_table(DISPATCH_NEXT_SEQ)?;
            first = next_seq.get(event.0)?.map_or(0, |v| v.value());
            let after = first
                .checked_add(n_records_u32)
                .ok_or_else(|| StoreError::Encode(format!("event {}: dispatch records exhausted", event.0)))?;
            next_seq.insert(event.0, after)?;
            let mut records = w.open_table(DISPATCHES)?;
            for i in 0..n_records {
                let record = Dispatch {
                    reservations: dispatch.reservations[part(dispatch.reservations.len(), i)].to_vec(),
                    commands: dispatch.commands[part(dispatch.commands.len(), i)].to_vec(),
                };
                records.insert((event.0, first + i as u32), encode(&record)?.as_slice())?;
            }
            let mut meta = w.open_table(META)?;
            let current = match meta.get(META_COUNTER_HWM)? {
                Some(v) => v.value().try_into().map(u64::from_be_bytes).unwrap_or(0),
                None => 0,
            };
            meta.insert(META_COUNTER_HWM, current.max(counter_hwm).to_be_bytes().as_slice())?;
        }
        w.commit()?;
        Ok(first)
    }

    /// Every dispatch record, in event and sequence order.
    pub fn dispatches(&self) -> Result<Vec<(EventId, u32, Dispatch)>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(DISPATCHES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (event, seq) = k.value();
            out.push((EventId(event), seq, decode("dispatches", v.value())?));
        }
        Ok(out)
    }

    /// Appends outcomes in one transaction.
    pub fn append_outcomes(&self, outcomes: &[Outcome]) -> Result<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(OUTCOMES)?;
            let next = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
            for (i, o) in outcomes.iter().enumerate() {
                t.insert(next + i as u64, encode(o)?.as_slice())?;
            }
        }
        w.commit()?;
        Ok(())
    }

    pub fn outcomes(&self) -> Result<Vec<Outcome>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(OUTCOMES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("outcomes", v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halftime_core::{ApplianceClass, ApplianceId, DeviceStatus, RegionId};

    #[test]
    fn everything_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let appliance = Appliance {
            id: ApplianceId(5),
            household: HouseholdId(9),
            region: RegionId(2),
            class: ApplianceClass::Freezer,
            rated_power_w: 150,
            duty_cycle_permille: 160,
            deferral_min_max: 60,
            override_rate_permille: 10,
        };
        let reservation = Reservation {
            household: HouseholdId(9),
            appliance: ApplianceId(5),
            class: ApplianceClass::Freezer,
            event: EventId(1),
            not_before_unix_ms: 1,
            not_after_unix_ms: 600_001,
            deferral_s: 600,
            reduction_kw: 0.02,
        };
        let outcome = Outcome {
            event: EventId(1),
            appliance: ApplianceId(5),
            household: HouseholdId(9),
            status: DeviceStatus::Overridden,
            at_unix_ms: 5,
            reduction_w: 0,
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.set_signing_seed(&[3; 32]).unwrap();
            s.put_appliances(&[appliance]).unwrap();
            s.put_limits(&[(HouseholdId(9), Limits::system_default())]).unwrap();
            let first = Dispatch { reservations: vec![reservation], commands: vec![] };
            assert_eq!(s.append_dispatch(EventId(1), &first, 77).unwrap(), 0);
            let empty = Dispatch { reservations: vec![], commands: vec![] };
            assert_eq!(s.append_dispatch(EventId(1), &empty, 50).unwrap(), 1);
            s.append_outcomes(&[outcome, outcome]).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.signing_seed().unwrap(), Some([3; 32]));
        assert_eq!(s.appliances().unwrap(), vec![appliance]);
        assert_eq!(s.limits().unwrap(), vec![(HouseholdId(9), Limits::system_default())]);
        assert_eq!(s.counter_hwm().unwrap(), 77, "the high-water mark never goes down");
        let d = s.dispatches().unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].2.reservations, vec![reservation]);
        let empty = Dispatch { reservations: vec![], commands: vec![] };
        assert_eq!(s.append_dispatch(EventId(1), &empty, 0).unwrap(), 2, "numbered on after a reopen");
        assert_eq!(s.append_dispatch(EventId(2), &empty, 0).unwrap(), 0);
        assert_eq!(s.outcomes().unwrap().len(), 2);
    }

    fn reservation(i: u64) -> Reservation {
        Reservation {
            household: HouseholdId(i),
            appliance: ApplianceId(i),
            class: ApplianceClass::Fridge,
            event: EventId(1),
            not_before_unix_ms: 0,
            not_after_unix_ms: 60_000,
            deferral_s: 60,
            reduction_kw: 0.05,
        }
    }

    /// A large dispatch is kept as bounded records, numbered in order and read back whole; a store written before
    /// records were numbered apart numbers on from what it holds.
    #[test]
    fn a_large_dispatch_is_stored_as_bounded_records() {
        let dir = tempfile::tempdir().unwrap();
        let n = 2 * DISPATCH_RECORD_LEN_MAX + 1;
        let big = Dispatch { reservations: (0..n as u64).map(reservation).collect(), commands: vec![] };
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.append_dispatch(EventId(1), &big, 1).unwrap(), 0);
            let records = s.dispatches().unwrap();
            assert_eq!(records.iter().map(|r| r.1).collect::<Vec<_>>(), [0, 1, 2]);
            assert!(records.iter().all(|r| r.2.reservations.len() <= DISPATCH_RECORD_LEN_MAX));
            let all: Vec<Reservation> = records.into_iter().flat_map(|r| r.2.reservations).collect();
            assert_eq!(all, big.reservations);
            let small = Dispatch { reservations: vec![reservation(7)], commands: vec![] };
            assert_eq!(s.append_dispatch(EventId(1), &small, 1).unwrap(), 3);
            // As an older store would be: records, and no numbering table.
            let w = s.db.begin_write().unwrap();
            w.delete_table(DISPATCH_NEXT_SEQ).unwrap();
            w.commit().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let small = Dispatch { reservations: vec![reservation(8)], commands: vec![] };
        assert_eq!(s.append_dispatch(EventId(1), &small, 1).unwrap(), 4);
        assert_eq!(s.dispatches().unwrap().len(), 5);
    }

    #[test]
    fn a_corrupt_value_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let w = s.db.begin_write().unwrap();
        w.open_table(APPLIANCES).unwrap().insert(1, [0xff_u8, 0xff, 0xff].as_slice()).unwrap();
        w.commit().unwrap();
        assert!(matches!(s.appliances(), Err(StoreError::Decode { table: "appliances", .. })));
    }
}
