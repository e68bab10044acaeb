//! The tools: their JSON Schemas (the one description of each argument:
//! the checks below read the allowed names and the required ones from
//! it), and the typed call each `tools/call` becomes.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use api_types::limits::MAX_EXEC_TIMEOUT_SEC;
use api_types::{CreateSandbox, ExecBody, PublishPort};
use serde_json::{json, Map, Value};

/// Most bytes `read_file` answers (its `max_bytes` default and bound):
/// a tool result goes into a model's context whole.
pub const MAX_READ_BYTES: u64 = 1024 * 1024;

/// The sandbox argument every tool but create and list takes.
fn sandbox_arg() -> Value {
    json!({"type": "string", "minLength": 1, "description": "The sandbox's name or id."})
}

fn env_arg(what: &str) -> Value {
    json!({
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": format!("Environment variables {what} (name to value).")
    })
}

/// Every tool's `tools/list` entry.
static DEFINITIONS: LazyLock<Vec<Value>> = LazyLock::new(|| {
    vec![
        json!({
            "name": "create_sandbox",
            "title": "Create a sandbox",
            "description": "Create a sandbox (a microVM) and boot it; with a name that exists, returns that sandbox unchanged. Returns the sandbox as JSON (id, name, image, cpus, memory_mb, status, ip, …).",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 63, "description": "Unique among your sandboxes; generated when absent."},
                    "image": {"type": "string", "minLength": 1, "description": "Image name (the daemon's default image when absent)."},
                    "cpus": {"type": "integer", "minimum": 1, "maximum": 64, "description": "Virtual CPUs (the daemon's default when absent)."},
                    "memory_mb": {"type": "integer", "minimum": 64, "description": "Memory in MiB (the daemon's default when absent)."},
                    "disk_size_mb": {"type": "integer", "minimum": 64, "description": "Writable disk in MiB (the daemon's default, usually 2048, when absent)."},
                    "env": env_arg("of every command in the sandbox"),
                    "keep_hot": {"type": "boolean", "description": "Keep it hot (running) rather than letting it cool to warm (paused) and cold (snapshot on disk) when idle."},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Free-form labels (key to value)."},
                    "init": {"type": "string", "minLength": 1, "maxLength": 8192, "description": "A command run by /bin/sh -c at every boot of the sandbox, as root and detached (for daemons); its output goes to /var/log/bhatti-init.log in the sandbox."}
                },
                "additionalProperties": false
            },
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "list_sandboxes",
            "title": "List sandboxes",
            "description": "List your sandboxes as JSON (name, id, image, status, thermal tier, ip, published ports). Never wakes one.",
            "inputSchema": {"type": "object", "properties": {}, "additionalProperties": false},
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "exec",
            "title": "Run a command",
            "description": "Run a shell command in a sandbox (`/bin/sh -c COMMAND`) to completion. Returns JSON: exit_code, stdout, stderr, timed_out (and stdout_truncated/stderr_truncated past the daemon's output limit). Wakes a sleeping sandbox.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox": sandbox_arg(),
                    "command": {"type": "string", "minLength": 1, "description": "The command line, run by /bin/sh -c."},
                    "cwd": {"type": "string", "description": "Working directory (absolute; the sandbox's default when absent)."},
                    "env": env_arg("for this command"),
                    "timeout_sec": {"type": "integer", "minimum": 1, "maximum": MAX_EXEC_TIMEOUT_SEC, "description": "Seconds before the command is killed (default 300)."}
                },
                "required": ["sandbox", "command"],
                "additionalProperties": false
            },
            "annotations": {"readOnlyHint": false, "destructiveHint": true, "idempotentHint": false, "openWorldHint": true}
        }),
        json!({
            "name": "read_file",
            "title": "Read a file",
            "description": "Read a UTF-8 text file in a sandbox; returns its text (a note follows when it was cut at max_bytes).",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox": sandbox_arg(),
                    "path": {"type": "string", "minLength": 1, "description": "Absolute path in the sandbox."},
                    "max_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_READ_BYTES, "description": format!("Bytes to return at most (default and most {MAX_READ_BYTES}).")}
                },
                "required": ["sandbox", "path"],
                "additionalProperties": false
            },
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "write_file",
            "title": "Write a file",
            "description": "Write text to a file in a sandbox (created or replaced atomically; its directory must exist). Returns JSON: path, bytes.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox": sandbox_arg(),
                    "path": {"type": "string", "minLength": 1, "description": "Absolute path in the sandbox."},
                    "content": {"type": "string", "description": "The file's new content (UTF-8 text)."},
                    "mode": {"type": "string", "pattern": "^0?[0-7]{3,4}$", "description": "Octal permission bits, e.g. \"0755\" (0644 when absent)."}
                },
                "required": ["sandbox", "path", "content"],
                "additionalProperties": false
            },
            "annotations": {"readOnlyHint": false, "destructiveHint": true, "idempotentHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "publish_port",
            "title": "Publish a port",
            "description": "Publish a port of a sandbox on the daemon's public proxy; returns JSON with the public url (and alias, port).",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox": sandbox_arg(),
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "The port in the sandbox."},
                    "alias": {"type": "string", "minLength": 3, "maxLength": 63, "description": "Public name: a-z, 0-9 and inner '-' (`<sandbox>-<port>` when absent)."}
                },
                "required": ["sandbox", "port"],
                "additionalProperties": false
            },
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": true, "openWorldHint": true}
        }),
        json!({
            "name": "destroy_sandbox",
            "title": "Destroy a sandbox",
            "description": "Destroy a sandbox: its VM, disk and published ports. Cannot be undone.",
            "inputSchema": {
                "type": "object",
                "properties": {"sandbox": sandbox_arg()},
                "required": ["sandbox"],
                "additionalProperties": false
            },
            "annotations": {"readOnlyHint": false, "destructiveHint": true, "idempotentHint": true, "openWorldHint": false}
        }),
    ]
});

/// The tools as `tools/list` shows them.
pub fn definitions() -> &'static [Value] {
    &DEFINITIONS
}

/// A `tools/call` with its arguments checked and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Create(CreateSandbox),
    List,
    Exec {
        sandbox: String,
        body: ExecBody,
    },
    ReadFile {
        sandbox: String,
        path: String,
        max_bytes: u64,
    },
    WriteFile {
        sandbox: String,
        path: String,
        content: String,
        mode: Option<u32>,
    },
    Publish {
        sandbox: String,
        body: PublishPort,
    },
    Destroy {
        sandbox: String,
    },
}

/// Why a `tools/call` is not a [`Call`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No tool of that name: a JSON-RPC error (invalid params).
    #[error("unknown tool '{0}'")]
    UnknownTool(String),
    /// The arguments are wrong: a tool error naming the argument.
    #[error("{tool}: {message}")]
    Arguments { tool: String, message: String },
}

/// The checked arguments of one call: only the schema's names, the
/// required ones present, each of its type.
struct Args<'a> {
    map: &'a Map<String, Value>,
}

type ArgResult<T> = Result<T, String>;

impl<'a> Args<'a> {
    fn new(schema: &Value, args: Option<&'a Value>) -> ArgResult<Args<'a>> {
        static EMPTY: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);
        let map = match args {
            None | Some(Value::Null) => &*EMPTY,
            Some(Value::Object(m)) => m,
            Some(_) => return Err("arguments must be an object".into()),
        };
        let props = schema["properties"].as_object();
        for k in map.keys() {
            if !props.is_some_and(|p| p.contains_key(k)) {
                let known: Vec<&str> = props
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                return Err(if known.is_empty() {
                    format!("unknown argument '{k}': this tool takes none")
                } else {
                    format!("unknown argument '{k}' (expected: {})", known.join(", "))
                });
            }
        }
        for r in schema["required"].as_array().into_iter().flatten() {
            if let Some(r) = r.as_str() {
                if map.get(r).is_none_or(Value::is_null) {
                    return Err(format!("missing argument '{r}'"));
                }
            }
        }
        Ok(Args { map })
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> ArgResult<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "argument '{name}' must be a string, got {}",
                kind(other)
            )),
        }
    }

    /// A required string that is not empty.
    fn text(&self, name: &str) -> ArgResult<String> {
        match self.string(name)? {
            Some(s) if !s.is_empty() => Ok(s),
            Some(_) => Err(format!("argument '{name}' must not be empty")),
            None => Err(format!("missing argument '{name}'")),
        }
    }

    fn integer(&self, name: &str, min: u64, max: u64) -> ArgResult<Option<u64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(format!(
                    "argument '{name}' must be an integer from {min} to {max}, got {v}"
                )),
            },
        }
    }

    fn boolean(&self, name: &str) -> ArgResult<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(format!(
                "argument '{name}' must be true or false, got {}",
                kind(other)
            )),
        }
    }

    fn strings(&self, name: &str) -> ArgResult<BTreeMap<String, String>> {
        match self.get(name) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(format!(
                        "argument '{name}': the value of '{k}' must be a string, got {}",
                        kind(other)
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "argument '{name}' must be an object of strings, got {}",
                kind(other)
            )),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Octal permission bits: "644", "0755".
fn mode(s: &str) -> ArgResult<u32> {
    let ok = (3..=4).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b));
    ok.then(|| u32::from_str_radix(s, 8).ok())
        .flatten()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            format!("argument 'mode' must be octal permission bits like \"0644\", got {s:?}")
        })
}

/// Checks and types a `tools/call`'s name and arguments.
pub fn parse_call(name: &str, args: Option<&Value>) -> Result<Call, CallError> {
    let def = definitions()
        .iter()
        .find(|d| d["name"] == name)
        .ok_or_else(|| CallError::UnknownTool(name.to_string()))?;
    parse_with(name, &def["inputSchema"], args).map_err(|message| CallError::Arguments {
        tool: name.to_string(),
        message,
    })
}

fn parse_with(name: &str, schema: &Value, args: Option<&Value>) -> ArgResult<Call> {
    let a = Args::new(schema, args)?;
    Ok(match name {
        "create_sandbox" => Call::Create(CreateSandbox {
            name: a.string("name")?,
            image: a.string("image")?,
            cpus: a.integer("cpus", 1, 64)?.map(|n| n as u32),
            memory_mb: a.integer("memory_mb", 64, u64::from(u32::MAX))?,
            disk_size_mb: a.integer("disk_size_mb", 64, 1 << 20)?,
            env: a.strings("env")?,
            keep_hot: a.boolean("keep_hot")?.unwrap_or(false),
            labels: a.strings("labels")?,
            init: a.string("init")?,
            ..Default::default()
        }),
        "list_sandboxes" => Call::List,
        "exec" => Call::Exec {
            sandbox: a.text("sandbox")?,
            body: ExecBody {
                cmd: vec!["/bin/sh".into(), "-c".into(), a.text("command")?],
                env: a.strings("env")?,
                cwd: a.string("cwd")?,
                timeout_sec: a.integer("timeout_sec", 1, MAX_EXEC_TIMEOUT_SEC)?,
                detach: false,
            },
        },
        "read_file" => Call::ReadFile {
            sandbox: a.text("sandbox")?,
            path: a.text("path")?,
            max_bytes: a
                .integer("max_bytes", 1, MAX_READ_BYTES)?
                .unwrap_or(MAX_READ_BYTES),
        },
        "write_file" => Call::WriteFile {
            sandbox: a.text("sandbox")?,
            path: a.text("path")?,
            content: a
                .string("content")?
                .ok_or_else(|| "missing argument 'content'".to_string())?,
            mode: a.string("mode")?.as_deref().map(mode).transpose()?,
        },
        "publish_port" => Call::Publish {
            sandbox: a.text("sandbox")?,
            body: PublishPort {
                port: a
                    .integer("port", 1, 65535)?
                    .ok_or_else(|| "missing argument 'port'".to_string())?
                    as u16,
                alias: a.string("alias")?,
            },
        },
        "destroy_sandbox" => Call::Destroy {
            sandbox: a.text("sandbox")?,
        },
        other => return Err(format!("tool '{other}' has no parser")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: Value) -> Result<Call, CallError> {
        parse_call(name, Some(&args))
    }

    fn arg_error(name: &str, args: Value) -> String {
        match call(name, args) {
            Err(CallError::Arguments { message, .. }) => message,
            other => panic!("expected an argument error, got {other:?}"),
        }
    }

    #[test]
    fn every_tool_has_a_typed_schema_and_a_parser() {
        let names: Vec<&str> = definitions()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "create_sandbox",
                "list_sandboxes",
                "exec",
                "read_file",
                "write_file",
                "publish_port",
                "destroy_sandbox"
            ]
        );
        for d in definitions() {
            let s = &d["inputSchema"];
            assert_eq!(s["type"], "object", "{d}");
            assert_eq!(s["additionalProperties"], false, "{d}");
            assert!(d["description"].as_str().is_some_and(|t| t.len() > 20));
            for (k, p) in s["properties"].as_object().unwrap() {
                assert!(p["type"].is_string(), "{k} of {d} has no type");
                assert!(p["description"].is_string(), "{k} of {d} undescribed");
            }
            // Every tool parses from its required arguments alone.
            let mut args = Map::new();
            for r in s["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                let v = match s["properties"][r]["type"].as_str().unwrap() {
                    "integer" => json!(8080),
                    _ => json!("/x"),
                };
                args.insert(r.to_string(), v);
            }
            let name = d["name"].as_str().unwrap();
            call(name, Value::Object(args)).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn calls_are_typed() {
        let c = call(
            "exec",
            json!({"sandbox": "dev", "command": "echo hi", "cwd": "/tmp", "env": {"A": "1"}, "timeout_sec": 5}),
        )
        .unwrap();
        let Call::Exec { sandbox, body } = c else {
            panic!("{c:?}")
        };
        assert_eq!(sandbox, "dev");
        assert_eq!(body.cmd, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(body.cwd.as_deref(), Some("/tmp"));
        assert_eq!(body.env["A"], "1");
        assert_eq!(body.timeout_sec, Some(5));
        assert!(!body.detach);

        let c = call(
            "create_sandbox",
            json!({"name": "a", "cpus": 2, "memory_mb": 512, "disk_size_mb": 4096, "keep_hot": true, "init": "dockerd"}),
        )
        .unwrap();
        let Call::Create(b) = c else { panic!("{c:?}") };
        assert_eq!(
            (
                b.name.as_deref(),
                b.cpus,
                b.memory_mb,
                b.disk_size_mb,
                b.keep_hot
            ),
            (Some("a"), Some(2), Some(512), Some(4096), true)
        );
        assert_eq!(b.init.as_deref(), Some("dockerd"));
        assert_eq!(call("list_sandboxes", json!({})).unwrap(), Call::List);
        assert_eq!(parse_call("list_sandboxes", None).unwrap(), Call::List);
        let c = call(
            "write_file",
            json!({"sandbox": "a", "path": "/f", "content": "", "mode": "0755"}),
        )
        .unwrap();
        assert!(
            matches!(c, Call::WriteFile { mode: Some(0o755), ref content, .. } if content.is_empty())
        );
        let c = call("read_file", json!({"sandbox": "a", "path": "/f"})).unwrap();
        assert!(matches!(
            c,
            Call::ReadFile {
                max_bytes: MAX_READ_BYTES,
                ..
            }
        ));
    }

    #[test]
    fn wrong_arguments_name_the_argument() {
        let cases = [
            (
                "exec",
                json!({"sandbox": "a"}),
                "missing argument 'command'",
            ),
            (
                "exec",
                json!({"sandbox": "a", "command": 3}),
                "argument 'command' must be a string",
            ),
            (
                "exec",
                json!({"sandbox": "a", "command": ""}),
                "argument 'command' must not be empty",
            ),
            (
                "exec",
                json!({"sandbox": "a", "command": "x", "timeout_sec": 0}),
                "argument 'timeout_sec'",
            ),
            (
                "exec",
                json!({"sandbox": "a", "command": "x", "timeout_sec": "5"}),
                "argument 'timeout_sec'",
            ),
            (
                "exec",
                json!({"sandbox": "a", "command": "x", "env": {"A": 1}}),
                "argument 'env': the value of 'A'",
            ),
            (
                "exec",
                json!({"sandbox": "a", "command": "x", "bogus": 1}),
                "unknown argument 'bogus'",
            ),
            ("create_sandbox", json!({"cpus": -1}), "argument 'cpus'"),
            ("create_sandbox", json!({"cpus": 1.5}), "argument 'cpus'"),
            (
                "create_sandbox",
                json!({"memory_mb": 1}),
                "argument 'memory_mb'",
            ),
            (
                "create_sandbox",
                json!({"keep_hot": "yes"}),
                "argument 'keep_hot' must be true or false",
            ),
            (
                "list_sandboxes",
                json!({"x": 1}),
                "unknown argument 'x': this tool takes none",
            ),
            (
                "read_file",
                json!({"sandbox": "a", "path": "/f", "max_bytes": MAX_READ_BYTES + 1}),
                "argument 'max_bytes'",
            ),
            (
                "write_file",
                json!({"sandbox": "a", "path": "/f"}),
                "missing argument 'content'",
            ),
            (
                "write_file",
                json!({"sandbox": "a", "path": "/f", "content": "x", "mode": "999"}),
                "argument 'mode'",
            ),
            (
                "write_file",
                json!({"sandbox": "a", "path": "/f", "content": "x", "mode": "07777777"}),
                "argument 'mode'",
            ),
            (
                "publish_port",
                json!({"sandbox": "a", "port": 70000}),
                "argument 'port'",
            ),
            (
                "publish_port",
                json!({"sandbox": "a", "port": null}),
                "missing argument 'port'",
            ),
            ("destroy_sandbox", json!({}), "missing argument 'sandbox'"),
            (
                "destroy_sandbox",
                json!({"sandbox": ["a"]}),
                "argument 'sandbox' must be a string",
            ),
        ];
        for (tool, args, want) in cases {
            let got = arg_error(tool, args.clone());
            assert!(got.contains(want), "{tool} {args}: {got:?} lacks {want:?}");
        }
        assert_eq!(
            parse_call("exec", Some(&json!([1]))).unwrap_err(),
            CallError::Arguments {
                tool: "exec".into(),
                message: "arguments must be an object".into()
            }
        );
        assert_eq!(
            parse_call("rm_rf", None).unwrap_err(),
            CallError::UnknownTool("rm_rf".into())
        );
    }
}
