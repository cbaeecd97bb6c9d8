//! The gRPC server: `GridOperator`, `Household` and `DeviceLink` over the engine, with gRPC health checking and
//! server reflection. Converts between protobuf and the core, maps engine errors to status codes, and checks
//! operators' bearer tokens. Holds no state of its own.

use halftime_core::validate::{self, limit_count};
use halftime_core::{ApplianceId, FieldError, HouseholdId, RegionId};
use halftime_engine::{Engine, EngineError, Grant, SubmitRequest};
use halftime_headend::LinkReceiver;
use halftime_proto::pb;
use halftime_proto::pb::device_link_server::{DeviceLink, DeviceLinkServer};
use halftime_proto::pb::grid_operator_server::{GridOperator, GridOperatorServer};
use halftime_proto::pb::household_server::{Household, HouseholdServer};
use halftime_proto::{invalid, pb::uplink::Msg as UpMsg};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Most appliances in one enrolment call.
pub const ENROL_BATCH_MAX: usize = 10_000;
pub use halftime_proto::REPORT_BATCH_MAX;
/// Largest message the server decodes.
pub const MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Operators' bearer tokens and what each may do. Empty means no authentication (development only).
#[derive(Clone, Debug, Default)]
pub struct Operators {
    pub grants: HashMap<String, Grant>,
}

impl Operators {
    fn grant<T>(&self, req: &Request<T>) -> Result<Grant, Status> {
        if self.grants.is_empty() {
            return Ok(Grant::unrestricted());
        }
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::permission_denied("authorization: a bearer token is required"))?;
        self.grants.get(token).cloned().ok_or_else(|| Status::permission_denied("authorization: unknown token"))
    }
}

pub fn status_of(e: EngineError) -> Status {
    match e {
        EngineError::Invalid(f) => invalid(&f),
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::AlreadyExists(m) => Status::already_exists(m),
        EngineError::PermissionDenied(m) => Status::permission_denied(m),
        EngineError::ResourceExhausted(m) => Status::resource_exhausted(m),
        EngineError::Internal(m) => {
            tracing::error!(error = %m, "internal error");
            Status::internal(m)
        }
    }
}

fn bad(e: FieldError) -> Status {
    invalid(&e)
}

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Clone, Debug)]
pub struct GridOperatorService {
    engine: Engine,
    operators: Arc<Operators>,
}

#[tonic::async_trait]
impl GridOperator for GridOperatorService {
    async fn submit_stress_event(
        &self,
        request: Request<pb::SubmitStressEventRequest>,
    ) -> Result<Response<pb::SubmitStressEventResponse>, Status> {
        let grant = self.operators.grant(&request)?;
        let r = request.into_inner();
        let req = SubmitRequest {
            regions: r.regions,
            start_unix_ms: r.start_unix_ms,
            target_mw: r.target_mw,
            target_kw: r.target_kw,
            deferral_min_max: r.deferral_min_max,
            priority: halftime_proto::priority_from_pb(r.priority, "priority").map_err(bad)?,
            idempotency_key: r.idempotency_key,
        };
        let (id, plan) = self.engine.submit(req, &grant).await.map_err(status_of)?;
        Ok(Response::new(pb::SubmitStressEventResponse {
            event_id: id.0,
            plan: Some(halftime_proto::plan_to_pb(&plan)),
        }))
    }

    async fn update_stress_event(
        &self,
        request: Request<pb::UpdateStressEventRequest>,
    ) -> Result<Response<pb::SubmitStressEventResponse>, Status> {
        let grant = self.operators.grant(&request)?;
        let r = request.into_inner();
        let event = event_id(r.event_id)?;
        let (id, plan) = self.engine.update(event, &r.target_mw, &r.target_kw, &grant).await.map_err(status_of)?;
        Ok(Response::new(pb::SubmitStressEventResponse {
            event_id: id.0,
            plan: Some(halftime_proto::plan_to_pb(&plan)),
        }))
    }

    async fn cancel_stress_event(
        &self,
        request: Request<pb::CancelStressEventRequest>,
    ) -> Result<Response<pb::CancelStressEventResponse>, Status> {
        let grant = self.operators.grant(&request)?;
        let r = request.into_inner();
        let n = self.engine.cancel(event_id(r.event_id)?, r.release_over_min, &grant).await.map_err(status_of)?;
        Ok(Response::new(pb::CancelStressEventResponse { n_released: n }))
    }

    type WatchEventStream = BoxStream<pb::EventProgress>;

    async fn watch_event(
        &self,
        request: Request<pb::WatchEventRequest>,
    ) -> Result<Response<Self::WatchEventStream>, Status> {
        self.operators.grant(&request)?;
        let mut rx = self.engine.watch(event_id(request.into_inner().event_id)?).map_err(status_of)?;
        let (tx, out) = tokio::sync::mpsc::channel(16);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            loop {
                let p = rx.borrow_and_update().clone();
                let closed = p.closed;
                if tx.send(Ok(halftime_proto::progress_to_pb(&p))).await.is_err() || closed {
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    () = engine.stopped() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn get_flexibility(
        &self,
        request: Request<pb::GetFlexibilityRequest>,
    ) -> Result<Response<pb::GetFlexibilityResponse>, Status> {
        self.operators.grant(&request)?;
        let r = request.into_inner();
        let region: RegionId = validate::region(&r.region, self.engine.regions(), "region").map_err(bad)?;
        if r.horizon_min == 0 || r.horizon_min > 240 {
            return Err(bad(FieldError::new("horizon_min", "must be 1..=240 minutes")));
        }
        let deferral = limit_count(r.deferral_min_max, 30, 120, "deferral_min_max").map_err(bad)?;
        let f = self.engine.flexibility(region, r.horizon_min, deferral);
        Ok(Response::new(pb::GetFlexibilityResponse {
            region: r.region,
            deferrable_mw: f.deferrable_w / 1e6,
            n_appliances_eligible: f.n_appliances_eligible,
            by_class: f
                .by_class
                .iter()
                .map(|(c, w, n)| pb::ClassFlexibility {
                    class: halftime_proto::class_to_pb(*c) as i32,
                    deferrable_mw: w / 1e6,
                    n_appliances_eligible: *n,
                })
                .collect(),
            as_of_unix_ms: f.as_of_unix_ms,
        }))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        self.operators.grant(&request)?;
        let limit = limit_count(request.into_inner().limit, 100, 1000, "limit").map_err(bad)?;
        let events = self
            .engine
            .list_events(limit as usize)
            .into_iter()
            .map(|e| pb::EventSummary {
                event_id: e.id.0,
                state: halftime_proto::state_to_pb(e.state) as i32,
                regions: e.spec.regions.iter().map(|r| self.engine.regions().code(*r).to_string()).collect(),
                start_unix_ms: e.spec.start_unix_ms,
                n_slots: e.spec.target_w.len() as u32,
                target_peak_mw: e.spec.target_peak_w() / 1e6,
                priority: halftime_proto::priority_to_pb(e.spec.priority) as i32,
                idempotency_key: e.spec.idempotency_key.clone(),
                n_appliances: e.plan.n_appliances,
            })
            .collect();
        Ok(Response::new(pb::ListEventsResponse { events }))
    }
}

fn event_id(id: u64) -> Result<halftime_core::EventId, Status> {
    if id == 0 {
        return Err(bad(FieldError::new("event_id", "must not be 0")));
    }
    Ok(halftime_core::EventId(id))
}

fn household_id(id: u64) -> Result<HouseholdId, Status> {
    validate::household_id(id, "household_id").map_err(bad)
}

#[derive(Clone, Debug)]
pub struct HouseholdService {
    engine: Engine,
}

#[tonic::async_trait]
impl Household for HouseholdService {
    async fn enrol_appliances(
        &self,
        request: Request<pb::EnrolAppliancesRequest>,
    ) -> Result<Response<pb::EnrolAppliancesResponse>, Status> {
        let r = request.into_inner();
        if r.appliances.is_empty() || r.appliances.len() > ENROL_BATCH_MAX {
            return Err(bad(FieldError::new("appliances", format!("need 1..={ENROL_BATCH_MAX} appliances"))));
        }
        let mut list = Vec::with_capacity(r.appliances.len());
        for (i, a) in r.appliances.iter().enumerate() {
            let prefix = format!("appliances[{i}]");
            let class = halftime_proto::class_from_pb(a.class, &format!("{prefix}.class")).map_err(bad)?;
            let input = validate::ApplianceInput {
                appliance_id: a.appliance_id,
                household_id: a.household_id,
                region: &a.region,
                class,
                rated_power_w: a.rated_power_w,
                duty_cycle_permille: a.duty_cycle_permille,
                deferral_min_max: a.deferral_min_max,
                override_rate_permille: a.override_rate_permille,
            };
            list.push(validate::appliance(&input, self.engine.regions(), &prefix).map_err(bad)?);
        }
        let (n_enrolled, n_updated) = self.engine.enrol(list).await.map_err(status_of)?;
        Ok(Response::new(pb::EnrolAppliancesResponse { n_enrolled, n_updated }))
    }

    async fn set_limits(
        &self,
        request: Request<pb::SetLimitsRequest>,
    ) -> Result<Response<pb::SetLimitsResponse>, Status> {
        let r = request.into_inner();
        let household = household_id(r.household_id)?;
        let limits = r.limits.ok_or_else(|| bad(FieldError::new("limits", "must be set")))?;
        let limits = halftime_proto::limits_from_pb(&limits, "limits").map_err(bad)?;
        let effective = self.engine.set_limits(household, limits).await.map_err(status_of)?;
        Ok(Response::new(pb::SetLimitsResponse { effective: Some(halftime_proto::limits_to_pb(&effective)) }))
    }

    async fn get_limits(
        &self,
        request: Request<pb::GetLimitsRequest>,
    ) -> Result<Response<pb::GetLimitsResponse>, Status> {
        let household = household_id(request.into_inner().household_id)?;
        let (own, effective) = self.engine.get_limits(household).map_err(status_of)?;
        Ok(Response::new(pb::GetLimitsResponse {
            own: Some(halftime_proto::limits_to_pb(&own)),
            effective: Some(halftime_proto::limits_to_pb(&effective)),
        }))
    }

    async fn r#override(
        &self,
        request: Request<pb::OverrideRequest>,
    ) -> Result<Response<pb::OverrideResponse>, Status> {
        let r = request.into_inner();
        let household = household_id(r.household_id)?;
        let appliance = (r.appliance_id != 0).then_some(ApplianceId(r.appliance_id));
        let n = self.engine.override_now(household, appliance).await.map_err(status_of)?;
        Ok(Response::new(pb::OverrideResponse { n_overridden: n }))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let r = request.into_inner();
        let household = household_id(r.household_id)?;
        let limit = limit_count(r.limit, 100, 1000, "limit").map_err(bad)?;
        let (entries, burden) = self.engine.history(household, limit as usize).map_err(status_of)?;
        Ok(Response::new(pb::GetHistoryResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::HistoryEntry {
                    event_id: e.event.0,
                    appliance_id: e.appliance.0,
                    class: halftime_proto::class_to_pb(e.class) as i32,
                    not_before_unix_ms: e.not_before_unix_ms,
                    not_after_unix_ms: e.not_after_unix_ms,
                    deferral_s: e.deferral_s,
                    status: halftime_proto::status_to_pb(e.status) as i32,
                })
                .collect(),
            burden_kw_min: burden,
        }))
    }
}

#[derive(Clone, Debug)]
pub struct DeviceLinkService {
    engine: Engine,
}

#[tonic::async_trait]
impl DeviceLink for DeviceLinkService {
    type AttachStream = BoxStream<pb::Downlink>;

    async fn attach(&self, request: Request<Streaming<pb::Uplink>>) -> Result<Response<Self::AttachStream>, Status> {
        let mut uplink = request.into_inner();
        let first = uplink
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("hello: the stream must start with a hello"))?;
        let Some(UpMsg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("hello: the stream must start with a hello"));
        };
        let devices: Vec<ApplianceId> = hello
            .device_ids
            .iter()
            .enumerate()
            .map(|(i, &d)| validate::appliance_id(d, &format!("hello.device_ids[{i}]")))
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        let (link, rx) = self.engine.attach(&devices).map_err(status_of)?;
        tracing::debug!(link, name = %hello.link_name, devices = devices.len(), "link attached");
        let engine = self.engine.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = uplink.message() => m,
                    () = engine.stopped() => break,
                };
                match next {
                    Ok(Some(pb::Uplink { msg: Some(UpMsg::Reports(batch)) })) => {
                        // A batch larger than a link should send is still all applied (its size is bounded by
                        // the message size), a bounded chunk at a time: a device's report is never dropped for
                        // arriving in company.
                        for (k, chunk) in batch.reports.chunks(REPORT_BATCH_MAX).enumerate() {
                            let mut invalid = 0u64;
                            let reports: Vec<_> = chunk
                                .iter()
                                .enumerate()
                                .filter_map(|(i, r)| {
                                    let field = || format!("reports[{}]", k * REPORT_BATCH_MAX + i);
                                    match halftime_proto::report_from_pb(r, field) {
                                        Ok((report, None)) => Some(report),
                                        Ok((report, Some(e))) => {
                                            invalid += 1;
                                            tracing::debug!(error = %e, "payback forecast dropped, report kept");
                                            Some(report)
                                        }
                                        Err(e) => {
                                            invalid += 1;
                                            tracing::debug!(error = %e, "device report dropped");
                                            None
                                        }
                                    }
                                })
                                .collect();
                            metrics::counter!("halftime_device_reports_invalid_total").increment(invalid);
                            if let Err(e) = engine.report(&reports).await {
                                tracing::error!(error = %e, "device reports");
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            engine.detach(link);
        });
        let ack = pb::HelloAck { n_devices: devices.len() as u32, key_ids: vec![self.engine.key_id()] };
        Ok(Response::new(downlinks(ack, rx)))
    }

    async fn resync(&self, request: Request<pb::ResyncRequest>) -> Result<Response<pb::ResyncResponse>, Status> {
        let device = validate::appliance_id(request.into_inner().device_id, "device_id").map_err(bad)?;
        let commands = self.engine.resync(device).map_err(status_of)?;
        Ok(Response::new(pb::ResyncResponse { commands: commands.iter().map(halftime_proto::command_to_pb).collect() }))
    }
}

/// A link's downlink: the hello's acknowledgement, then each batch of commands the head-end queues for it.
pub fn downlinks(ack: pb::HelloAck, rx: LinkReceiver) -> BoxStream<pb::Downlink> {
    let ack = pb::Downlink { msg: Some(pb::downlink::Msg::HelloAck(ack)) };
    let commands = ReceiverStream::new(rx).map(|batch| {
        Ok(pb::Downlink {
            msg: Some(pb::downlink::Msg::Commands(pb::CommandBatch {
                commands: batch.iter().map(halftime_proto::command_to_pb).collect(),
            })),
        })
    });
    Box::pin(tokio_stream::once(Ok(ack)).chain(commands))
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    engine: Engine,
    operators: Operators,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GridOperatorServer<GridOperatorService>>().await;
    health.set_serving::<HouseholdServer<HouseholdService>>().await;
    health.set_serving::<DeviceLinkServer<DeviceLinkService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(halftime_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let operators = Arc::new(operators);
    let grid = GridOperatorServer::new(GridOperatorService { engine: engine.clone(), operators })
        .max_decoding_message_size(MESSAGE_BYTES_MAX);
    let household =
        HouseholdServer::new(HouseholdService { engine: engine.clone() }).max_decoding_message_size(MESSAGE_BYTES_MAX);
    let link = DeviceLinkServer::new(DeviceLinkService { engine }).max_decoding_message_size(MESSAGE_BYTES_MAX);
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(1024)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(grid)
        .add_service(household)
        .add_service(link)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
