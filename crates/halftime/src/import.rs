//! Bulk enrolment from CSV over the Household API, in batches of up to 10,000 with a few batches in flight.
//!
//! Columns (header required): `appliance_id,household_id,region,class,rated_power_w`, and optionally
//! `duty_cycle_permille,deferral_min_max,override_rate_permille`. `class` is a class name (`fridge`, ...).

use anyhow::Context;
use halftime_core::ApplianceClass;
use halftime_proto::pb;
use halftime_proto::pb::household_client::HouseholdClient;
use std::path::Path;
use tokio::task::JoinSet;

const BATCH: usize = 10_000;
const IN_FLIGHT: usize = 4;

#[derive(serde::Deserialize)]
struct Row {
    appliance_id: u64,
    household_id: u64,
    region: String,
    class: String,
    rated_power_w: u32,
    #[serde(default)]
    duty_cycle_permille: u32,
    #[serde(default)]
    deferral_min_max: u32,
    #[serde(default)]
    override_rate_permille: u32,
}

/// Enrols every row; returns (enrolled, updated). A bad row stops the import with its line number; batches
/// already sent stay enrolled (each batch is all-or-nothing).
pub async fn import_csv(path: &Path, server: &str) -> anyhow::Result<(u64, u64)> {
    let mut rdr = csv::Reader::from_path(path).with_context(|| format!("{}", path.display()))?;
    let client = HouseholdClient::connect(server.to_string())
        .await
        .with_context(|| format!("connecting to {server}"))?
        .max_encoding_message_size(64 * 1024 * 1024);
    let mut batch = Vec::with_capacity(BATCH);
    let mut tasks: JoinSet<anyhow::Result<(u64, u64)>> = JoinSet::new();
    let (mut enrolled, mut updated) = (0, 0);
    let mut rows = rdr.deserialize::<Row>();
    let mut line = 1;
    loop {
        let next = rows.next();
        if let Some(row) = next.as_ref() {
            line += 1;
            let row = row.as_ref().map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
            let class = ApplianceClass::from_name(&row.class)
                .ok_or_else(|| anyhow::anyhow!("{}:{line}: class: unknown {:?}", path.display(), row.class))?;
            batch.push(pb::Appliance {
                appliance_id: row.appliance_id,
                household_id: row.household_id,
                region: row.region.clone(),
                class: halftime_proto::class_to_pb(class) as i32,
                rated_power_w: row.rated_power_w,
                duty_cycle_permille: row.duty_cycle_permille,
                deferral_min_max: row.deferral_min_max,
                override_rate_permille: row.override_rate_permille,
            });
        }
        if batch.len() == BATCH || (next.is_none() && !batch.is_empty()) {
            if tasks.len() >= IN_FLIGHT
                && let Some(r) = tasks.join_next().await
            {
                let (e, u) = r??;
                enrolled += e;
                updated += u;
            }
            let mut c = client.clone();
            let appliances = std::mem::take(&mut batch);
            tasks.spawn(async move {
                let r = c.enrol_appliances(pb::EnrolAppliancesRequest { appliances }).await?.into_inner();
                Ok((r.n_enrolled, r.n_updated))
            });
        }
        if next.is_none() {
            break;
        }
    }
    while let Some(r) = tasks.join_next().await {
        let (e, u) = r??;
        enrolled += e;
        updated += u;
    }
    Ok((enrolled, updated))
}
