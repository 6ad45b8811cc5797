#[lockgate_sdk::handler]
fn handle(_msg: lockgate_sdk::Message) {}

fn main() {}
