//! Which shared libraries this process has mapped, read from `/proc/self/maps`: the loader's
//! own account, independent of what the binary asked for.

use std::path::PathBuf;

/// The path of the loaded library whose file name is `name` or `name.VERSION`
/// (`libnccl.so` matches `libnccl.so.2`).
pub fn loaded(name: &str) -> Option<PathBuf> {
    loaded_libraries().into_iter().find(|path| {
        path.file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|file| file == name || file.strip_prefix(name).is_some_and(|rest| rest.starts_with('.')))
    })
}

/// Every file mapped into this process that looks like a shared library, once each.
pub fn loaded_libraries() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut paths: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else { continue };
        if path.starts_with('/') && path.contains(".so") {
            let path = PathBuf::from(path);
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_c_library_is_found_by_its_unversioned_name() {
        let libc = loaded("libc.so").expect("libc.so.6 is mapped");
        assert!(libc.to_string_lossy().contains("libc.so.6"));
        assert!(loaded("libc.s").is_none());
    }
}
