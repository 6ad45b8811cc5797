//! The Go router example (guest-examples/go/router, built by `lockgate build`) against
//! the router fixture shared with the Rust example. The build script installs a missing
//! toolchain (minutes the first time), so a machine without one fails here rather than skipping.

mod guest_lang;

#[test]
fn go_router_matches_the_router_fixture() {
    guest_lang::router_matches_fixture("go");
}
