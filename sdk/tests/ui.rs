//! Wrong handler signatures fail to compile with an error on the offending tokens.

#[test]
fn handler_signature_errors() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
