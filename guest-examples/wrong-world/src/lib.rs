//! Not a lockgate handler: exports `process` instead of `handle` and imports an interface the
//! host does not provide. `lockgate check` must name both problems.

wit_bindgen::generate!({
    inline: r#"
        package acme:other@1.0.0;

        interface vault {
            get-secret: func(name: string) -> string;
        }

        world other {
            import vault;
            export process: func(payload: list<u8>) -> bool;
        }
    "#,
});

struct Other;

impl Guest for Other {
    fn process(payload: Vec<u8>) -> bool {
        !payload.is_empty() && !acme::other::vault::get_secret("db").is_empty()
    }
}

export!(Other);
