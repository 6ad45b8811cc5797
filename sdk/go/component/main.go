// Command component is the wasm module's main package: the generated package wit_exports holds
// the //go:wasmexport functions. Built with -buildmode=c-shared, so main never runs; package
// initialisation runs once per instance, in _initialize.
package main

import _ "lockgate/bindings/exports/wit_exports"

func main() {}
