#[lockgate_sdk::handler]
fn handle(_msg: String) -> Result<(), String> {
    Ok(())
}

fn main() {}
