//! `halftime`: serve the engine, run a scenario, import appliances, or measure.

use anyhow::Context;
use clap::{Parser, Subcommand};
use halftime::config::Config;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "halftime", version, about = "Demand-response coordination engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API with the embedded store.
    Serve {
        /// TOML configuration (see deploy/halftime.example.toml); defaults apply without one.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Scenarios.
    Scenario {
        #[command(subcommand)]
        command: ScenarioCommand,
    },
    /// Enrol appliances from a CSV file over the Household API.
    Import {
        csv: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
    },
    /// Load generator: enrol N appliances behind gateway links, submit events, measure latency, throughput
    /// and memory.
    Bench {
        /// Population sizes in enrolled appliances, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100000")]
        appliances: Vec<u64>,
        /// Gateway links, at least.
        #[arg(long, default_value_t = 16)]
        gateways: usize,
        /// Unloaded events per size (1..=6).
        #[arg(long, default_value_t = 5)]
        repetitions: usize,
        /// Share of the population's expected reduction each event asks for.
        #[arg(long, default_value_t = 0.25)]
        target_share: f64,
        /// Small events per second in the steady-rate phase (0 skips it).
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// Length of the steady-rate phase, seconds.
        #[arg(long, default_value_t = 10.0)]
        loaded_s: f64,
        /// Scenario whose population mix to enrol.
        #[arg(long, default_value = "scenarios/wc2018-col-eng-halftime.toml")]
        population: PathBuf,
        /// Gateways verify every signature (device CPU on the same machine).
        #[arg(long)]
        verify: bool,
        /// One JSON object per measurement per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Target this engine instead of starting one.
        #[arg(long)]
        server: Option<String>,
        /// The remote engine's public key, hex, for `--verify`.
        #[arg(long)]
        trust_key: Option<String>,
    },
}

#[derive(Subcommand)]
enum ScenarioCommand {
    /// Run a scenario end to end.
    Run {
        scenario: PathBuf,
        /// Use this engine instead of starting one in-process.
        #[arg(long)]
        server: Option<String>,
        /// The remote engine's public key, hex (printed by `halftime serve`).
        #[arg(long)]
        trust_key: Option<String>,
        /// The remote engine's operator bearer token, if it has operators configured.
        #[arg(long)]
        token: Option<String>,
        /// Keep the in-process engine's data here.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Virtual minutes per real minute: overrides the scenario's in process; with `--server`, the served
        /// engine's clock speed (its `[clock] speed`, 1 by default).
        #[arg(long)]
        speed: Option<f64>,
        /// Use this seed instead of the scenario's: another draw of the same population and its behaviour.
        #[arg(long)]
        seed: Option<u64>,
        /// Write report.md, report.json and the plots (SVG) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print every minute instead of a progress bar.
        #[arg(long)]
        verbose: bool,
    },
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let mut config = match config {
                Some(p) => Config::load(&p)?,
                None => Config::default(),
            };
            init_tracing(&config.log);
            if !config.metrics_addr.is_empty() {
                let addr: std::net::SocketAddr = config.metrics_addr.parse().context("metrics_addr")?;
                metrics_exporter_prometheus::PrometheusBuilder::new()
                    .with_http_listener(addr)
                    .install()
                    .context("starting the metrics exporter")?;
                tracing::info!(%addr, "metrics on /metrics");
            }
            if config.operators.is_empty() {
                tracing::warn!("no operators configured: GridOperator calls are not authenticated");
            }
            let clock = config.clock().context("clock")?;
            if clock.speed() != 1.0 {
                tracing::warn!(speed = clock.speed(), "virtual time: the engine's clock is not the wall clock");
                config.fit_to_clock_speed(clock.speed());
            }
            let running = halftime::start(&config, &config.data_dir, config.grpc_addr, clock).await?;
            println!("halftime serving on {} (data in {})", running.url(), config.data_dir.display());
            println!(
                "engine signing key id {} public key {}",
                running.engine.key_id(),
                hex::encode(running.engine.public_key())
            );
            tokio::signal::ctrl_c().await?;
            tracing::info!("shutting down");
            running.stop().await;
        }
        Command::Scenario {
            command: ScenarioCommand::Run { scenario, server, trust_key, token, data_dir, speed, seed, out, verbose },
        } => {
            init_tracing("warn");
            let opts = halftime::scenario::RunOptions {
                server,
                trust_key,
                token,
                data_dir,
                speed,
                seed,
                out_dir: out,
                progress: !verbose,
                print_minutes: verbose,
            };
            let mut stdout = std::io::stdout();
            let report = halftime::scenario::run(&scenario, opts, &mut stdout).await?;
            anyhow::ensure!(report.violations == 0, "{} limit violations", report.violations);
        }
        Command::Bench {
            appliances,
            gateways,
            repetitions,
            target_share,
            rate,
            loaded_s,
            population,
            verify,
            json,
            server,
            trust_key,
        } => {
            init_tracing("warn");
            let opts = halftime::bench::BenchOptions {
                n_appliances: appliances,
                gateways,
                repetitions,
                target_share,
                rate_per_s: rate,
                loaded_s,
                population,
                verify,
                server,
                trust_key,
            };
            let mut all = Vec::new();
            halftime::bench::run(&opts, |m| {
                if json {
                    println!("{}", serde_json::to_string(m).expect("a measurement serialises"));
                } else {
                    eprintln!("{} {}: {:?} {:?} {:?} {}", m.name, m.n_appliances, m.p50, m.p99, m.value, m.unit);
                }
                all.push(m.clone());
            })
            .await?;
            if !json {
                print!("{}", halftime::bench::table(&all));
            }
        }
        Command::Import { csv, server } => {
            init_tracing("warn");
            let t0 = std::time::Instant::now();
            let (enrolled, updated) = halftime::import::import_csv(&csv, &server).await?;
            println!("{enrolled} enrolled, {updated} updated in {:.2} s", t0.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
