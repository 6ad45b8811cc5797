#[lockgate_sdk::handler]
async fn handle(_msg: lockgate_sdk::Message) -> Result<(), lockgate_sdk::Error> {
    Ok(())
}

fn main() {}
