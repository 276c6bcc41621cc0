//! The `celeriac` binary: the worker with its built-in diagnostic tasks.

#![forbid(unsafe_code)]

fn main() {
    celeriac::App::new().run()
}
