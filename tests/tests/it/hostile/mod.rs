//! Issue 11: hostile clients at the edge. One file per finding, each test with
//! the attack and the answer the contract (`docs/PROTOCOL.md`) gives it.
//! Limits are set through their `THREADLINE_*` variables, small enough that
//! each attack takes a second, not a production-sized minute.

mod f10_queries;
