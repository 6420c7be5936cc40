//! The one integration test binary: the real server, real clients.

mod openapi;
mod smoke;
mod tidy;
