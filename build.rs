//! Embeds the versions of key dependencies (from Cargo.lock) and the git commit of the build,
//! so every run manifest says exactly what produced it.

fn main() {
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    for krate in ["candle-core", "tokenizers", "safetensors"] {
        let version = lock
            .split("[[package]]")
            .find(|block| block.contains(&format!("name = \"{krate}\"\n")))
            .and_then(|block| block.lines().find(|l| l.starts_with("version = ")))
            .map(|l| {
                l.trim_start_matches("version = ")
                    .trim_matches('"')
                    .to_string()
            })
            .unwrap_or_else(|| "unknown".into());
        println!(
            "cargo:rustc-env=LORASFT_DEP_{}={version}",
            krate.replace('-', "_").to_uppercase()
        );
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    println!(
        "cargo:rustc-env=LORASFT_GIT_COMMIT={commit}{}",
        if dirty { "-dirty" } else { "" }
    );
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
}
