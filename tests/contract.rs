//! `docs/contract.md`, the JSON Schemas and the code agree on the contract's closed sets:
//! the error codes (with their retryability), the control refusal codes and the subjects.
//! The doc's tables are parsed (a code mentioned in passing elsewhere does not count), the
//! code's subjects are read from the string literals of its non-test sources, and every
//! citation of a section of docs/contract.md in the repository must name one it has.
//!
//! Needs no service: it reads files only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use signer_actors::audit::ControlRefusal;
use signer_actors::error::ErrorCode;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn schema(file: &str) -> serde_json::Value {
    serde_json::from_str(&read(&format!("schemas/{file}")))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

// ---------------------------------------------------------------------------------------
// The doc: sections by heading, tables in a section.

/// One section of a markdown document: its heading's anchor and its own lines (up to the
/// next heading of any level).
struct Section {
    anchor: String,
    lines: Vec<String>,
}

/// The anchor GitHub gives a heading: lower case, punctuation other than `-` and `_` dropped,
/// spaces turned into `-`.
fn anchor_of(title: &str) -> String {
    title
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn sections(markdown: &str) -> Vec<Section> {
    let mut out = vec![Section {
        anchor: String::new(),
        lines: Vec::new(),
    }];
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !fenced && (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let mut anchor = anchor_of(&line[hashes..]);
            // repeated headings get -1, -2, ... as on GitHub
            let base = anchor.clone();
            let mut n = 0;
            while out.iter().any(|s| s.anchor == anchor) {
                n += 1;
                anchor = format!("{base}-{n}");
            }
            out.push(Section {
                anchor,
                lines: Vec::new(),
            });
        } else if let Some(last) = out.last_mut() {
            last.lines.push(line.to_string());
        }
    }
    out
}

fn section<'a>(doc: &'a [Section], anchor: &str) -> &'a Section {
    doc.iter()
        .find(|s| s.anchor == anchor)
        .unwrap_or_else(|| panic!("docs/contract.md has no section #{anchor}"))
}

/// A markdown table: its header cells and its rows.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// The cells of the column named `name`.
    fn column(&self, name: &str) -> Option<Vec<&str>> {
        let i = self.header.iter().position(|h| h == name)?;
        Some(self.rows.iter().map(|r| r[i].as_str()).collect())
    }
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

fn tables(section: &Section) -> Vec<Table> {
    let mut out = Vec::new();
    let mut lines = section.lines.iter().peekable();
    while let Some(line) = lines.next() {
        if !line.trim_start().starts_with('|') {
            continue;
        }
        let header = cells(line);
        let separator = lines
            .next()
            .unwrap_or_else(|| panic!("#{}: a table without rows", section.anchor));
        assert!(
            cells(separator)
                .iter()
                .all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':'))),
            "#{}: the line after a table header is not a separator: {separator}",
            section.anchor
        );
        let mut rows = Vec::new();
        while let Some(row) = lines.next_if(|l| l.trim_start().starts_with('|')) {
            let row = cells(row);
            assert_eq!(
                row.len(),
                header.len(),
                "#{}: a row with {} cells under a header of {}: {row:?}",
                section.anchor,
                row.len(),
                header.len()
            );
            rows.push(row);
        }
        out.push(Table { header, rows });
    }
    out
}

/// The one table of `section` whose header is exactly `header`.
fn table(section: &Section, header: &[&str]) -> Table {
    let mut found: Vec<Table> = tables(section)
        .into_iter()
        .filter(|t| t.header == header)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "#{} must have exactly one table with the columns {header:?}",
        section.anchor
    );
    found.remove(0)
}

/// The texts between backticks.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// A cell that holds exactly one code span and nothing else.
fn single_code(cell: &str) -> &str {
    let spans = code_spans(cell);
    assert!(
        spans.len() == 1 && cell.trim() == format!("`{}`", spans[0]),
        "expected one `code` in the cell, found {cell:?}"
    );
    spans[0]
}

fn contract() -> Vec<Section> {
    sections(&read("docs/contract.md"))
}

fn schema_enum(value: &serde_json::Value, pointer: &str, file: &str) -> BTreeSet<String> {
    value
        .pointer(pointer)
        .and_then(|v| v.as_array())
        .unwrap_or_else(|| panic!("{file}: no enum at {pointer}"))
        .iter()
        .filter(|v| !v.is_null())
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{file}{pointer}: {v} is not a string"))
                .to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Error codes and control refusal codes.

#[test]
fn the_error_code_table_lists_every_code_in_order_with_its_retryability() {
    let doc = contract();
    let t = table(section(&doc, "error-codes"), &["code", "when", "retryable"]);
    let codes = t.column("code").unwrap();
    let documented: Vec<&str> = codes.iter().map(|c| single_code(c)).collect();
    let ours: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        documented, ours,
        "docs/contract.md#error-codes and ErrorCode::ALL"
    );
    for (code, cell) in ErrorCode::ALL.iter().zip(t.column("retryable").unwrap()) {
        let says = if cell.starts_with("yes") {
            true
        } else if cell.starts_with("no") {
            false
        } else {
            panic!("{code}: the retryable cell must start with yes or no: {cell:?}")
        };
        assert_eq!(says, code.retryable(), "{code}: retryable per the doc");
    }
    for (code, when) in ErrorCode::ALL.iter().zip(t.column("when").unwrap()) {
        assert!(!when.is_empty(), "{code}: no 'when'");
    }
}

#[test]
fn the_schemas_enumerate_the_same_error_codes() {
    let ours: BTreeSet<String> = ErrorCode::ALL.iter().map(|c| c.as_str().into()).collect();
    let failed = schema_enum(
        &schema("failed.schema.json"),
        "/$defs/ErrorCode/enum",
        "failed.schema.json",
    );
    assert_eq!(failed, ours, "failed.schema.json $defs/ErrorCode");
    let audit = schema_enum(
        &schema("audit.schema.json"),
        "/properties/errorCode/enum",
        "audit.schema.json",
    );
    assert_eq!(audit, ours, "audit.schema.json errorCode");
}

#[test]
fn the_control_refusal_codes_agree_between_doc_type_and_schema() {
    let doc = contract();
    let t = table(section(&doc, "control-refusal-codes"), &["code", "when"]);
    let documented: Vec<&str> = t
        .column("code")
        .unwrap()
        .iter()
        .map(|c| single_code(c))
        .collect();
    let ours: Vec<&str> = ControlRefusal::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        documented, ours,
        "docs/contract.md#control-refusal-codes and ControlRefusal"
    );
    let audit = schema_enum(
        &schema("audit.schema.json"),
        "/$defs/ControlRefusal/enum",
        "audit.schema.json",
    );
    let ours: BTreeSet<String> = ours.into_iter().map(String::from).collect();
    assert_eq!(audit, ours, "audit.schema.json $defs/ControlRefusal");
}

// ---------------------------------------------------------------------------------------
// Subjects.

/// Names in the code that look like subjects and are not part of the wire contract.
const NOT_CONTRACT_NAMES: [(&str, &str); 2] = [
    ("signer.toml", "the configuration file's name"),
    (
        "signer.stella-ops.org",
        "the domain of apiVersion `signer.stella-ops.org/v1`",
    ),
];

/// A string literal of a source file, and where it is.
#[derive(Debug)]
struct Literal {
    file: PathBuf,
    line: usize,
    text: String,
}

/// The string literals of Rust source outside comments and outside items marked
/// `#[cfg(test)]`. A small lexer: comments (nested block comments too), char literals and
/// lifetimes, raw and byte strings.
fn string_literals(file: &Path, source: &str) -> Vec<Literal> {
    let s: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut depth) = (0usize, 1usize, 0usize);
    // while skipping a #[cfg(test)] item: the brace depth it sits at, and whether its body
    // (a `{`) has opened
    let mut skip: Option<(usize, bool)> = None;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let starts = |i: usize, pat: &str| {
        pat.chars()
            .enumerate()
            .all(|(k, p)| s.get(i + k) == Some(&p))
    };
    while i < s.len() {
        let c = s[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if starts(i, "//") {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if starts(i, "/*") {
            let mut nest = 0;
            while i < s.len() {
                if starts(i, "/*") {
                    nest += 1;
                    i += 2;
                } else if starts(i, "*/") {
                    nest -= 1;
                    i += 2;
                    if nest == 0 {
                        break;
                    }
                } else {
                    line += usize::from(s[i] == '\n');
                    i += 1;
                }
            }
        } else if starts(i, "#[cfg(test)]") {
            if skip.is_none() {
                skip = Some((depth, false));
            }
            i += "#[cfg(test)]".len();
        } else if c == '\'' {
            // a char literal ('x', '\n', '\'', '\u{..}') or a lifetime / label ('a)
            if s.get(i + 1) == Some(&'\\') {
                // the quote, the backslash and the escaped character, then up to the close
                i += 3;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if s.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c == '"' || ((c == 'r' || c == 'b' || c == 'c') && (i == 0 || !ident(s[i - 1]))) {
            // "..." or a prefixed string: b"..", r"..", r#".."#, br#".."#, c".."
            let mut j = i;
            if c != '"' {
                if s[j] == 'b' || s[j] == 'c' {
                    j += 1;
                }
                let raw = s.get(j) == Some(&'r');
                if raw {
                    j += 1;
                }
                let hashes = s[j..].iter().take_while(|&&h| h == '#').count();
                if s.get(j + hashes) != Some(&'"') || (!raw && hashes > 0) {
                    // an identifier starting with r, b or c
                    while i < s.len() && ident(s[i]) {
                        i += 1;
                    }
                    continue;
                }
                if raw {
                    let start = j + hashes + 1;
                    let close: String = std::iter::once('"')
                        .chain("#".repeat(hashes).chars())
                        .collect();
                    let mut k = start;
                    while k < s.len() && !starts(k, &close) {
                        k += 1;
                    }
                    let text: String = s[start..k.min(s.len())].iter().collect();
                    if skip.is_none() {
                        out.push(Literal {
                            file: file.to_path_buf(),
                            line,
                            text: text.clone(),
                        });
                    }
                    line += text.matches('\n').count();
                    i = k + close.chars().count();
                    continue;
                }
            }
            let start = j + 1;
            let mut k = start;
            while k < s.len() && s[k] != '"' {
                k += if s[k] == '\\' { 2 } else { 1 };
            }
            let text: String = s[start..k.min(s.len())].iter().collect();
            if skip.is_none() {
                out.push(Literal {
                    file: file.to_path_buf(),
                    line,
                    text: text.clone(),
                });
            }
            line += text.matches('\n').count();
            i = k + 1;
        } else {
            // `depth` counts every kind of bracket, so a comma or semicolon inside an
            // item's parameters or attributes does not end it (angle brackets are not
            // counted: a comma inside `<..>` before the item's body would end it early)
            match (c, skip) {
                ('{', Some((d, false))) if d == depth => skip = Some((d, true)),
                ('}', Some((d, true))) if d + 1 == depth => skip = None,
                (';' | ',', Some((d, false))) if d == depth => skip = None,
                ('}' | ')' | ']', Some((d, _))) if depth <= d => skip = None,
                _ => {}
            }
            match c {
                '{' | '(' | '[' => depth += 1,
                '}' | ')' | ']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            i += 1;
        }
    }
    out
}

/// Test sources: a `tests` directory, `tests.rs`, `*_tests.rs`.
fn is_test_file(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "tests")
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == "tests.rs" || n.ends_with("_tests.rs"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every name starting `sign.` or `signer.` inside a literal, at a boundary (not inside a
/// longer word, path or URI such as `nats:sign.requests`). Format placeholders (`{}`,
/// `{tenant}`) are kept: they stand for one token.
fn names_in(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    for i in 0..chars.len() {
        let rest: String = chars[i..].iter().take(7).collect();
        if !(rest.starts_with("sign.") || rest.starts_with("signer.")) {
            continue;
        }
        if i > 0 && (chars[i - 1].is_alphanumeric() || "_.:/-".contains(chars[i - 1])) {
            continue;
        }
        let name: String = chars[i..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || "_.>*{}-".contains(**c))
            .collect();
        let name = name.trim_end_matches('.').to_string();
        if name.split('.').count() >= 2 && !name.ends_with('.') {
            out.push(name);
        }
    }
    out
}

/// Where subject-like names occur in the non-test code of the workspace.
fn names_in_code() -> Vec<(String, Literal)> {
    let mut files = Vec::new();
    for dir in ["src", "actors/src", "tools"] {
        rust_files(&root().join(dir), &mut files);
    }
    files.sort();
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut out = Vec::new();
    for file in files.iter().filter(|f| !is_test_file(f)) {
        let source = std::fs::read_to_string(file).unwrap();
        for literal in string_literals(file, &source) {
            for name in names_in(&literal.text) {
                out.push((
                    name,
                    Literal {
                        file: literal.file.clone(),
                        line: literal.line,
                        text: literal.text.clone(),
                    },
                ));
            }
        }
    }
    out
}

/// A placeholder token: `<tenant>` in the doc, `{}` / `{tenant}` in a format string.
fn placeholder(token: &str) -> bool {
    (token.starts_with('<') && token.ends_with('>') && token.len() > 2) || token.contains('{')
}

/// Whether the code's `name` is the doc's `subject`: token by token, a placeholder of the
/// doc standing for any one token; or `name` is `subject` without its trailing
/// placeholders (the code appends them, e.g. `<prefix>.<tenant>`).
fn is_subject(name: &str, subject: &str) -> bool {
    let (n, s): (Vec<&str>, Vec<&str>) = (name.split('.').collect(), subject.split('.').collect());
    if n.len() > s.len() || (n.len() < s.len() && !s[n.len()..].iter().all(|t| placeholder(t))) {
        return false;
    }
    n.iter()
        .zip(&s)
        .all(|(a, b)| a == b || (placeholder(b) && *a != ">" && *a != "*" && !a.is_empty()))
}

/// The subjects the doc's subject tables list, and its other names.
fn documented_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let doc = contract();
    let mut subjects = BTreeSet::new();
    for t in tables(section(&doc, "subjects-and-streams")) {
        for column in ["subject", "subjects"] {
            for cell in t.column(column).unwrap_or_default() {
                subjects.extend(code_spans(cell).into_iter().map(String::from));
            }
        }
    }
    let others = table(section(&doc, "other-names"), &["name", "where"])
        .column("name")
        .unwrap()
        .iter()
        .map(|c| single_code(c).to_string())
        .collect();
    (subjects, others)
}

#[test]
fn every_subject_the_code_uses_is_in_the_contract_and_back() {
    let (subjects, others) = documented_names();
    for expected in [
        "sign.requests",
        "sign.completed",
        "sign.failed",
        "signer.control.keys",
    ] {
        assert!(
            subjects.contains(expected),
            "the subject tables lack {expected}: {subjects:?}"
        );
    }
    let used = names_in_code();
    let mut unknown = Vec::new();
    for (name, at) in &used {
        let known = subjects.iter().any(|s| is_subject(name, s))
            || others.contains(name)
            || NOT_CONTRACT_NAMES.iter().any(|(n, _)| n == name);
        if !known {
            unknown.push(format!(
                "{name} ({}:{}: {:?})",
                at.file.strip_prefix(root()).unwrap_or(&at.file).display(),
                at.line,
                at.text
            ));
        }
    }
    assert!(
        unknown.is_empty(),
        "names the code uses that docs/contract.md#subjects-and-streams (or #other-names) does not list:\n{}",
        unknown.join("\n")
    );
    for subject in &subjects {
        assert!(
            used.iter().any(|(name, _)| is_subject(name, subject)),
            "docs/contract.md lists {subject}, which no code uses"
        );
    }
    for name in &others {
        assert!(
            used.iter().any(|(n, _)| n == name),
            "docs/contract.md#other-names lists {name}, which no code uses"
        );
    }
}

#[test]
fn subject_matching_and_the_lexer_do_what_the_test_relies_on() {
    assert!(is_subject("sign.requests", "sign.requests"));
    assert!(is_subject("sign.requests.{}", "sign.requests.<tenant>"));
    assert!(is_subject("sign.requests.acme", "sign.requests.<tenant>"));
    assert!(is_subject("signer.audit", "signer.audit.<tenant>"));
    assert!(is_subject("sign.requests.>", "sign.requests.>"));
    assert!(!is_subject("sign.requests.>", "sign.requests.<tenant>"));
    assert!(!is_subject("sign.request", "sign.requests"));
    assert!(!is_subject(
        "sign.requests.acme.x",
        "sign.requests.<tenant>"
    ));
    assert!(!is_subject("signer.audit", "signer.audit.>"));

    assert_eq!(names_in("nats:sign.requests"), Vec::<String>::new());
    assert_eq!(names_in("{}sign.requests.acme"), ["sign.requests.acme"]);
    assert_eq!(
        names_in("sent over signer.control.keys."),
        ["signer.control.keys"]
    );
    assert_eq!(names_in("design.doc"), Vec::<String>::new());

    let source = r####"
        // "sign.in.a.comment"
        /* "sign.in.a /* nested */ block" */
        const A: &str = "sign.one";
        fn f<'a>(x: &'a str) -> char { let _ = r#"sign.raw "quoted""#; '"' }
        #[cfg(test)]
        mod tests { fn t() { let _ = "sign.in.test"; let _ = '}'; } }
        #[cfg(test)]
        const T: &str = "sign.test.const";
        const B: &str = "sign.two";
    "####;
    let found: Vec<String> = string_literals(Path::new("x.rs"), source)
        .into_iter()
        .flat_map(|l| names_in(&l.text))
        .collect();
    assert_eq!(found, ["sign.one", "sign.raw", "sign.two"]);
}

// ---------------------------------------------------------------------------------------
// Citations.

/// Every file of the repository a citation of the contract may be in.
fn citing_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in [
        "src", "actors", "tests", "schemas", "docs", "fuzz", "tools", "scripts", "compose",
    ] {
        collect(&root().join(dir), &mut files);
    }
    files.extend(["README.md", "Justfile", "Cargo.toml"].map(|f| root().join(f)));
    files
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | "corpus" | "artifacts" | "node_modules") {
                collect(&path, out);
            }
        } else if [
            ".rs", ".md", ".json", ".toml", ".sh", ".py", ".mjs", ".yaml", ".yml",
        ]
        .iter()
        .any(|e| name.ends_with(e))
        {
            out.push(path);
        }
    }
}

#[test]
fn every_citation_of_the_contract_names_one_of_its_sections() {
    let doc = contract();
    let anchors: BTreeSet<&str> = doc.iter().map(|s| s.anchor.as_str()).collect();
    // the upstream file outside the repository, which citations must no longer name
    let outside = concat!("CONTRACT", ".md");
    let mut dangling = Vec::new();
    let mut cited = 0;
    for file in citing_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let rel = file
            .strip_prefix(root())
            .unwrap_or(&file)
            .display()
            .to_string();
        for (n, line) in text.lines().enumerate() {
            if line.contains(outside) {
                dangling.push(format!("{rel}:{}: cites {outside}", n + 1));
            }
            let mut targets: Vec<&str> = line.split("contract.md#").skip(1).collect();
            if rel == "docs/contract.md" {
                targets.extend(line.split("](#").skip(1));
            }
            for rest in targets {
                let anchor: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .collect();
                cited += 1;
                if !anchors.contains(anchor.as_str()) {
                    dangling.push(format!("{rel}:{}: #{anchor}", n + 1));
                }
            }
        }
    }
    assert!(
        dangling.is_empty(),
        "citations of docs/contract.md that name no section of it:\n{}",
        dangling.join("\n")
    );
    assert!(cited > 20, "only {cited} citations found");
}
