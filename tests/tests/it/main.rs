//! The one integration test binary: the real server, real clients.

mod smoke;
