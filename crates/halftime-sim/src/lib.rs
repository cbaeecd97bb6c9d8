//! Simulation: the scenario file format, seeded populations of households and appliances, stress-event
//! targets derived from real GB demand data, and simulated appliances that take commands through the client
//! SDK and report what they really shed. Everything is seeded: the same seed gives the same population.

pub mod appliance;
pub mod demand;
pub mod population;
pub mod scenario;

pub use appliance::{Applied, SimAppliance, SimLog};
pub use population::{Population, SimHousehold};
pub use scenario::{EventSpec, Scenario, ScenarioError};
