//! The crate's modules form layers: no two top-level modules depend on each other, directly
//! or through others. Reads `src/` (the library, not the binaries), takes every `crate::`
//! path outside comments and test modules as an edge from the file's top-level module to the
//! one it names, and fails on any cycle with the edges that make it. `ids` and `flags` (the
//! value parsers of the configuration sections) are leaves, `redis_keys` needs only `ids`.
//!
//! `cargo test --test module_graph -- --nocapture` prints the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` module (which sits at
/// the end of the file in this crate).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names through `crate::`, including inside
/// `use crate::{a::X, b}` groups.
fn named_modules(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split at commas outside nested braces.
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(group[start..].trim_start()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(group[start..].trim_start()));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

/// Edges between top-level modules (`bus/redis.rs` belongs to `bus`).
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.iter().next().unwrap().to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if ["bin", "main", "lib"].contains(&top.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let targets = graph.entry(top.clone()).or_default();
        for module in named_modules(&code(&text)) {
            if module != top {
                targets.insert(module);
            }
        }
    }
    graph
}

/// The strongly connected components with more than one module (Tarjan's algorithm).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

#[test]
fn top_level_modules_form_no_cycles() {
    let graph = edges();
    for (from, to) in &graph {
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        println!("{from} -> {}", to.join(" "));
    }
    let found = cycles(&graph);
    let explain = |cycle: &Vec<String>| -> Vec<String> {
        let mut lines = Vec::new();
        for a in cycle {
            for b in cycle {
                if graph[a].contains(b) {
                    lines.push(format!("{a} -> {b}"));
                }
            }
        }
        lines
    };
    assert!(
        found.is_empty(),
        "module cycles: {:?}",
        found.iter().map(explain).collect::<Vec<_>>()
    );
    assert!(
        graph["ids"].is_empty(),
        "ids must stay a leaf: {:?}",
        graph["ids"]
    );
    assert!(
        graph["redis_keys"].iter().all(|m| m == "ids"),
        "redis_keys names keys and encodings only: {:?}",
        graph["redis_keys"]
    );
    assert!(
        graph["flags"].is_empty(),
        "flags (the value parsers of every configuration section) must stay a leaf: {:?}",
        graph["flags"]
    );
}

#[test]
fn the_parser_sees_grouped_and_plain_paths() {
    let code = code(
        "use crate::{a::X, b, c::{D, E}};\n// crate::commented\nfn f() { crate::d::g(); }\n\
         #[cfg(test)]\nmod tests { use crate::e; }",
    );
    let found: Vec<String> = named_modules(&code).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d"]);
    let mut graph = BTreeMap::new();
    graph.insert("x".to_string(), BTreeSet::from(["y".to_string()]));
    graph.insert("y".to_string(), BTreeSet::from(["z".to_string()]));
    graph.insert("z".to_string(), BTreeSet::from(["x".to_string()]));
    graph.insert("w".to_string(), BTreeSet::from(["x".to_string()]));
    assert_eq!(cycles(&graph), [["x", "y", "z"]]);
}
