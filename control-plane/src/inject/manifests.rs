//! Multi-document Kubernetes YAML in, the same stream out with sidecars added: what
//! `tessera inject` does to files.
//!
//! Documents are cut at `---` lines (YAML forbids that marker inside any scalar, so the
//! cut is exact) and each is parsed on its own, which lets errors name the document.
//! Untouched documents are copied byte for byte, comments included; an injected one is
//! written anew, with its keys sorted as `kubectl get -o yaml` would write them.

use serde_json::Value;

use super::probes::ProbeReport;
use super::{InjectError, Options, Outcome, describe, inject_object_reporting};

/// What happened to one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentReport {
    /// 1-based, in input order.
    pub document: usize,
    /// `Deployment/web`, or the kind alone, or `object`.
    pub object: String,
    pub outcome: Outcome,
    /// What was done to each probe of an injected workload.
    pub probes: Vec<ProbeReport>,
}

/// The rewritten stream and what was done to each document.
#[derive(Debug)]
pub struct Injected {
    pub yaml: String,
    pub reports: Vec<DocumentReport>,
}

/// Why a stream was refused; nothing of it is written then.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {document} (from line {line}) is not valid YAML: {reason}")]
    Yaml {
        document: usize,
        line: usize,
        reason: String,
    },
    #[error("document {document} ({object}, from line {line}): {source}")]
    Inject {
        document: usize,
        line: usize,
        object: String,
        source: InjectError,
    },
    #[error("document {document} ({object}): cannot write YAML: {reason}")]
    Write {
        document: usize,
        object: String,
        reason: String,
    },
}

/// One document of the stream, as it appears in the input.
struct Document<'a> {
    /// Whether a `---` marker opened it (the marker itself is not in `text`).
    marker: bool,
    /// The rest of the marker line, then every line up to the next marker.
    text: &'a str,
    /// Line of the input where `text` starts (1-based).
    line: usize,
    /// Blank lines and comments before the first `---`: copied, but not a document.
    preamble: bool,
}

/// Injects every workload of a YAML stream; the other documents pass through.
pub fn inject_manifests(input: &str, options: &Options) -> Result<Injected, ManifestError> {
    inject_with_parser(input, options, |text| serde_saphyr::from_str(text))
}

/// [`inject_manifests`] with the YAML parser as a parameter, so a test can count the
/// work handed to it.
fn inject_with_parser(
    input: &str,
    options: &Options,
    mut parse_yaml: impl FnMut(&str) -> Result<Value, serde_saphyr::Error>,
) -> Result<Injected, ManifestError> {
    let mut yaml = String::with_capacity(input.len() * 2);
    let mut reports = Vec::new();
    let mut number = 0;
    for document in split(input) {
        if document.marker {
            yaml.push_str("---");
        }
        if document.preamble {
            yaml.push_str(document.text);
            continue;
        }
        number += 1;
        let mut object = parse(&document, number, &mut parse_yaml)?;
        let name = describe(&object);
        let injection = inject_object_reporting(&mut object, options).map_err(|source| {
            ManifestError::Inject {
                document: number,
                line: document.line,
                object: name.clone(),
                source,
            }
        })?;
        match injection.outcome {
            Outcome::Injected => {
                let written =
                    serde_saphyr::to_string(&object).map_err(|e| ManifestError::Write {
                        document: number,
                        object: name.clone(),
                        reason: e.to_string(),
                    })?;
                if document.marker {
                    yaml.push('\n');
                }
                yaml.push_str(&written);
            }
            Outcome::Skipped(_) => yaml.push_str(document.text),
        }
        if !object.is_null() {
            reports.push(DocumentReport {
                document: number,
                object: name,
                outcome: injection.outcome,
                probes: injection.probes,
            });
        }
    }
    Ok(Injected { yaml, reports })
}

/// Cuts the stream at `---` lines.
fn split(input: &str) -> Vec<Document<'_>> {
    let mut documents = Vec::new();
    let mut current = Document {
        marker: false,
        text: "",
        line: 1,
        preamble: false,
    };
    let mut start = 0;
    let mut offset = 0;
    for (index, line) in input.split_inclusive('\n').enumerate() {
        if is_marker(line) {
            current.text = &input[start..offset];
            current.preamble = documents.is_empty() && !current.marker && is_blank(current.text);
            documents.push(current);
            current = Document {
                marker: true,
                text: "",
                line: index + 1,
                preamble: false,
            };
            start = offset + 3;
        }
        offset += line.len();
    }
    current.text = &input[start..];
    documents.push(current);
    documents
}

fn is_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

fn is_blank(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#')
    })
}

fn parse(
    document: &Document<'_>,
    number: usize,
    parse_yaml: &mut impl FnMut(&str) -> Result<Value, serde_saphyr::Error>,
) -> Result<Value, ManifestError> {
    // Each document is parsed on its own, so a stream costs its length. Only a document
    // that fails is parsed again behind one blank line per line before it, so that the
    // parser's line numbers (and its snippet) are the whole input's: that happens once,
    // since the first error ends the run. (Padding every document made 20,000 of them
    // take 12 s.) Leading blank lines change nothing in YAML, so the second parse fails
    // as the first did; should it not, the first error still says what is wrong.
    parse_yaml(document.text).map_err(|error| {
        let padded = "\n".repeat(document.line - 1) + document.text;
        let error = parse_yaml(&padded).err().unwrap_or(error);
        ManifestError::Yaml {
            document: number,
            line: document.line,
            reason: error.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_documents_are_copied_byte_for_byte() {
        let input = "# leading comment\n---\napiVersion: v1\nkind: Service # trailing\nmetadata: {name: web}\n--- # second\n\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: \"1\"\n";
        let injected = inject_manifests(input, &Options::default()).unwrap();
        assert_eq!(injected.yaml, input);
        let objects: Vec<&str> = injected.reports.iter().map(|r| r.object.as_str()).collect();
        assert_eq!(objects, ["Service/web", "ConfigMap/c"]);
        assert_eq!(injected.reports[1].document, 2);
    }

    #[test]
    fn what_precedes_the_first_marker_is_not_a_document() {
        let input = "---\nkind: A\n---\nkind: B\n";
        let documents = split(input);
        assert_eq!(documents.len(), 3);
        assert!(documents[0].preamble);
        assert_eq!((documents[1].text, documents[1].line), ("\nkind: A\n", 1));
        assert_eq!((documents[2].text, documents[2].line), ("\nkind: B\n", 3));
        let injected = inject_manifests(input, &Options::default()).unwrap();
        assert_eq!(injected.yaml, input);
        assert_eq!(injected.reports[1].document, 2);
    }

    #[test]
    fn markers_need_a_line_of_their_own() {
        let documents = split("a: |\n  ---\n  text\nb: ---x\n---x: 1\n");
        assert_eq!(documents.len(), 1);
    }

    #[test]
    fn malformed_yaml_names_document_and_line() {
        let input = "apiVersion: v1\nkind: Service\n---\napiVersion: v1\nkind: Pod\nspec:\n  containers: [\n";
        let error = inject_manifests(input, &Options::default()).unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("document 2 (from line 3) is not valid YAML"),
            "{message}"
        );
        assert!(message.contains("line 7"), "{message}");
    }

    /// `tessera inject` on a long stream: the YAML parser must see each byte of it once,
    /// not every line before each document again (20,000 `---` lines took 12 s when each
    /// document was parsed behind its own padding). Counted, not timed, so it cannot
    /// flake on a busy machine; the time is printed for the curious.
    #[test]
    fn a_long_stream_is_parsed_in_linear_work() {
        let cases = [
            ("---\nkind: ConfigMap\nmetadata: {name: c}\n", 2_000, 2_000),
            ("---\n", 20_000, 0),
        ];
        for (document, documents, objects) in cases {
            let input = document.repeat(documents);
            let mut parsed = 0;
            let started = std::time::Instant::now();
            let injected = inject_with_parser(&input, &Options::default(), |text| {
                parsed += text.len();
                serde_saphyr::from_str(text)
            })
            .unwrap();
            println!(
                "{documents} documents: {parsed} bytes parsed for {} of input, {:?}",
                input.len(),
                started.elapsed()
            );
            assert_eq!(injected.reports.len(), objects);
            assert_eq!(injected.yaml, input);
            assert!(
                parsed <= input.len(),
                "{documents} documents: the parser saw {parsed} bytes of a {}-byte input",
                input.len()
            );
        }
    }

    /// Errors read exactly as when each document was parsed at its place in the stream:
    /// line numbers and the snippet's gutter are the input's.
    #[test]
    fn yaml_errors_keep_the_input_line_numbers() {
        let input = "a: 1\n---\nx: 1\n---\n# c\nb: 2\n  c: 3\nd: 4\n";
        assert_eq!(
            inject_manifests(input, &Options::default())
                .unwrap_err()
                .to_string(),
            "document 3 (from line 4) is not valid YAML: error: line 7 column 4: mapping values are not allowed in this context\n --> <input>:7:4\n  |\n5 | # c\n6 | b: 2\n7 |   c: 3\n  |    ^ mapping values are not allowed in this context\n8 | d: 4\n  |"
        );
        let deep = "---\nkind: ConfigMap\n".repeat(5_000) + "---\nb: 1\nb: 2\n";
        let message = inject_manifests(&deep, &Options::default())
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with(
                "document 5001 (from line 10001) is not valid YAML: error: line 10003 column 1: duplicate mapping key: b"
            ),
            "{message}"
        );
        assert!(message.contains("10003 | b: 2"), "{message}");
    }

    #[test]
    fn injection_errors_name_document_and_object() {
        let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    tessera.dev/exclude-outbound-cidrs: 10.0.0.0/40\nspec:\n  containers: [{name: a}]\n";
        let message = inject_manifests(input, &Options::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "document 1 (Pod/p, from line 1): annotation tessera.dev/exclude-outbound-cidrs: \"10.0.0.0/40\" is not valid: \"40\" is not a prefix length (0-32)"
        );
    }
}
