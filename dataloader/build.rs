//! Compiles the JPEG window decoder (`csrc/jpeg_window.c`) against libjpeg-turbo's libjpeg
//! API and links libjpeg statically (Debian: `libjpeg62-turbo-dev`), so that the binaries need
//! no JPEG library at run time.

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_window.c");
    let hint = "taming-dataloader needs libjpeg-turbo's development files \
                (Debian: apt-get install libjpeg62-turbo-dev pkg-config)";
    let lib = pkg_config::Config::new()
        .cargo_metadata(false)
        .probe("libjpeg")
        .unwrap_or_else(|e| panic!("{hint}: {e}"));
    let libdir =
        pkg_config::get_variable("libjpeg", "libdir").unwrap_or_else(|e| panic!("{hint}: {e}"));
    cc::Build::new()
        .file("csrc/jpeg_window.c")
        .includes(&lib.include_paths)
        .warnings(true)
        .compile("taming_jpeg_window");
    println!("cargo:rustc-link-search=native={libdir}");
    println!("cargo:rustc-link-lib=static=jpeg");
}
