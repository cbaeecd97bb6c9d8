//! Head-end delivery at 100 k and 1 M commands over 16 gateway links, two ways:
//!
//! - `headend_deliver`: in process, commands queued with `enqueue` until every one has come out of a link's
//!   queue. No transport: the ceiling.
//! - `headend_grpc`: the same through 16 gateways attached over gRPC on loopback, each acknowledging every
//!   batch as a real gateway does, until the gateways have received every command. No signatures are checked
//!   (the signer benchmark measures that); `halftime bench` measures the whole engine's path (`headend_throughput`).

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use halftime_core::{ApplianceId, CommandKind, DeferralCommand, EventId, SignedCommand};
use halftime_headend::{HeadEnd, HeadEndConfig};
use halftime_proto::pb;
use halftime_proto::pb::device_link_client::DeviceLinkClient;
use halftime_proto::pb::device_link_server::{DeviceLink, DeviceLinkServer};
use halftime_proto::pb::uplink::Msg as UpMsg;
use halftime_server::MESSAGE_BYTES_MAX;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const N_LINKS: u64 = 16;
const NOW_UNIX_MS: i64 = 1_800_000_000_000 - 60_000;

fn command(device: u64, counter: u64) -> SignedCommand {
    SignedCommand {
        command: DeferralCommand {
            kind: CommandKind::Defer,
            key_id: 1,
            device: ApplianceId(device),
            event: EventId(1),
            counter,
            not_before_unix_ms: 1_800_000_000_000,
            not_after_unix_ms: 1_800_000_630_000,
            deferral_s: 600,
            randomize_start_s: 30,
        },
        signature: [7; 64],
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut g = c.benchmark_group("headend_deliver");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for n in [100_000u64, 1_000_000] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(BenchmarkId::new("16_links", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    // Queues deep enough for the whole burst: this measures the head-end, not backpressure.
                    let config = HeadEndConfig { link_queue_batches: 2_048, ..HeadEndConfig::default() };
                    let headend = HeadEnd::new(config);
                    let now = NOW_UNIX_MS;
                    let mut drains = Vec::new();
                    for l in 0..N_LINKS {
                        let devices: Vec<ApplianceId> = (0..n).filter(|d| d % N_LINKS == l).map(ApplianceId).collect();
                        let (_, mut rx) = headend.attach(&devices, now);
                        drains.push(rt.spawn(async move {
                            let mut got = 0u64;
                            while let Some(batch) = rx.recv().await {
                                got += batch.len() as u64;
                            }
                            got
                        }));
                    }
                    let commands: Vec<SignedCommand> = (0..n).map(|d| command(d, i * n + d + 1)).collect();
                    let t0 = std::time::Instant::now();
                    headend.enqueue(&commands, now);
                    // Dropping the head-end closes the links once their queues are read out.
                    drop(headend);
                    let got: u64 = rt.block_on(async {
                        let mut sum = 0;
                        for d in drains {
                            sum += d.await.unwrap();
                        }
                        sum
                    });
                    total += t0.elapsed();
                    assert_eq!(got, n);
                }
                total
            })
        });
    }
    g.finish();
}

/// The server's `DeviceLink` attach path over a bare head-end: the hello attaches the link, receipts are
/// acknowledged to the head-end, batches go out as protobuf. What the engine adds on top (the ledger's
/// bookkeeping of reports) is left out, so this measures the head-end and the transport.
struct LinkOverHeadEnd {
    headend: Arc<HeadEnd>,
}

#[tonic::async_trait]
impl DeviceLink for LinkOverHeadEnd {
    type AttachStream = halftime_server::BoxStream<pb::Downlink>;

    async fn attach(&self, request: Request<Streaming<pb::Uplink>>) -> Result<Response<Self::AttachStream>, Status> {
        let mut uplink = request.into_inner();
        let Some(pb::Uplink { msg: Some(UpMsg::Hello(hello)) }) = uplink.message().await? else {
            return Err(Status::invalid_argument("hello: the stream must start with a hello"));
        };
        let devices: Vec<ApplianceId> = hello.device_ids.iter().map(|&d| ApplianceId(d)).collect();
        let (_, rx) = self.headend.attach(&devices, NOW_UNIX_MS);
        let headend = Arc::clone(&self.headend);
        tokio::spawn(async move {
            while let Ok(Some(pb::Uplink { msg: Some(UpMsg::Reports(batch)) })) = uplink.message().await {
                for r in &batch.reports {
                    headend.ack(ApplianceId(r.device_id), r.counter);
                }
            }
        });
        let ack = pb::HelloAck { n_devices: devices.len() as u32, key_ids: vec![1] };
        Ok(Response::new(halftime_server::downlinks(ack, rx)))
    }

    async fn resync(&self, request: Request<pb::ResyncRequest>) -> Result<Response<pb::ResyncResponse>, Status> {
        let device = ApplianceId(request.into_inner().device_id);
        let commands = self.headend.active_for(device, NOW_UNIX_MS);
        Ok(Response::new(pb::ResyncResponse { commands: commands.iter().map(halftime_proto::command_to_pb).collect() }))
    }
}

/// A gateway: attaches `devices`, counts every command it receives into `received` and acknowledges each
/// batch with one report per command, as a real gateway does.
async fn gateway(url: String, devices: Vec<u64>, received: Arc<Received>) -> tokio::task::JoinHandle<()> {
    let mut client = DeviceLinkClient::connect(url)
        .await
        .expect("connecting a gateway")
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let (tx, rx) = mpsc::channel::<pb::Uplink>(64);
    let hello = pb::Hello { link_name: "bench".into(), device_ids: devices };
    tx.send(pb::Uplink { msg: Some(UpMsg::Hello(hello)) }).await.expect("sending the hello");
    let mut downlink = client.attach(ReceiverStream::new(rx)).await.expect("attaching").into_inner();
    let first = downlink.message().await.expect("the hello ack").and_then(|m| m.msg);
    assert!(matches!(first, Some(pb::downlink::Msg::HelloAck(_))), "the server did not acknowledge the hello");
    tokio::spawn(async move {
        while let Ok(Some(message)) = downlink.message().await {
            let Some(pb::downlink::Msg::Commands(batch)) = message.msg else {
                continue;
            };
            let reports = batch
                .commands
                .iter()
                .map(|c| pb::StatusReport {
                    device_id: c.device_id,
                    event_id: c.event_id,
                    counter: c.counter,
                    status: pb::DeviceStatus::Received as i32,
                    at_unix_ms: NOW_UNIX_MS,
                    ..Default::default()
                })
                .collect();
            received.add(batch.commands.len() as u64);
            if tx.send(pb::Uplink { msg: Some(UpMsg::Reports(pb::ReportBatch { reports })) }).await.is_err() {
                return;
            }
        }
    })
}

#[derive(Default)]
struct Received {
    n: AtomicU64,
    changed: Notify,
}

impl Received {
    fn add(&self, n: u64) {
        self.n.fetch_add(n, Ordering::Relaxed);
        self.changed.notify_one();
    }

    async fn wait_for(&self, n: u64) {
        loop {
            let notified = self.changed.notified();
            if self.n.load(Ordering::Relaxed) >= n {
                return;
            }
            notified.await;
        }
    }
}

/// Enqueue until the gateways have received every command, through 16 gateway links over gRPC on loopback.
/// Server, links and command set are built outside the timed part; each iteration has a fresh head-end.
fn bench_grpc(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut g = c.benchmark_group("headend_grpc");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for n in [100_000u64, 1_000_000] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(BenchmarkId::new("16_gateways_loopback", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    total += rt.block_on(deliver_over_grpc(n, i));
                }
                total
            })
        });
    }
    g.finish();
}

async fn deliver_over_grpc(n: u64, iteration: u64) -> Duration {
    // Link queues deep enough for the whole burst, as in the in-process group.
    let headend = HeadEnd::new(HeadEndConfig { link_queue_batches: 2_048, ..HeadEndConfig::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = DeviceLinkServer::new(LinkOverHeadEnd { headend: Arc::clone(&headend) })
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let server = tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async {
            let _ = stop_rx.await;
        },
    ));
    let received = Arc::new(Received::default());
    let mut gateways = Vec::new();
    for l in 0..N_LINKS {
        let devices: Vec<u64> = (0..n).filter(|d| d % N_LINKS == l).collect();
        gateways.push(gateway(url.clone(), devices, Arc::clone(&received)).await);
    }
    let commands: Vec<SignedCommand> = (0..n).map(|d| command(d, iteration * n + d + 1)).collect();
    let t0 = std::time::Instant::now();
    let deferred = headend.enqueue(&commands, NOW_UNIX_MS);
    assert_eq!(deferred, 0, "a link queue filled: the measurement would wait on retries");
    received.wait_for(n).await;
    let elapsed = t0.elapsed();
    assert_eq!(received.n.load(Ordering::Relaxed), n, "a command was delivered twice");
    let _ = stop_tx.send(());
    drop(headend);
    for gw in gateways {
        gw.abort();
    }
    let _ = server.await;
    elapsed
}

criterion_group!(benches, bench, bench_grpc);
criterion_main!(benches);
