//! End to end: a real engine serving gRPC on a loopback port, real device clients (the SDK) behind gateway
//! links, a real store in a temporary directory.

mod bench;
mod harness;
mod invalid;
mod main_path;
mod restart;
mod scenario;
mod tooling;
