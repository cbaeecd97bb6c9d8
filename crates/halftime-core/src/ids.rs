//! Identifiers. All are non-zero u64: households are MPAN-like, appliances are EUI-64 device ids.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A household (the premises behind one meter).
    HouseholdId
);
id_type!(
    /// An appliance; also its device id on the wire (EUI-64).
    ApplianceId
);
id_type!(
    /// A stress event, assigned by the engine.
    EventId
);
