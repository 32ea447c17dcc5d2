//! `tidepool-operator`: lands with issue 3. Until then it says so and exits non-zero.
fn main() {
    eprintln!("tidepool-operator: not implemented yet (see issue 3)");
    std::process::exit(2);
}
