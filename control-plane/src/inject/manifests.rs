//! Multi-document Kubernetes YAML in, the same stream out with sidecars added: what
//! `tessera inject` does to files.
//!
//! Documents are cut at `---` lines (YAML forbids that marker inside any scalar, so the
//! cut is exact) and each is parsed on its own, which lets errors name the document.
//! Untouched documents are copied byte for byte, comments included; an injected one is
//! written anew, with its keys sorted as `kubectl get -o yaml` would write them.

use serde_json::Value;

use super::{InjectError, Options, Outcome, describe, inject_object};

/// What happened to one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentReport {
    /// 1-based, in input order.
    pub document: usize,
    /// `Deployment/web`, or the kind alone, or `object`.
    pub object: String,
    pub outcome: Outcome,
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
        let mut object = parse(&document, number)?;
        let name = describe(&object);
        let outcome =
            inject_object(&mut object, options).map_err(|source| ManifestError::Inject {
                document: number,
                line: document.line,
                object: name.clone(),
                source,
            })?;
        match outcome {
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
                outcome,
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

fn parse(document: &Document<'_>, number: usize) -> Result<Value, ManifestError> {
    // Padding with the lines before the document makes the parser's line numbers (and
    // its snippet) those of the whole input.
    let padded = "\n".repeat(document.line - 1) + document.text;
    serde_saphyr::from_str(&padded).map_err(|e| ManifestError::Yaml {
        document: number,
        line: document.line,
        reason: e.to_string(),
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
