use lockgate_sdk::{Error, Message};

#[lockgate_sdk::handler]
fn first(_msg: Message) -> Result<(), Error> {
    Ok(())
}

#[lockgate_sdk::handler]
fn second(_msg: Message) -> Result<(), Error> {
    Ok(())
}

fn main() {}
