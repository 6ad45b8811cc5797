//! The C examples, built by `lockgate build`: the router against the router fixture shared
//! with the Rust example, enrich against a real HTTP server beside the Rust enrich, the HTTP
//! probe against the same server, and the SQL ledger beside the Rust ledger on PostgreSQL. The
//! build script installs a missing toolchain, so a machine without one fails here rather than
//! skipping.

mod guest_lang;

#[test]
fn c_router_matches_the_router_fixture() {
    guest_lang::router_matches_fixture("c");
}

#[test]
fn c_enrich_passes_the_shared_enrich_fixture_on_stubs() {
    guest_lang::enrich_matches_fixture("c");
}

#[path = "guest_lang/http.rs"]
mod http;

#[test]
fn c_enrich_calls_the_customer_service_like_the_rust_example() {
    http::enrich_behaves_like_the_rust_example("c");
}

#[test]
fn c_http_probe_sends_bodies_and_follows_redirects_like_the_rust_helper() {
    http::probe_sends_bodies_and_follows_redirects_like_the_rust_helper("c");
}

#[path = "guest_lang/sql.rs"]
mod sql;

#[test]
fn c_ledger_matches_the_rust_example() {
    sql::ledger_matches_the_rust_example("c");
}
