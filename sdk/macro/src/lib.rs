//! The `#[handler]` attribute of `lockgate-sdk`. Use it as `#[lockgate_sdk::handler]`; this crate
//! is an implementation detail of the SDK.

use proc_macro::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, parse_macro_input};

const SIGNATURE: &str = "expected `fn(lockgate_sdk::Message) -> Result<(), lockgate_sdk::Error>`";

/// Marks the function that handles each message: `fn handle(msg: Message) -> Result<(), Error>`
/// (any name).
///
/// The function stays an ordinary function, callable from tests. Next to it the attribute adds a
/// hidden module that implements the component's `handle` export by converting the message,
/// calling the function and converting its result. A component has exactly one handler: a
/// second `#[handler]` in the same module is a compile error, and elsewhere in the crate a link
/// error. The crate must depend on `lockgate-sdk` under that name.
///
/// ```text
/// #[lockgate_sdk::handler]
/// fn handle(msg: lockgate_sdk::Message) -> Result<(), lockgate_sdk::Error> {
///     Ok(())
/// }
/// ```
#[proc_macro_attribute]
pub fn handler(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr = proc_macro2::TokenStream::from(attr);
    let func = parse_macro_input!(item as ItemFn);
    match expand(attr, func) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand(attr: proc_macro2::TokenStream, func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    if !attr.is_empty() {
        return Err(syn::Error::new_spanned(
            attr,
            "`#[lockgate_sdk::handler]` takes no arguments",
        ));
    }
    check_signature(&func)?;

    let name = &func.sig.ident;
    // The export calls the handler through this typed constant, so a wrong argument or return
    // type is reported once, on the user's signature, rather than deep inside generated code.
    let typed_handler = quote_spanned! {func.sig.span()=>
        #[doc(hidden)]
        const __LOCKGATE_HANDLER: fn(::lockgate_sdk::Message)
            -> ::core::result::Result<(), ::lockgate_sdk::Error> = #name;
    };

    Ok(quote! {
        #func

        #typed_handler

        // Fixed names make a second handler in the same module a compile error instead of a
        // duplicate `handle` export at link time.
        #[doc(hidden)]
        mod __lockgate_handler {
            struct Handler;

            impl ::lockgate_sdk::__private::Guest for Handler {
                fn handle(
                    message: ::lockgate_sdk::__private::WitMessage,
                ) -> ::core::result::Result<(), ::lockgate_sdk::__private::WitHandlerError> {
                    ::lockgate_sdk::__private::run_handler(message, super::__LOCKGATE_HANDLER)
                }
            }

            ::lockgate_sdk::__private::bindings::__lockgate_export_handler!(Handler);
        }
    })
}

fn check_signature(func: &ItemFn) -> syn::Result<()> {
    let sig = &func.sig;
    if let Some(asyncness) = &sig.asyncness {
        return Err(syn::Error::new_spanned(
            asyncness,
            "a lockgate handler cannot be `async`: the host calls it synchronously",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        return Err(syn::Error::new_spanned(
            unsafety,
            "a lockgate handler cannot be `unsafe`",
        ));
    }
    if let Some(abi) = &sig.abi {
        return Err(syn::Error::new_spanned(
            abi,
            "a lockgate handler cannot declare an ABI; the attribute generates the export",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "a lockgate handler cannot be generic",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        return Err(syn::Error::new_spanned(variadic, SIGNATURE));
    }
    if sig.inputs.len() != 1 {
        let message = format!(
            "a lockgate handler takes exactly one argument (the message), found {}; {SIGNATURE}",
            sig.inputs.len()
        );
        return Err(if sig.inputs.is_empty() {
            syn::Error::new_spanned(sig, message)
        } else {
            syn::Error::new_spanned(&sig.inputs, message)
        });
    }
    if let Some(FnArg::Receiver(receiver)) = sig.inputs.first() {
        return Err(syn::Error::new_spanned(
            receiver,
            "a lockgate handler must be a free function, not a method",
        ));
    }
    if let ReturnType::Default = sig.output {
        return Err(syn::Error::new_spanned(
            sig,
            format!("a lockgate handler must return a result; {SIGNATURE}"),
        ));
    }
    Ok(())
}
