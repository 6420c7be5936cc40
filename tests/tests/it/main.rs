//! The one integration test binary: the real server, real clients.

mod auth;
mod bad_input;
mod cli;
mod client;
mod deliveries;
mod faults;
mod handover;
mod hostile;
mod integrity;
mod isolation;
mod lifecycle;
mod nudge;
mod observability;
mod openapi;
mod operations;
mod refresh;
mod replay;
mod restart;
mod scaling;
mod slow_reader;
mod smoke;
mod sockets;
mod steer;
mod streams;
mod tail;
mod tidy;
