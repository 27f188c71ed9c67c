//! The part of kustomize that the manifests under deploy/k8s use, so that the test checks the
//! containers' arguments as `kubectl apply -k` would send them: `resources` (files and
//! directories), `components`, `configMapGenerator` (files), and `patches`, inline or from a file,
//! as JSON 6902 operations (add, remove, replace, test, move, copy) or strategic-merge patches
//! (`$patch: delete`, maps merged, lists of named items merged by name, other lists replaced).
//!
//! The order is kustomize's: a kustomization's resources, then its components (each one a
//! kustomization applied to what is accumulated so far), then its generators, then its patches.
//! Namespaces, labels and image names do not change a command line and are accepted but not
//! applied; any other field is refused, so that the model never silently ignores something that
//! could change the arguments.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A resource of the build and where it came from.
#[derive(Debug, Clone)]
pub struct Resource {
    pub doc: Value,
    /// `deploy/k8s/base/agent-job.yaml:4`: the file and line of the document.
    pub origin: String,
    /// The patches applied to it, as `file:line` of each patch.
    pub patched_by: Vec<String>,
}

impl Resource {
    pub fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }

    /// `Job decodebench-agent (deploy/k8s/base/agent-job.yaml:4, patched by ...)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {} ({}", self.kind(), self.name(), self.origin);
        if !self.patched_by.is_empty() {
            s.push_str(&format!("; patched by {}", self.patched_by.join(", ")));
        }
        s.push(')');
        s
    }
}

/// A ConfigMap from a `configMapGenerator`: key -> local file.
#[derive(Debug, Clone)]
pub struct GeneratedConfigMap {
    pub name: String,
    pub files: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Default)]
pub struct Build {
    pub resources: Vec<Resource>,
    pub config_maps: Vec<GeneratedConfigMap>,
    /// Every file the build read (kustomizations, resources, patches, generator inputs).
    pub files_read: BTreeSet<PathBuf>,
}

/// Builds the kustomization in `dir` with `extra_components` added to its `components`, as a
/// user who adds a component to the kustomization they apply. Paths in messages are relative to
/// `root`.
pub fn build(dir: &Path, extra_components: &[PathBuf], root: &Path) -> Result<Build, String> {
    let mut b = Build::default();
    accumulate(dir, false, extra_components, root, &mut b)?;
    Ok(b)
}

pub fn display(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every YAML document of `text` with the line it starts on (documents are split at `---` lines,
/// which is all the manifests here use).
pub fn documents(text: &str, label: &str) -> Result<Vec<(Value, usize)>, String> {
    let mut chunks = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") {
            chunks.push((i + 2, String::new()));
        } else {
            let chunk = &mut chunks.last_mut().expect("starts with one chunk").1;
            chunk.push_str(line);
            chunk.push('\n');
        }
    }
    let mut docs = Vec::new();
    for (line, chunk) in chunks {
        let doc: Value = serde_yaml_ng::from_str(&chunk)
            .map_err(|e| format!("{label}:{line}: not YAML: {e}"))?;
        if !doc.is_null() {
            docs.push((doc, line));
        }
    }
    Ok(docs)
}

fn read(path: &Path, root: &Path, b: &mut Build) -> Result<String, String> {
    b.files_read.insert(path.to_path_buf());
    std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot be read: {e}", display(path, root)))
}

fn kustomization_file(dir: &Path) -> Option<PathBuf> {
    ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Fields that do not change a container's command line; see the module docs.
const INERT_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "commonLabels",
    "commonAnnotations",
    "images",
];

fn accumulate(
    dir: &Path,
    component: bool,
    extra_components: &[PathBuf],
    root: &Path,
    b: &mut Build,
) -> Result<(), String> {
    let file = kustomization_file(dir)
        .ok_or_else(|| format!("{}: no kustomization.yaml", display(dir, root)))?;
    let label = display(&file, root);
    let text = read(&file, root, b)?;
    let k = documents(&text, &label)?
        .into_iter()
        .next()
        .map(|(d, _)| d)
        .ok_or_else(|| format!("{label}: empty"))?;
    let want_kind = if component {
        "Component"
    } else {
        "Kustomization"
    };
    if k["kind"].as_str().unwrap_or("Kustomization") != want_kind {
        return Err(format!("{label}: expected kind {want_kind}"));
    }
    let known = ["resources", "components", "configMapGenerator", "patches"];
    for key in k.as_object().into_iter().flat_map(|o| o.keys()) {
        if !known.contains(&key.as_str()) && !INERT_FIELDS.contains(&key.as_str()) {
            return Err(format!(
                "{label}: field `{key}` is not modelled by this test's kustomize \
                 (tests/deploy_cli/kustomize.rs); teach it there"
            ));
        }
    }
    for entry in strings(&k["resources"], &label, "resources")? {
        let path = dir.join(&entry);
        if path.is_dir() {
            accumulate(&path, false, &[], root, b)?;
        } else if path.is_file() {
            let rtext = read(&path, root, b)?;
            let rlabel = display(&path, root);
            for (doc, line) in documents(&rtext, &rlabel)? {
                b.resources.push(Resource {
                    doc,
                    origin: format!("{rlabel}:{line}"),
                    patched_by: Vec::new(),
                });
            }
        } else {
            return Err(format!("{label}: resource `{entry}` does not exist"));
        }
    }
    let mut components: Vec<PathBuf> = strings(&k["components"], &label, "components")?
        .into_iter()
        .map(|c| dir.join(c))
        .collect();
    components.extend(extra_components.iter().cloned());
    for c in components {
        accumulate(&c, true, &[], root, b)?;
    }
    for (i, g) in array(&k["configMapGenerator"]).iter().enumerate() {
        let name = g["name"]
            .as_str()
            .ok_or_else(|| format!("{label}: configMapGenerator[{i}] has no name"))?;
        let mut files = BTreeMap::new();
        for f in strings(&g["files"], &label, "configMapGenerator.files")? {
            let (key, path) = match f.split_once('=') {
                Some((key, path)) => (key.to_string(), path.to_string()),
                None => (super::shell::basename(&f).to_string(), f.clone()),
            };
            let path = dir.join(path);
            if !path.is_file() {
                return Err(format!(
                    "{label}: configMapGenerator `{name}` names `{f}`, which does not exist"
                ));
            }
            b.files_read.insert(path.clone());
            files.insert(key, path);
        }
        for other in ["literals", "envs", "env"] {
            if !g[other].is_null() {
                return Err(format!(
                    "{label}: configMapGenerator `{other}` is not modelled"
                ));
            }
        }
        let behavior = g["behavior"].as_str().unwrap_or("create");
        match (b.config_maps.iter_mut().find(|c| c.name == name), behavior) {
            (None, "create") => b.config_maps.push(GeneratedConfigMap {
                name: name.to_string(),
                files,
            }),
            (Some(c), "replace") => c.files = files,
            (Some(c), "merge") => c.files.extend(files),
            (found, _) => {
                return Err(format!(
                    "{label}: configMapGenerator `{name}` with behavior {behavior} {}",
                    if found.is_some() {
                        "already exists"
                    } else {
                        "has nothing to act on"
                    }
                ))
            }
        }
    }
    for (i, p) in array(&k["patches"]).iter().enumerate() {
        let origin = format!("{label}:{}", patch_line(&text, i));
        let patch_text = match (&p["patch"], &p["path"]) {
            (Value::String(s), Value::Null) => s.clone(),
            (Value::Null, Value::String(path)) => read(&dir.join(path), root, b)?,
            _ => {
                return Err(format!(
                    "{origin}: a patch needs exactly one of patch and path"
                ))
            }
        };
        let patch = documents(&patch_text, &origin)?
            .into_iter()
            .next()
            .map(|(d, _)| d)
            .ok_or_else(|| format!("{origin}: empty patch"))?;
        apply_patch(&patch, &p["target"], &origin, b)?;
    }
    Ok(())
}

/// The line of the `index`-th item of the top-level `patches:` list.
fn patch_line(text: &str, index: usize) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| l.starts_with("patches:")) else {
        return 1;
    };
    let mut indent = None;
    let mut seen = 0;
    for (i, l) in lines.iter().enumerate().skip(start + 1) {
        let trimmed = l.trim_start();
        if trimmed.starts_with("- ") {
            let this = l.len() - trimmed.len();
            if *indent.get_or_insert(this) == this {
                if seen == index {
                    return i + 1;
                }
                seen += 1;
            }
        }
    }
    start + 1
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn strings(v: &Value, label: &str, field: &str) -> Result<Vec<String>, String> {
    array(v)
        .iter()
        .map(|e| {
            e.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{label}: {field} has a non-string entry {e}"))
        })
        .collect()
}

/// Whether `r` is selected by a patch `target` (kind, name, namespace, group, version,
/// labelSelector with `k=v`, `k==v`, `k!=v` and `k`).
fn selected(r: &Resource, target: &Value, origin: &str) -> Result<bool, String> {
    for key in target.as_object().into_iter().flat_map(|o| o.keys()) {
        if ![
            "kind",
            "name",
            "namespace",
            "group",
            "version",
            "labelSelector",
        ]
        .contains(&key.as_str())
        {
            return Err(format!("{origin}: target field `{key}` is not modelled"));
        }
    }
    let api = r.doc["apiVersion"].as_str().unwrap_or("");
    let (group, version) = api.rsplit_once('/').unwrap_or(("", api));
    let field_matches =
        |field: &str, actual: &str| target[field].as_str().is_none_or(|want| want == actual);
    if !(field_matches("kind", r.kind())
        && field_matches("name", r.name())
        && field_matches("group", group)
        && field_matches("version", version))
    {
        return Ok(false);
    }
    let Some(selector) = target["labelSelector"].as_str() else {
        return Ok(true);
    };
    let labels = &r.doc["metadata"]["labels"];
    for term in selector.split(',').map(str::trim) {
        let ok = if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k.trim()].as_str() == Some(v.trim_start_matches('=').trim())
        } else {
            !labels[term].is_null()
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn apply_patch(patch: &Value, target: &Value, origin: &str, b: &mut Build) -> Result<(), String> {
    if let Value::Array(ops) = patch {
        if target.is_null() {
            return Err(format!("{origin}: a JSON 6902 patch needs a target"));
        }
        // Like kustomize, a target that selects nothing is not an error.
        let mut i = 0;
        while i < b.resources.len() {
            if selected(&b.resources[i], target, origin)? {
                for op in ops {
                    json6902(&mut b.resources[i].doc, op)
                        .map_err(|e| format!("{origin}: on {}: {e}", b.resources[i].describe()))?;
                }
                b.resources[i].patched_by.push(origin.to_string());
            }
            i += 1;
        }
        return Ok(());
    }
    // A strategic-merge patch: its own kind and name select, unless a target is given.
    let target = if target.is_null() {
        serde_json::json!({"kind": patch["kind"], "name": patch["metadata"]["name"]})
    } else {
        target.clone()
    };
    let mut matched = false;
    let mut i = 0;
    while i < b.resources.len() {
        if !selected(&b.resources[i], &target, origin)? {
            i += 1;
            continue;
        }
        matched = true;
        if patch["$patch"] == "delete" {
            b.resources.remove(i);
            continue;
        }
        strategic_merge(&mut b.resources[i].doc, patch);
        b.resources[i].patched_by.push(origin.to_string());
        i += 1;
    }
    if !matched {
        return Err(format!(
            "{origin}: the patch matches no resource ({target})"
        ));
    }
    Ok(())
}

fn strategic_merge(doc: &mut Value, patch: &Value) {
    match (doc, patch) {
        (Value::Object(d), Value::Object(p)) => {
            if p.get("$patch").and_then(Value::as_str) == Some("replace") {
                let mut p = p.clone();
                p.remove("$patch");
                *d = p;
                return;
            }
            for (k, v) in p {
                if k.starts_with('$') {
                    continue;
                }
                if v.is_null() {
                    d.remove(k);
                } else if let Some(existing) = d.get_mut(k) {
                    strategic_merge(existing, v);
                } else {
                    d.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(d), Value::Array(p))
            if p.iter().chain(d.iter()).all(|e| e["name"].is_string()) =>
        {
            for item in p {
                let pos = d.iter().position(|e| e["name"] == item["name"]);
                match (pos, item["$patch"].as_str()) {
                    (Some(at), Some("delete")) => {
                        d.remove(at);
                    }
                    (Some(at), _) => strategic_merge(&mut d[at], item),
                    (None, _) => d.push(item.clone()),
                }
            }
        }
        (d, p) => *d = p.clone(),
    }
}

/// The parent of a JSON pointer and its last token (unescaped).
fn split_pointer(path: &str) -> Result<(String, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("`{path}` is not a JSON pointer"))?;
    Ok((
        parent.to_string(),
        last.replace("~1", "/").replace("~0", "~"),
    ))
}

fn pointer_mut<'a>(doc: &'a mut Value, path: &str) -> Result<&'a mut Value, String> {
    doc.pointer_mut(path)
        .ok_or_else(|| format!("path `{path}` does not exist"))
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    match pointer_mut(doc, &parent)? {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("path `{path}` does not exist")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("`{last}` is not an index in `{path}`"))?;
            if i >= a.len() {
                return Err(format!("path `{path}` is past the end ({} items)", a.len()));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("path `{parent}` is not a map or a list")),
    }
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match pointer_mut(doc, &parent)? {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) if last == "-" => a.push(value),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("`{last}` is not an index in `{path}`"))?;
            if i > a.len() {
                return Err(format!("path `{path}` is past the end ({} items)", a.len()));
            }
            a.insert(i, value);
        }
        _ => return Err(format!("path `{parent}` is not a map or a list")),
    }
    Ok(())
}

fn json6902(doc: &mut Value, op: &Value) -> Result<(), String> {
    let path = op["path"]
        .as_str()
        .ok_or_else(|| format!("operation without a path: {op}"))?;
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| format!("`{}` {path} without a value", op["op"]))
    };
    let from = || {
        op["from"]
            .as_str()
            .ok_or_else(|| format!("`{}` {path} without from", op["op"]))
    };
    match op["op"].as_str().unwrap_or("") {
        "add" => add(doc, path, value()?),
        "remove" => remove(doc, path).map(drop),
        "replace" => {
            *pointer_mut(doc, path)? = value()?;
            Ok(())
        }
        "test" => {
            let want = value()?;
            let got = pointer_mut(doc, path)?;
            if *got == want {
                Ok(())
            } else {
                Err(format!("test failed: `{path}` is {got}, not {want}"))
            }
        }
        "move" => {
            let v = remove(doc, from()?)?;
            add(doc, path, v)
        }
        "copy" => {
            let v = pointer_mut(doc, from()?)?.clone();
            add(doc, path, v)
        }
        other => Err(format!("unknown operation `{other}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json6902_operations() {
        let mut doc = json!({"a": {"args": ["x", "--placement", "spread"]}});
        for op in [
            json!({"op": "test", "path": "/a/args/1", "value": "--placement"}),
            json!({"op": "replace", "path": "/a/args/2", "value": "per-sku"}),
            json!({"op": "add", "path": "/a/args/-", "value": "--keep-serving"}),
            json!({"op": "add", "path": "/a/args/0", "value": "coordinator"}),
            json!({"op": "remove", "path": "/a/args/1"}),
            json!({"op": "copy", "from": "/a/args", "path": "/b"}),
            json!({"op": "move", "from": "/b", "path": "/c~1d"}),
        ] {
            json6902(&mut doc, &op).unwrap();
        }
        let args = json!(["coordinator", "--placement", "per-sku", "--keep-serving"]);
        assert_eq!(doc, json!({"a": {"args": args}, "c/d": args}));
        let err = json6902(
            &mut doc,
            &json!({"op": "test", "path": "/a/args/1", "value": "--expect-agents"}),
        )
        .unwrap_err();
        assert!(err.contains("test failed"), "{err}");
    }

    #[test]
    fn documents_and_their_lines() {
        let docs = documents("# only a comment\n---\nkind: A\n---\n\nkind: B\n", "t").unwrap();
        let kinds: Vec<(&str, usize)> = docs
            .iter()
            .map(|(d, line)| (d["kind"].as_str().unwrap(), *line))
            .collect();
        assert_eq!(kinds, [("A", 3), ("B", 5)]);
        assert!(documents("a: [", "t.yaml")
            .unwrap_err()
            .contains("t.yaml:1: not YAML"));
    }

    #[test]
    fn strategic_merge_by_name() {
        let mut doc = json!({"spec": {"containers": [
            {"name": "a", "args": ["1", "2"], "image": "i"},
            {"name": "b"}
        ]}});
        strategic_merge(
            &mut doc,
            &json!({"spec": {"containers": [
                {"name": "a", "args": ["3"]},
                {"name": "b", "$patch": "delete"},
                {"name": "c"}
            ]}}),
        );
        assert_eq!(
            doc,
            json!({"spec": {"containers": [
                {"name": "a", "args": ["3"], "image": "i"},
                {"name": "c"}
            ]}})
        );
    }
}
