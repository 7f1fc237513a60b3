//! `viworks-host`: parses the command line and hands over to the library.

fn main() -> std::process::ExitCode {
    viworks_host::cli::main()
}
