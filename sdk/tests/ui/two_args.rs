#[lockgate_sdk::handler]
fn handle(_msg: lockgate_sdk::Message, _extra: u32) -> Result<(), lockgate_sdk::Error> {
    Ok(())
}

fn main() {}
