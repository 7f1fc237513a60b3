//! `viworks-loadgen`: the end-to-end load generator. Everything is in
//! `viworks_benches::loadgen`; see `docs/performance.md` for how to run it.

fn main() -> std::process::ExitCode {
    viworks_benches::loadgen::cli::main()
}
