//! JSON-RPC 2.0 and the MCP methods: `initialize` (with version
//! negotiation), `ping`, `tools/list`, `tools/call`; notifications are
//! taken and not answered; anything else is "method not found".

use serde_json::{json, Value};

use crate::tools::{parse_call, Call, CallError};
use crate::{Backend, ToolFailure};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// The protocol revisions served, newest first.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// The version to answer a client asking for `requested`: the same when
/// served, else the newest (the client then decides whether it can go on).
pub fn negotiate(requested: Option<&str>) -> &'static str {
    SUPPORTED_VERSIONS
        .iter()
        .find(|v| Some(**v) == requested)
        .copied()
        .unwrap_or(SUPPORTED_VERSIONS[0])
}

/// A JSON-RPC error answer.
pub fn error_response(id: Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

const INSTRUCTIONS: &str = "Tools of a bhatti daemon: create sandboxes (microVMs), run shell \
commands in them, read and write their files, publish their ports, destroy them. A sandbox is \
named by its name or id in every tool; sleeping sandboxes wake on use.";

/// The MCP server over one [`Backend`].
#[derive(Debug)]
pub struct Server<B> {
    backend: B,
}

impl<B: Backend> Server<B> {
    pub fn new(backend: B) -> Server<B> {
        Server { backend }
    }

    /// One transport message (a JSON text): its answer, or `None` when it
    /// needs none (notifications, responses, a batch of those).
    pub async fn handle_text(&self, text: &str) -> Option<Value> {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => self.handle_value(v).await,
            Err(e) => Some(error_response(
                Value::Null,
                PARSE_ERROR,
                format!("parse error: {e}"),
            )),
        }
    }

    /// A parsed message or a batch (an array of messages).
    pub async fn handle_value(&self, msg: Value) -> Option<Value> {
        match msg {
            Value::Array(batch) if batch.is_empty() => Some(error_response(
                Value::Null,
                INVALID_REQUEST,
                "an empty batch",
            )),
            Value::Array(batch) => {
                let mut out = Vec::new();
                for m in batch {
                    out.extend(self.handle_one(m).await);
                }
                (!out.is_empty()).then_some(Value::Array(out))
            }
            m => self.handle_one(m).await,
        }
    }

    async fn handle_one(&self, msg: Value) -> Option<Value> {
        let Value::Object(obj) = msg else {
            return Some(error_response(
                Value::Null,
                INVALID_REQUEST,
                "a message must be a JSON object",
            ));
        };
        let id = obj.get("id").cloned();
        if let Some(id) = &id {
            if !(id.is_string() || id.is_i64() || id.is_u64()) {
                return Some(error_response(
                    Value::Null,
                    INVALID_REQUEST,
                    "id must be a string or an integer",
                ));
            }
        }
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Some(error_response(
                id.unwrap_or(Value::Null),
                INVALID_REQUEST,
                "jsonrpc must be \"2.0\"",
            ));
        }
        let Some(method) = obj.get("method").and_then(Value::as_str) else {
            // A response to a request of ours (none is ever sent): nothing
            // to answer. Anything else without a method is invalid.
            if id.is_some() && (obj.contains_key("result") || obj.contains_key("error")) {
                return None;
            }
            return Some(error_response(
                id.unwrap_or(Value::Null),
                INVALID_REQUEST,
                "method must be a string",
            ));
        };
        let params = obj.get("params");
        let Some(id) = id else {
            // A notification (`notifications/initialized`,
            // `notifications/cancelled`, …): never answered.
            return None;
        };
        if params.is_some_and(|p| !(p.is_object() || p.is_array() || p.is_null())) {
            return Some(error_response(
                id,
                INVALID_PARAMS,
                "params must be an object",
            ));
        }
        Some(match method {
            "initialize" => self.initialize(id, params),
            "ping" => result(id, json!({})),
            "tools/list" => result(id, json!({"tools": crate::tools::definitions()})),
            "tools/call" => self.call(id, params).await,
            other => error_response(id, METHOD_NOT_FOUND, format!("method not found: {other}")),
        })
    }

    fn initialize(&self, id: Value, params: Option<&Value>) -> Value {
        let Some(requested) = params
            .and_then(|p| p.get("protocolVersion"))
            .and_then(Value::as_str)
        else {
            return error_response(
                id,
                INVALID_PARAMS,
                "initialize needs params.protocolVersion",
            );
        };
        result(
            id,
            json!({
                "protocolVersion": negotiate(Some(requested)),
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {
                    "name": "bhatti",
                    "title": "bhatti sandboxes",
                    "version": env!("CARGO_PKG_VERSION")
                },
                "instructions": INSTRUCTIONS
            }),
        )
    }

    async fn call(&self, id: Value, params: Option<&Value>) -> Value {
        let Some(name) = params.and_then(|p| p.get("name")).and_then(Value::as_str) else {
            return error_response(
                id,
                INVALID_PARAMS,
                "tools/call needs params.name (a string)",
            );
        };
        let args = params.and_then(|p| p.get("arguments"));
        let outcome = match parse_call(name, args) {
            Ok(call) => self.run(call).await,
            Err(e @ CallError::UnknownTool(_)) => {
                return error_response(id, INVALID_PARAMS, e.to_string())
            }
            Err(CallError::Arguments { message, .. }) => Err(ToolFailure(message)),
        };
        let body = match outcome {
            Ok(text) => json!({"content": [{"type": "text", "text": text}], "isError": false}),
            Err(ToolFailure(msg)) => {
                json!({"content": [{"type": "text", "text": msg}], "isError": true})
            }
        };
        result(id, body)
    }

    /// Runs a checked call; its result text.
    async fn run(&self, call: Call) -> Result<String, ToolFailure> {
        let b = &self.backend;
        match call {
            Call::Create(body) => to_json(&b.create(body).await?),
            Call::List => to_json(&b.list().await?),
            Call::Exec { sandbox, body } => to_json(&b.exec(&sandbox, body).await?),
            Call::ReadFile {
                sandbox,
                path,
                max_bytes,
            } => {
                let f = b.read_file(&sandbox, &path, max_bytes).await?;
                let mut text = String::from_utf8(f.data).map_err(|_| {
                    ToolFailure(format!(
                        "{path} is not UTF-8 text ({} bytes); read binary files with exec, e.g. `base64 {path}`",
                        f.size
                    ))
                })?;
                if f.truncated {
                    text.push_str(&format!(
                        "\n[truncated: the first {max_bytes} of {} bytes]",
                        f.size
                    ));
                }
                Ok(text)
            }
            Call::WriteFile {
                sandbox,
                path,
                content,
                mode,
            } => to_json(
                &b.write_file(&sandbox, &path, content.into_bytes(), mode)
                    .await?,
            ),
            Call::Publish { sandbox, body } => to_json(&b.publish(&sandbox, body).await?),
            Call::Destroy { sandbox } => {
                b.destroy(&sandbox).await?;
                Ok(format!("destroyed {sandbox}"))
            }
        }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ToolFailure> {
    serde_json::to_string_pretty(v)
        .map_err(|e| ToolFailure(format!("cannot encode the result: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::FileContent;
    use api_types::{
        CreateSandbox, ExecBody, ExecResult, PublishPort, Published, Sandbox, Written,
    };

    /// A backend that knows one sandbox, `dev`, and echoes what it is asked.
    #[derive(Debug)]
    pub struct Fake;

    fn missing(s: &str) -> ToolFailure {
        ToolFailure(format!("no sandbox '{s}'"))
    }

    #[async_trait::async_trait]
    impl Backend for Fake {
        async fn create(&self, _: CreateSandbox) -> Result<Sandbox, ToolFailure> {
            Err(ToolFailure("quota reached".into()))
        }
        async fn list(&self) -> Result<Vec<Sandbox>, ToolFailure> {
            Ok(Vec::new())
        }
        async fn exec(&self, s: &str, body: ExecBody) -> Result<ExecResult, ToolFailure> {
            if s != "dev" {
                return Err(missing(s));
            }
            Ok(ExecResult {
                exit_code: 3,
                stdout: body.cmd.join(" "),
                stderr: String::new(),
                timed_out: false,
                stdout_truncated: false,
                stderr_truncated: false,
            })
        }
        async fn read_file(
            &self,
            s: &str,
            path: &str,
            max: u64,
        ) -> Result<FileContent, ToolFailure> {
            if s != "dev" {
                return Err(missing(s));
            }
            let data = if path == "/bin" {
                vec![0xff, 0xfe]
            } else {
                b"hello world".to_vec()
            };
            let size = data.len() as u64;
            let data: Vec<u8> = data.into_iter().take(max as usize).collect();
            Ok(FileContent {
                truncated: (data.len() as u64) < size,
                data,
                size,
            })
        }
        async fn write_file(
            &self,
            _: &str,
            path: &str,
            data: Vec<u8>,
            _: Option<u32>,
        ) -> Result<Written, ToolFailure> {
            Ok(Written {
                path: path.into(),
                bytes: data.len() as u64,
            })
        }
        async fn publish(&self, _: &str, b: PublishPort) -> Result<Published, ToolFailure> {
            Ok(Published {
                port: b.port,
                alias: "a".into(),
                url: "http://a.example".into(),
                listening: None,
            })
        }
        async fn destroy(&self, _: &str) -> Result<(), ToolFailure> {
            Ok(())
        }
    }

    async fn ask(msg: Value) -> Value {
        Server::new(Fake)
            .handle_value(msg)
            .await
            .expect("an answer")
    }

    fn req(method: &str, params: Value) -> Value {
        json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})
    }

    #[tokio::test]
    async fn initialize_negotiates_the_version() {
        for (asked, got) in [
            ("2025-11-25", "2025-11-25"),
            ("2025-06-18", "2025-06-18"),
            ("2024-11-05", "2024-11-05"),
            ("2099-01-01", "2025-11-25"),
        ] {
            let a = ask(req("initialize", json!({"protocolVersion": asked, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}))).await;
            assert_eq!(a["id"], 7);
            assert_eq!(a["result"]["protocolVersion"], got, "{a}");
            assert_eq!(a["result"]["serverInfo"]["name"], "bhatti");
            assert!(a["result"]["capabilities"]["tools"].is_object());
        }
        let a = ask(req("initialize", json!({}))).await;
        assert_eq!(a["error"]["code"], INVALID_PARAMS, "{a}");
    }

    #[tokio::test]
    async fn json_rpc_errors() {
        let s = Server::new(Fake);
        let a = s.handle_text("{not json").await.unwrap();
        assert_eq!(
            (a["id"].clone(), a["error"]["code"].clone()),
            (Value::Null, json!(PARSE_ERROR))
        );
        let a = ask(req("resources/list", json!({}))).await;
        assert_eq!(a["error"]["code"], METHOD_NOT_FOUND, "{a}");
        assert_eq!(a["id"], 7);
        let a = ask(req("server/discover", json!({}))).await;
        assert_eq!(a["error"]["code"], METHOD_NOT_FOUND, "{a}");
        let a = ask(json!({"id": 1, "method": "ping"})).await;
        assert_eq!(a["error"]["code"], INVALID_REQUEST, "{a}");
        let a = ask(json!({"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"})).await;
        assert_eq!(a["error"]["code"], INVALID_REQUEST, "{a}");
        let a = ask(json!({"jsonrpc": "2.0", "id": 2, "method": 5})).await;
        assert_eq!(a["error"]["code"], INVALID_REQUEST, "{a}");
        let a = ask(json!([])).await;
        assert_eq!(a["error"]["code"], INVALID_REQUEST, "{a}");
        let a = ask(json!(17)).await;
        assert_eq!(a["error"]["code"], INVALID_REQUEST, "{a}");
        let a = ask(req("tools/call", json!({"arguments": {}}))).await;
        assert_eq!(a["error"]["code"], INVALID_PARAMS, "{a}");
        let a = ask(req("tools/call", json!({"name": "nope"}))).await;
        assert_eq!(a["error"]["code"], INVALID_PARAMS, "{a}");
        assert!(a["error"]["message"].as_str().unwrap().contains("nope"));
        let a = ask(req("ping", json!(3))).await;
        assert_eq!(a["error"]["code"], INVALID_PARAMS, "{a}");
    }

    #[tokio::test]
    async fn notifications_and_responses_get_no_answer() {
        let s = Server::new(Fake);
        for m in [
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}),
            json!({"jsonrpc": "2.0", "id": 4, "result": {}}),
            json!([{"jsonrpc": "2.0", "method": "notifications/initialized"}]),
        ] {
            assert_eq!(s.handle_value(m.clone()).await, None, "{m}");
        }
        // A batch answers its requests only.
        let a = s
            .handle_value(json!([
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": "a", "method": "ping"}
            ]))
            .await
            .unwrap();
        assert_eq!(a, json!([{"jsonrpc": "2.0", "id": "a", "result": {}}]));
    }

    #[tokio::test]
    async fn tools_list_and_call() {
        let a = ask(req("tools/list", json!({}))).await;
        let tools = a["result"]["tools"].as_array().unwrap();
        assert_eq!(tools.len(), 7);
        assert!(tools.iter().all(|t| t["inputSchema"]["type"] == "object"));

        let a = ask(req(
            "tools/call",
            json!({"name": "exec", "arguments": {"sandbox": "dev", "command": "echo hi"}}),
        ))
        .await;
        assert_eq!(a["result"]["isError"], false, "{a}");
        let out: Value =
            serde_json::from_str(a["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
        assert_eq!(out["stdout"], "/bin/sh -c echo hi");
        assert_eq!(out["exit_code"], 3);

        // Wrong arguments: a tool error naming the argument, not a JSON-RPC error.
        let a = ask(req("tools/call", json!({"name": "exec", "arguments": {"sandbox": "dev", "command": "x", "timeout_sec": "soon"}}))).await;
        assert_eq!(a["result"]["isError"], true, "{a}");
        assert!(
            a["result"]["content"][0]["text"]
                .as_str()
                .unwrap()
                .contains("'timeout_sec'"),
            "{a}"
        );

        // The backend's failures are tool errors with its message.
        let a = ask(req(
            "tools/call",
            json!({"name": "exec", "arguments": {"sandbox": "theirs", "command": "x"}}),
        ))
        .await;
        assert_eq!(a["result"]["isError"], true, "{a}");
        assert_eq!(a["result"]["content"][0]["text"], "no sandbox 'theirs'");

        let a = ask(req("tools/call", json!({"name": "read_file", "arguments": {"sandbox": "dev", "path": "/f", "max_bytes": 5}}))).await;
        assert_eq!(
            a["result"]["content"][0]["text"], "hello\n[truncated: the first 5 of 11 bytes]",
            "{a}"
        );
        let a = ask(req(
            "tools/call",
            json!({"name": "read_file", "arguments": {"sandbox": "dev", "path": "/bin"}}),
        ))
        .await;
        assert_eq!(a["result"]["isError"], true, "{a}");
        assert!(a["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("not UTF-8"));
        let a = ask(req(
            "tools/call",
            json!({"name": "destroy_sandbox", "arguments": {"sandbox": "dev"}}),
        ))
        .await;
        assert_eq!(a["result"]["content"][0]["text"], "destroyed dev", "{a}");
    }

    #[tokio::test]
    async fn stdio_answers_line_by_line() {
        let input = concat!(
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            "\n",
            "\n",
            "garbage\n",
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
            "\n",
        );
        let mut out = Vec::new();
        crate::stdio::serve(
            std::sync::Arc::new(Server::new(Fake)),
            input.as_bytes(),
            &mut out,
        )
        .await
        .unwrap();
        let mut answers: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        answers.sort_by_key(|a| a["id"].as_i64().unwrap_or(0));
        assert_eq!(answers.len(), 3, "{answers:?}");
        assert_eq!(answers[0]["error"]["code"], PARSE_ERROR);
        assert_eq!(answers[1]["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(answers[2]["result"]["tools"].as_array().unwrap().len(), 7);
    }

    #[tokio::test]
    async fn stdio_answers_an_over_long_line_with_a_parse_error_and_goes_on() {
        let mut input = vec![b' '; crate::stdio::MAX_LINE + 1];
        input.extend_from_slice(b"\n");
        input.extend_from_slice(br#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#);
        input.extend_from_slice(b"\n");
        let mut out = Vec::new();
        crate::stdio::serve(std::sync::Arc::new(Server::new(Fake)), &input[..], &mut out)
            .await
            .unwrap();
        let answers: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert_eq!(answers[0]["error"]["code"], PARSE_ERROR, "{answers:?}");
        assert!(answers[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("over"));
        assert_eq!(answers[1]["id"], 7, "{answers:?}");
        assert!(answers[1]["result"].is_object(), "{answers:?}");
    }
}
