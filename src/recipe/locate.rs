//! Finding a dotted key path (`training.learning_rate`) in block-style YAML text, so errors
//! found after parsing can still name a line and column.

/// The 1-based line and column of the last key of `path`, if present.
pub fn locate_key(text: &str, path: &str) -> Option<(usize, usize)> {
    let keys: Vec<&str> = path
        .split('.')
        .filter(|k| !k.is_empty() && !k.starts_with('['))
        .collect();
    if keys.is_empty() {
        return None;
    }
    let mut parent_indent: isize = -1;
    let mut found = None;
    let mut start_line = 0usize;
    let lines: Vec<&str> = text.lines().collect();
    'keys: for key in keys {
        let mut i = start_line;
        while i < lines.len() {
            let line = lines[i];
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                i += 1;
                continue;
            }
            let indent = (line.len() - trimmed.len()) as isize;
            if found.is_some() && indent <= parent_indent {
                return None;
            }
            let body = trimmed.strip_prefix("- ").unwrap_or(trimmed);
            let extra = (trimmed.len() - body.len()) as isize;
            if let Some(rest) = body.strip_prefix(key) {
                if rest.trim_start().starts_with(':') && indent > parent_indent {
                    parent_indent = indent + extra;
                    found = Some((i + 1, (indent + extra) as usize + 1));
                    start_line = i + 1;
                    continue 'keys;
                }
            }
            i += 1;
        }
        return None;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys() {
        let y = "task: pretrain\nmodel:\n  from: x\ntraining:\n  # lr\n  learning_rate: -1\n  seed: 3\ndata:\n  seed: 4\n";
        assert_eq!(locate_key(y, "training.learning_rate"), Some((6, 3)));
        assert_eq!(locate_key(y, "training.seed"), Some((7, 3)));
        assert_eq!(locate_key(y, "data.seed"), Some((9, 3)));
        assert_eq!(locate_key(y, "model"), Some((2, 1)));
        assert_eq!(locate_key(y, "training.nope"), None);
    }
}
