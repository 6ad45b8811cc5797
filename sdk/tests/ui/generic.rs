#[lockgate_sdk::handler]
fn handle<T>(_msg: lockgate_sdk::Message) -> Result<(), lockgate_sdk::Error> {
    Ok(())
}

fn main() {}
