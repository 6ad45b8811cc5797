//! The C router example (guest-examples/c/router, built by `lockgate build`) against the
//! router fixture shared with the Rust example. The build script installs a missing toolchain,
//! so a machine without one fails here rather than skipping.

mod guest_lang;

#[test]
fn c_router_matches_the_router_fixture() {
    guest_lang::router_matches_fixture("c");
}
