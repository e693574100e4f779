//! Base models: Hugging Face directories under the models root, addressed by their relative
//! path (`tiny-qwen3`, `Qwen/Qwen3-0.6B`). A name is checked before it becomes a path.

use std::path::{Path, PathBuf};

use lathe_core::ModelName;

/// The directory of base model `name`, if a model lives there.
pub fn resolve(models_root: &Path, name: &ModelName) -> Option<PathBuf> {
    let dir = name.dir_under(models_root);
    dir.join("config.json").is_file().then_some(dir)
}

/// [`resolve`] for a name from a request (a path segment, an evaluation's `model`).
pub fn resolve_str(models_root: &Path, name: &str) -> Option<PathBuf> {
    resolve(models_root, &ModelName::parse(name).ok()?)
}

/// Every base model under the root (`name`, created as Unix seconds), sorted by name.
pub fn list(models_root: &Path) -> Vec<(String, i64)> {
    let mut found = Vec::new();
    collect(models_root, "", 0, &mut found);
    found.sort();
    found
}

fn collect(dir: &Path, prefix: &str, depth: usize, found: &mut Vec<(String, i64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(|n| format!("{prefix}{n}")) else { continue };
        if !path.is_dir() || ModelName::parse(&name).is_err() {
            continue;
        }
        let config = path.join("config.json");
        if let Ok(meta) = std::fs::metadata(&config) {
            let created = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs() as i64);
            found.push((name, created));
        } else if depth == 0 {
            collect(&path, &format!("{name}/"), 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_root_are_refused() {
        let root = Path::new("/models");
        for bad in ["", "..", "../etc", "a/../b", "/abs", "a/b/c", ".hidden", "a b", "a\\b"] {
            assert!(resolve_str(root, bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn models_are_found_one_or_two_levels_down() {
        let root = std::env::temp_dir().join(format!("lathe-models-{}", std::process::id()));
        for dir in ["tiny", "Org/big", "Org/not-a-model"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("tiny/config.json"), "{}").unwrap();
        std::fs::write(root.join("Org/big/config.json"), "{}").unwrap();
        let names: Vec<String> = list(&root).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["Org/big", "tiny"]);
        assert!(resolve_str(&root, "tiny").is_some() && resolve_str(&root, "Org/not-a-model").is_none());
        std::fs::remove_dir_all(root).unwrap();
    }
}
