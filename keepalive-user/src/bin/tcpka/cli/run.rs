//! Dispatch: each subcommand is a function in its own module, which calls
//! the library and prints its result.
use tcpka::{paths::PinLayout, Error};

use super::{
    apply::{apply, reload},
    args::{Cli, Command},
    check::check,
    close::close,
    completions::{completions, manpages},
    doctor::doctor,
    enable::{disable, enable},
    fleet::fleet,
    info::info,
    load::{load, prepare, unload},
    output::runtime,
    rule::rule,
    serve::serve,
    status::status,
    trace::trace,
    watch::watch,
};

pub(crate) fn run(cli: Cli) -> Result<(), Error> {
    let layout = PinLayout::new(cli.pin_dir);
    match cli.command {
        Command::Load(args) => load(&layout, args),
        Command::Unload => unload(&layout),
        Command::Rule(command) => rule(layout, command),
        Command::Enable(a) => enable(layout, a),
        Command::Disable(a) => disable(layout, a),
        Command::Close(a) => close(layout, a),
        Command::Status(a) => status(layout, a),
        Command::Info(a) => info(layout, a),
        Command::Doctor(a) => doctor(&layout, a),
        Command::Serve(a) => serve(layout, *a),
        Command::Watch(a) => runtime()?.block_on(watch(&layout, a)),
        Command::Apply(a) => apply(layout, a),
        Command::Check(a) => check(a),
        Command::Reload => reload(&layout),
        Command::Trace(a) => trace(layout, a),
        Command::Fleet(a) => fleet(*a),
        Command::Completions { shell } => completions(shell),
        Command::Manpages { dir } => manpages(&dir),
        Command::Prepare(a) => prepare(&layout, a),
    }
}
