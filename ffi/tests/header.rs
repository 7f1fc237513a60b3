//! The checked-in C header is what cbindgen makes of the current source.

use std::path::Path;

fn generate() -> String {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn the_checked_in_header_is_fresh() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/viworks.h");
    let generated = generate();
    if std::env::var_os("VIWORKS_WRITE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("writes include/viworks.h");
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == generated,
        "ffi/include/viworks.h is stale: regenerate it with \
         `VIWORKS_WRITE_HEADER=1 cargo test -p viworks-ffi --test header` and commit it"
    );
}
