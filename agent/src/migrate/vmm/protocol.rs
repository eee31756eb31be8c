//! The VMM control protocol, typed: one JSON request per line
//! (`{"cmd":...}`), one JSON answer per line (`{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`).
//!
//! This module is the one definition of the messages that migration needs
//! ([`VmRequest`] and its answers: [`VmInfo`], [`Paused`], [`SavedState`],
//! [`Ack`]). A VMM may serve more commands than these: it declares them as
//! an [`Extension`] (pagefp's test VMM does, for its workload commands), and
//! [`Request`] parses either kind from one line, so the extension lives with
//! that VMM and the product stays free of it.

use std::{
    fmt,
    io::{self, BufRead, Read as _},
};

use serde::{
    Deserialize, Serialize,
    de::{DeserializeOwned, Error as _},
};
use serde_json::Value;

/// Longest request or answer line either side accepts.
pub const MAX_LINE_BYTES: u64 = 16 << 20;

/// What a VMM's VM is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// Stopped by `pause`; `resume` goes on where it stopped.
    Paused,
    /// Started to receive a migration: no state loaded yet.
    Incoming,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Incoming => "incoming",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for VmState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for VmState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One region of guest memory as the VMM maps it: where the guest sees it
/// (`gpa`) and where the VMM process maps it (`uaddr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    #[serde(default)]
    pub read_only: bool,
}

/// The answer to `info`: what migration needs to know. A VMM may send more
/// fields; they are ignored here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub pid: u32,
    pub state: VmState,
    /// Every region of guest memory, as a migration copies them.
    pub memory: Vec<MemoryRegion>,
}

/// The answer to `pause` (once the vCPUs are out of KVM_RUN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub paused: bool,
}

/// The answer to `save_state`: the paused VM's state, opaque text that the
/// destination's `load_state` gets unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub state: String,
}

/// An answer with nothing besides `"ok": true`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {}

// Commands without arguments are empty struct variants: serde ignores
// unknown fields next to the tag of a unit variant, even with deny_unknown_fields.
/// The requests migration sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmRequest {
    /// Answered with [`VmInfo`].
    Info {},
    /// Stops the vCPUs promptly, idempotent; answered with [`Paused`].
    Pause {},
    /// Lets the vCPUs go on where they stopped, idempotent; [`Ack`].
    Resume {},
    /// The paused VM's state; [`SavedState`].
    SaveState {},
    /// Loads a state into an incoming VM (whose memory was written before);
    /// it stays paused. [`Ack`].
    LoadState { state: String },
    /// Ends the VMM process after answering; [`Ack`].
    Exit {},
}

impl VmRequest {
    /// Every `cmd` of [`VmRequest`].
    pub const COMMANDS: &'static [&'static str] = &[
        "info",
        "pause",
        "resume",
        "save_state",
        "load_state",
        "exit",
    ];

    /// The request's `cmd`.
    pub fn name(&self) -> &'static str {
        match self {
            VmRequest::Info {} => "info",
            VmRequest::Pause {} => "pause",
            VmRequest::Resume {} => "resume",
            VmRequest::SaveState {} => "save_state",
            VmRequest::LoadState { .. } => "load_state",
            VmRequest::Exit {} => "exit",
        }
    }
}

/// Requests a VMM serves besides [`VmRequest`]: an enum tagged by `cmd`
/// whose names differ from [`VmRequest::COMMANDS`].
pub trait Extension: Serialize + DeserializeOwned {
    /// Every `cmd` of the extension.
    const COMMANDS: &'static [&'static str];

    /// The request's `cmd`.
    fn name(&self) -> &'static str;
}

/// One request line: a migration command or one of the VMM's extension `X`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Request<X> {
    Vm(VmRequest),
    Ext(X),
}

impl<X> From<VmRequest> for Request<X> {
    fn from(request: VmRequest) -> Self {
        Request::Vm(request)
    }
}

impl<X: Extension> Request<X> {
    /// Parses one request line. The error says what is wrong (an unknown
    /// `cmd` lists the known ones).
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        let value: Value = serde_json::from_slice(line)?;
        Self::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<Self, serde_json::Error> {
        let cmd = match &value {
            Value::Object(fields) => match fields.get("cmd") {
                None => return Err(serde_json::Error::missing_field("cmd")),
                Some(Value::String(cmd)) => Some(cmd.clone()),
                // Let the extension's parser describe the bad type.
                Some(_) => None,
            },
            _ => None,
        };
        match cmd {
            Some(cmd) if VmRequest::COMMANDS.contains(&cmd.as_str()) => {
                serde_json::from_value(value).map(Request::Vm)
            }
            Some(cmd) if !X::COMMANDS.contains(&cmd.as_str()) => {
                let known: Vec<&str> = VmRequest::COMMANDS
                    .iter()
                    .chain(X::COMMANDS)
                    .copied()
                    .collect();
                Err(serde_json::Error::custom(format_args!(
                    "unknown variant `{cmd}`, expected one of {}",
                    known.join(", ")
                )))
            }
            _ => serde_json::from_value(value).map(Request::Ext),
        }
    }

    /// The request's `cmd`.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Vm(request) => request.name(),
            Request::Ext(request) => request.name(),
        }
    }
}

/// One answer: `T` with `"ok": true`, or a refusal with `"ok": false` and
/// the VMM's reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply<T> {
    Ok(T),
    Refused(String),
}

impl<T: Serialize> Reply<T> {
    /// The answer as a JSON object (`T` must serialise to an object).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        match self {
            Reply::Ok(answer) => match serde_json::to_value(answer)? {
                Value::Object(mut fields) => {
                    fields.insert("ok".into(), Value::Bool(true));
                    Ok(Value::Object(fields))
                }
                other => Err(serde_json::Error::custom(format_args!(
                    "an answer must be a JSON object, not {other}"
                ))),
            },
            Reply::Refused(error) => Ok(refusal(error)),
        }
    }
}

impl<T: DeserializeOwned> Reply<T> {
    /// Parses one answer line.
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        Self::from_value(serde_json::from_slice(line)?)
    }

    pub fn from_value(value: Value) -> Result<Self, serde_json::Error> {
        match value.get("ok") {
            Some(Value::Bool(true)) => serde_json::from_value(value).map(Reply::Ok),
            Some(Value::Bool(false)) => Ok(Reply::Refused(
                value
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
                    .to_owned(),
            )),
            _ => Err(serde_json::Error::custom(
                "the answer has no boolean `ok` field",
            )),
        }
    }
}

/// `{"ok":false,"error":...}`.
pub fn refusal(error: &str) -> Value {
    let mut fields = serde_json::Map::new();
    fields.insert("ok".into(), Value::Bool(false));
    fields.insert("error".into(), Value::String(error.to_owned()));
    Value::Object(fields)
}

/// How reading one line ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineRead {
    /// The peer closed the connection before sending anything.
    Closed,
    /// A line (its newline included, unless the peer closed after it).
    Line,
    /// [`MAX_LINE_BYTES`] without a newline: the connection is not usable.
    TooLong,
}

/// Reads one line into `line` (cleared first), at most [`MAX_LINE_BYTES`].
pub fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<LineRead> {
    line.clear();
    let n = reader
        .by_ref()
        .take(MAX_LINE_BYTES)
        .read_until(b'\n', line)?;
    Ok(if n == 0 {
        LineRead::Closed
    } else if !line.ends_with(b"\n") && line.len() as u64 >= MAX_LINE_BYTES {
        LineRead::TooLong
    } else {
        LineRead::Line
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
    enum Extra {
        Spin { times: u32 },
    }

    impl Extension for Extra {
        const COMMANDS: &'static [&'static str] = &["spin"];
        fn name(&self) -> &'static str {
            "spin"
        }
    }

    fn parse(value: Value) -> Result<Request<Extra>, String> {
        Request::parse(value.to_string().as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn requests_keep_the_wire_format() {
        let all = [
            (VmRequest::Info {}, json!({"cmd": "info"})),
            (VmRequest::Pause {}, json!({"cmd": "pause"})),
            (VmRequest::Resume {}, json!({"cmd": "resume"})),
            (VmRequest::SaveState {}, json!({"cmd": "save_state"})),
            (
                VmRequest::LoadState { state: "ab".into() },
                json!({"cmd": "load_state", "state": "ab"}),
            ),
            (VmRequest::Exit {}, json!({"cmd": "exit"})),
        ];
        assert_eq!(all.len(), VmRequest::COMMANDS.len());
        for (request, wire) in all {
            assert_eq!(serde_json::to_value(&request).unwrap(), wire);
            assert_eq!(wire["cmd"], request.name());
            assert!(VmRequest::COMMANDS.contains(&request.name()));
            assert_eq!(parse(wire).unwrap(), Request::Vm(request));
        }
        let spin = Request::<Extra>::Ext(Extra::Spin { times: 3 });
        assert_eq!(
            serde_json::to_value(&spin).unwrap(),
            json!({"cmd": "spin", "times": 3})
        );
        assert_eq!(parse(json!({"cmd": "spin", "times": 3})).unwrap(), spin);
        assert_eq!(spin.name(), "spin");
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        for (bad, needle) in [
            (
                json!({"cmd": "fly"}),
                "unknown variant `fly`, expected one of info",
            ),
            (json!({"cmd": "fly"}), "spin"),
            (json!({"nocmd": 1}), "missing field `cmd`"),
            (json!("not an object"), "invalid type"),
            (json!({"cmd": 7}), "invalid type"),
            (json!({"cmd": "info", "extra": 1}), "unknown field `extra`"),
            (json!({"cmd": "load_state"}), "missing field `state`"),
            (json!({"cmd": "spin"}), "missing field `times`"),
            (json!({"cmd": "spin", "times": -1}), "invalid value"),
        ] {
            let error = parse(bad.clone()).unwrap_err();
            assert!(error.contains(needle), "{bad}: {error:?} lacks {needle:?}");
        }
        assert!(Request::<Extra>::parse(b"{\"cmd\":").is_err());
    }

    #[test]
    fn answers_carry_ok_and_refusals_their_reason() {
        let saved = Reply::Ok(SavedState {
            state: "00ff".into(),
        });
        let wire = saved.to_value().unwrap();
        assert_eq!(wire, json!({"ok": true, "state": "00ff"}));
        assert_eq!(Reply::<SavedState>::from_value(wire).unwrap(), saved);
        assert_eq!(Reply::Ok(Ack {}).to_value().unwrap(), json!({"ok": true}));
        let refused = Reply::<Ack>::Refused("send pause first".into());
        let wire = refused.to_value().unwrap();
        assert_eq!(wire, json!({"ok": false, "error": "send pause first"}));
        assert_eq!(Reply::<Ack>::from_value(wire).unwrap(), refused);
        assert_eq!(
            Reply::<Ack>::from_value(json!({"ok": false})).unwrap(),
            Reply::Refused("no reason given".into())
        );
        assert!(Reply::<Ack>::from_value(json!({"state": "x"})).is_err());
        assert!(Reply::Ok(7u32).to_value().is_err());
        // Extra fields (another VMM's) are ignored; missing ones are errors.
        let info = json!({"ok": true, "pid": 7, "state": "incoming", "pages": 3,
                          "memory": [{"slot": 0, "gpa": 0, "size": 4096, "uaddr": 8192}]});
        let Reply::Ok(info) = Reply::<VmInfo>::from_value(info).unwrap() else {
            panic!("refused")
        };
        assert_eq!(info.state, VmState::Incoming);
        assert_eq!(info.state, "incoming");
        assert!(!info.memory[0].read_only);
        assert!(Reply::<VmInfo>::from_value(json!({"ok": true, "pid": 7})).is_err());
    }

    #[test]
    fn lines_are_bounded() {
        let mut line = Vec::new();
        let mut input = &b"{\"cmd\":\"info\"}\nrest"[..];
        assert_eq!(read_line(&mut input, &mut line).unwrap(), LineRead::Line);
        assert_eq!(line, b"{\"cmd\":\"info\"}\n");
        assert_eq!(read_line(&mut input, &mut line).unwrap(), LineRead::Line);
        assert_eq!(line, b"rest");
        assert_eq!(read_line(&mut input, &mut line).unwrap(), LineRead::Closed);
        let long = vec![b'x'; MAX_LINE_BYTES as usize + 10];
        let mut input = &long[..];
        assert_eq!(read_line(&mut input, &mut line).unwrap(), LineRead::TooLong);
        assert_eq!(line.len() as u64, MAX_LINE_BYTES);
    }
}
