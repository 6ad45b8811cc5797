#[lockgate_sdk::handler]
fn handle() -> Result<(), lockgate_sdk::Error> {
    Ok(())
}

fn main() {}
